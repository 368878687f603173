"""Packed batches -> model inputs: the one featurisation that training, the probe, evaluation, `raysvc predict`
and the Serve endpoint share, so a model always sees its inputs made the same way."""

from __future__ import annotations

import torch

from raysvc.ops.grid import grid_sample
from raysvc.ops.packed import offset_to_batch, segment_mean


def model_inputs(
    batch: dict, center: float, scale: float, grid_voxels: float, device: torch.device, center_events: bool = False
) -> dict:
    """Packed batch -> model inputs on `device`: grid sampling at `grid_voxels` (a cell takes the mean coordinate, the
    summed energy feature and the mean hit time (where there is one) of its points), integer grid coordinates, and
    `inverse` from points to cells. With `center_events`, each event's coordinates are shifted to its mean (as
    Panda's views are: a backbone pretrained on them expects it)."""
    voxel = torch.round(batch["coord"].double() * scale + center)  # undo the normalisation: exact voxel indices
    timed = "time" in batch
    feat = batch["energy"].double()
    if timed:  # a cell's time is the mean of its points' (the amplitude is summed): one more column counts them
        feat = torch.cat([feat, batch["time"].double(), torch.ones_like(feat)], 1)
    gs = grid_sample(voxel, batch["offset"], grid_voxels, feat=feat)
    cell_feat = gs.feat_sum[:, :1]
    if timed:
        cell_feat = torch.cat([cell_feat, gs.feat_sum[:, 1:2] / gs.feat_sum[:, 2:3]], 1)
    coord = (gs.coord - center) / scale
    if center_events:
        cell_batch = offset_to_batch(gs.offset)
        coord = coord - segment_mean(coord, cell_batch, len(gs.offset))[cell_batch]
    coord = coord.float()
    feat = torch.cat([coord, cell_feat.float()], 1)
    return {
        "feat": feat.to(device),
        "coord": coord.to(device),
        "grid_coord": gs.grid_coord.to(device),
        "offset": gs.offset.to(device),
        "inverse": gs.inverse.to(device),
        "labels": batch["semantic"].to(device),
    }


def usable_device(device: str | torch.device) -> torch.device:
    """`device` as a torch.device; a CUDA device that this torch cannot see is an error naming it."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r}: this torch ({torch.__version__}) sees no CUDA device; use cpu")
    return dev
