"""Helpers for packed batches: `offset` is the cumulative point count per event (offset[-1] == N)."""

from __future__ import annotations

import torch


def offset_to_batch(offset: torch.Tensor) -> torch.Tensor:
    """(N,) event index of every point."""
    counts = torch.diff(offset, prepend=offset.new_zeros(1))
    return torch.repeat_interleave(torch.arange(len(offset), device=offset.device), counts)


def batch_to_offset(batch: torch.Tensor, num_events: int | None = None) -> torch.Tensor:
    n = int(batch.max()) + 1 if num_events is None and len(batch) else (num_events or 0)
    return torch.cumsum(torch.bincount(batch, minlength=n), 0)


def event_slices(offset: torch.Tensor) -> list[slice]:
    bounds = [0, *offset.tolist()]
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
