"""Grid sampling: points in the same cell of side `grid_size` become one (energy summed, coordinates averaged)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raysvc.ops.packed import batch_to_offset, offset_to_batch, segment_mean, unique_cells


@dataclass
class GridSampled:
    coord: torch.Tensor  # (M, 3) mean coordinate of each occupied cell
    grid_coord: torch.Tensor  # (M, 3) int64 cell index, per event relative to the event's minimum corner
    feat_sum: torch.Tensor  # (M, C) summed features (energy) of the cell
    offset: torch.Tensor  # (B,) cumulative cell counts
    inverse: torch.Tensor  # (N,) cell of every input point: maps cell values back to points


def grid_sample(
    coord: torch.Tensor,
    offset: torch.Tensor,
    grid_size: float,
    feat: torch.Tensor | None = None,
) -> GridSampled:
    """Voxelise each event of a packed batch at `grid_size` (same units as coord), PTv3-style: cells are counted
    from each event's minimum corner. Cells come out sorted by (event, x, y, z)."""
    if grid_size <= 0:
        raise ValueError(f"grid_size must be positive, got {grid_size}")
    batch = offset_to_batch(offset)
    start = coord.new_zeros(len(offset), 3).scatter_reduce(
        0, batch[:, None].expand(-1, 3), coord, "amin", include_self=False
    )
    grid = torch.floor((coord - start[batch]) / grid_size).long()
    cell_batch, cell_grid, inverse = unique_cells(batch, grid)
    m = len(cell_batch)
    mean = segment_mean(coord, inverse, m)
    f = feat if feat is not None else coord.new_zeros(len(coord), 0)
    f = f[:, None] if f.ndim == 1 else f
    feat_sum = torch.zeros(m, f.shape[1], dtype=f.dtype, device=f.device).index_add_(0, inverse, f)
    return GridSampled(mean, cell_grid, feat_sum, batch_to_offset(cell_batch, len(offset)), inverse)
