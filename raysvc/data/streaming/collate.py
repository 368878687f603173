"""Arrow event batch -> packed tensors (concatenated points + per-event offsets), the format PTv3 models take.

List offsets of the Arrow columns become the packing directly: no per-event Python objects on the hot path.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from raysvc.data.contract.schema import LABEL_FIELDS, flat_coords, flat_times, flat_values


def collate_packed(table: pa.Table, particles: bool = False) -> dict[str, torch.Tensor]:
    """Packed batch: coord (N,3), energy (N,1), feat (N,4) = xyz + energy (N,5 with `time` (N,1) where the events
    have hit times), labels (N,) int64, batch (N,),
    offset (B,) cumulative point counts (offset[-1] == N), event_id (B,). With `particles` (for the tasks that learn
    from it), also `particles`: per event its particle truth as a list of dicts, or None where unknown."""
    counts = table.column("num_points").to_numpy().astype(np.int64)
    coord = torch.from_numpy(flat_coords(table).copy())
    energy = torch.from_numpy(flat_values(table, "energy").astype(np.float32, copy=True)).unsqueeze(1)
    out = {
        "coord": coord,
        "energy": energy,
        "feat": torch.cat([coord, energy], dim=1),
        "offset": torch.from_numpy(np.cumsum(counts)),
        "batch": torch.from_numpy(np.repeat(np.arange(len(counts)), counts)),
        "event_id": torch.from_numpy(table.column("event_id").to_numpy().astype(np.int64)),
    }
    times = flat_times(table)
    if times is not None:  # a detector with hit times (water Cherenkov): a second feature channel after the amplitude
        out["time"] = torch.from_numpy(times).unsqueeze(1)
        out["feat"] = torch.cat([out["feat"], out["time"]], dim=1)
    for name in LABEL_FIELDS:
        out[name] = torch.from_numpy(flat_values(table, name).astype(np.int64))
    if particles:
        have = "particles" in table.column_names
        out["particles"] = table.column("particles").to_pylist() if have else [None] * table.num_rows
    if out["coord"].shape[0] != int(counts.sum()):
        raise ValueError(f"collate: {out['coord'].shape[0]} points but num_points sums to {int(counts.sum())}")
    return out
