"""Dataset statistics (`raysvc data inspect`), side by side with the published ones of the dataset's detector
(LArTPC: PILArNet-M's)."""

from __future__ import annotations

import copy
import re

import numpy as np

from raysvc.data.contract.schema import flat_values
from raysvc.data.streaming.shards import iter_tables, load_manifest
from raysvc.storage import Location


def _distinct_per_row(lengths: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Number of distinct non-negative ids in each row of a flattened list column."""
    rows = np.repeat(np.arange(len(lengths)), lengths)
    keep = ids >= 0
    pairs = np.unique(rows[keep].astype(np.int64) << 32 | ids[keep].astype(np.int64))
    return np.bincount((pairs >> 32).astype(np.int64), minlength=len(lengths))


def inspect_dataset(root: Location, verify: bool = True) -> dict:
    """Statistics over every event; shards are checked against the manifest's sizes and checksums on the way."""
    manifest = load_manifest(root)
    detector = manifest.detector_spec
    names = detector.class_names
    n_points, class_counts, inter, part = [], np.zeros(len(names), np.int64), [], []
    cols = ["num_points", "semantic", "interaction", "particle", "rings"]
    rings: list[int] = []
    for _, table in iter_tables(root, manifest, verify_checksum=verify, columns=cols):
        rings += [r for r in table.column("rings").to_pylist() if r is not None]
        lengths = table.column("num_points").to_numpy().astype(np.int64)
        n_points.append(lengths)
        sem = flat_values(table, "semantic")
        class_counts += np.bincount(sem[(sem >= 0) & (sem < len(names))], minlength=len(names))
        inter.append(_distinct_per_row(lengths, flat_values(table, "interaction")))
        part.append(_distinct_per_row(lengths, flat_values(table, "particle")))
    npts = np.concatenate(n_points) if n_points else np.zeros(0)
    inter_a, part_a = (np.concatenate(x) if x else np.zeros(0) for x in (inter, part))
    total = max(int(class_counts.sum()), 1)
    describe = lambda a: {"mean": float(a.mean()), "std": float(a.std())} if len(a) else {}  # noqa: E731
    reference = copy.deepcopy(detector.reference)  # the caller's to change
    return {
        "uri": root.uri,
        "detector": detector.name,
        "events": int(len(npts)),
        "points": int(npts.sum()),
        "shards": len(manifest.shards),
        "bytes": int(sum(s.bytes for s in manifest.shards)),
        "checksums_verified": verify,
        "created_by": {k: v for k, v in manifest.created_by.items() if k in ("tool", "seed", "pattern", "revision")},
        "points_per_event": {
            "median": float(np.median(npts)) if len(npts) else 0.0,
            "mean": float(npts.mean()) if len(npts) else 0.0,
            "min": int(npts.min()) if len(npts) else 0,
            "max": int(npts.max()) if len(npts) else 0,
            "p5": float(np.percentile(npts, 5)) if len(npts) else 0.0,
            "p95": float(np.percentile(npts, 95)) if len(npts) else 0.0,
        },
        "class_fractions": {name: float(class_counts[i] / total) for i, name in enumerate(names)},
        "interactions_per_event": describe(inter_a),
        "particles_per_event": describe(part_a),
        # events per number of Cherenkov rings, where the detector has rings (water Cherenkov)
        "rings_per_event": {str(k): int(v) for k, v in zip(*np.unique(rings, return_counts=True), strict=True)},
        "reference": reference,
        # the same, under the key readers used before `reference` (LArTPC: `reference_pilarnet_m`)
        **({reference_key(reference): reference} if reference.get("name") else {}),
    }


def reference_key(reference: dict) -> str:
    """`reference_<name>` for a detector's reference statistics: PILArNet-M -> `reference_pilarnet_m`."""
    return "reference_" + re.sub(r"[^a-z0-9]+", "_", reference["name"].lower()).strip("_")
