"""Range checks of integer coordinates on a device, each made once per tensor.

On a device a bound is checked with `torch._assert_async` (reading the bounds back would stall the host), six
launches per check. A level's grid is checked by its kernel map, each of its serialization orders and its pooling;
here a tensor whose values were already checked (or are known) to lie in a range that contains the one asked for
is not checked again, as long as it was not modified in place since."""

from __future__ import annotations

import torch
from torch.utils.weak import WeakTensorKeyDictionary

_known = WeakTensorKeyDictionary()  # tensor -> (its version when checked, lo, hi)


def mark_range(t: torch.Tensor, lo: int, hi: int) -> None:
    """Record that every value of `t` lies in [lo, hi) (checked, or true by construction). Not for inference-mode
    tensors, which have no version counter to tell an in-place change: they are checked each time."""
    if not t.is_inference():
        _known[t] = (t._version, lo, hi)


def known_in(t: torch.Tensor, lo: int, hi: int) -> bool:
    got = _known.get(t)
    return got is not None and got[0] == t._version and lo <= got[1] and got[2] <= hi


def assert_range_async(t: torch.Tensor, lo: int, hi: int, message: str) -> None:
    """Assert on the device that every value of `t` lies in [lo, hi), unless that is already known."""
    if not t.numel() or known_in(t, lo, hi):
        return
    torch._assert_async((t.min() >= lo) & (t.max() < hi), message)
    mark_range(t, lo, hi)
