"""Point-cloud operators on packed batches (concatenated points + per-event offsets)."""

from raysvc.ops.grouping import CNMSResult, cnms, coverage  # noqa: E402,F401  (interface: raysvc.ops.cnms)
