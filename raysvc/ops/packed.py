"""Helpers for packed batches: `offset` is the cumulative point count per event (offset[-1] == N)."""

from __future__ import annotations

import torch
from torch.utils.weak import WeakTensorKeyDictionary

from raysvc.ops.paths import cpu_path
from raysvc.ops.ranges import assert_range_async, mark_range

_on_host = WeakTensorKeyDictionary()  # tensor -> (its version when read, its values as a list)


def host_list(t: torch.Tensor) -> list:
    """`t.tolist()`, read back from the device once per tensor (and version): a level's offsets are read by its
    attention patches, then again by every neighbour search over the level; each read makes the host wait."""
    if t.is_inference():  # no version counter to tell an in-place change: read it each time
        return t.tolist()
    got = _on_host.get(t)
    if got is not None and got[0] == t._version:
        return got[1]
    values = t.tolist()
    _on_host[t] = (t._version, values)
    return values


def known_on_host(t: torch.Tensor, values: list) -> torch.Tensor:
    """Record that `t` (made on the device from values the host knows) holds `values`; returns `t`."""
    if not t.is_inference():
        _on_host[t] = (t._version, list(values))
    return t


def offset_to_batch(offset: torch.Tensor, num_points: int | None = None) -> torch.Tensor:
    """(N,) event index of every point; given N (`num_points`), without reading the offsets back from a device."""
    counts = torch.diff(offset, prepend=offset.new_zeros(1))
    return torch.repeat_interleave(torch.arange(len(offset), device=offset.device), counts, output_size=num_points)


def counts(index: torch.Tensor, n: int) -> torch.Tensor:
    """(n,) int64 occurrences of each value of `index` in [0, n): bincount with a size known on the host, so that
    nothing is read back from a device (bincount's output size depends on the data)."""
    return torch.zeros(n, dtype=torch.long, device=index.device).index_add_(0, index, torch.ones_like(index))


def batch_to_offset(batch: torch.Tensor, num_events: int | None = None) -> torch.Tensor:
    n = int(batch.max()) + 1 if num_events is None and len(batch) else (num_events or 0)
    return torch.cumsum(counts(batch.long(), n), 0)


def segment_mean(values: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    """(n, C) mean of the rows of `values` (N, C) per segment `index` (N,) in [0, n): per-event or per-cell means."""
    sums = torch.zeros(n, values.shape[1], dtype=values.dtype, device=values.device).index_add_(0, index, values)
    return sums / counts(index.long(), n).to(values.dtype)[:, None]


def event_slices(offset: torch.Tensor) -> list[slice]:
    bounds = [0, *host_list(offset)]
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def unique_cells(batch: torch.Tensor, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unique (event, cell) pairs sorted by (event, x, y, z): (cell batch, cell grid (M, 3), inverse (N,)).
    One int64 key per point (16 bits per axis, the rest for the event) instead of torch.unique(dim=0), which
    sorts rows lexicographically and was measured ~10x slower."""
    g = grid.long()
    if not cpu_path(g):  # checked on the device: reading the bounds back would stall the host
        assert_range_async(g, 0, 1 << 16, "cell coordinates must lie in [0, 65536)")
    elif g.numel() and (g.min() < 0 or g.max() >= 1 << 16):
        raise ValueError(f"cell coordinates must lie in [0, 65536), got [{int(g.min())}, {int(g.max())}]")
    key = (batch.long() << 48) | (g[:, 0] << 32) | (g[:, 1] << 16) | g[:, 2]
    cells, inverse = torch.unique(key, return_inverse=True)
    # any member's grid is its cell's (3 launches, against 7 to unpack the key's fields)
    member = torch.empty_like(cells).scatter_(0, inverse, torch.arange(len(g), device=g.device))
    grid_out = g[member]
    mark_range(grid_out, 0, 1 << 16)  # 16-bit fields: the next level's checks need no launch
    return cells >> 48, grid_out, inverse


class _PermuteRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, perm, inverse):
        ctx.save_for_backward(inverse)
        return x[perm]

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad[inverse], None, None


def permute_rows(x: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """x[perm] for a permutation `perm` with its `inverse`: the gradient is gathered back through the inverse (one
    launch) instead of scattered into zeros (two, and a sort-based kernel on CUDA)."""
    return _PermuteRows.apply(x, perm, inverse)
