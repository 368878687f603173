"""Encode points with a PTv3 (ours, or one loaded from a published checkpoint): every encoder stage's output.

Eval mode, no gradients, orders as the config lists them (no shuffling outside training, so the result is
deterministic; the reference shuffles the orders of its pooled stages even in eval unless told not to). Rows of stage
0 follow the input; a pooled stage's rows are sorted by (event, x, y, z) of its cells, as the reference's are.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from raysvc.models.ptv3 import PTv3

_FIELDS = ("coord", "grid_coord", "feat", "offset")


def backbone_of(model: nn.Module) -> PTv3:
    """The PTv3 of `model`: the model itself or its `.backbone` (segmentation and pretraining models)."""
    if isinstance(model, PTv3):
        return model
    backbone = getattr(model, "backbone", None)
    if isinstance(backbone, PTv3):
        return backbone
    raise ValueError(f"{type(model).__name__} is not a PTv3 and has no PTv3 `.backbone`")


def _inputs(points: dict, in_channels: int) -> dict[str, np.ndarray]:
    missing = [k for k in _FIELDS if k not in points]
    if missing:
        raise ValueError(f"points need {list(_FIELDS)}; missing {missing}")
    arr = {k: np.asarray(points[k]) for k in _FIELDS}
    n = len(arr["coord"])
    for k, cols in (("coord", 3), ("grid_coord", 3), ("feat", in_channels)):
        if arr[k].ndim != 2 or arr[k].shape != (n, cols):
            raise ValueError(f"points[{k!r}] must be ({n}, {cols}), got {arr[k].shape}")
    if not np.issubdtype(arr["grid_coord"].dtype, np.integer) or (n and arr["grid_coord"].min() < 0):
        raise ValueError("points['grid_coord'] must be non-negative integers (cells from each event's minimum corner)")
    off = arr["offset"]
    if off.ndim != 1 or not len(off) or not np.issubdtype(off.dtype, np.integer):
        raise ValueError(f"points['offset'] must be (B,) integer cumulative event ends, got {off.dtype} {off.shape}")
    if np.any(np.diff(off) <= 0) or off[0] <= 0 or off[-1] != n:
        raise ValueError(f"points['offset'] must rise strictly to the point count {n} (no empty events), got {off}")
    return arr


def encode(model: nn.Module, points: dict) -> list[dict]:
    """`points`: numpy `coord` (N, 3) float32, `grid_coord` (N, 3) int64, `feat` (N, C) float32, `offset` (B,)
    cumulative event ends. Returns per encoder stage, stage 0 first, {"grid_coord", "feat", "offset"} as numpy."""
    backbone = backbone_of(model)
    arr = _inputs(points, backbone.cfg.in_channels)
    device = next(backbone.parameters()).device
    dtype = next(backbone.parameters()).dtype
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            levels = backbone(
                torch.as_tensor(arr["feat"], dtype=dtype, device=device),
                torch.as_tensor(arr["coord"], dtype=dtype, device=device),
                torch.as_tensor(arr["grid_coord"], dtype=torch.long, device=device),
                torch.as_tensor(arr["offset"], dtype=torch.long, device=device),
            )
    finally:
        backbone.train(was_training)
    return [
        {
            "grid_coord": lv.grid_coord.cpu().numpy(),
            "feat": lv.feat.float().cpu().numpy(),
            "offset": lv.offset.cpu().numpy(),
        }
        for lv in levels
    ]
