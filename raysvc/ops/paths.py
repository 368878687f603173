"""Which path an op takes: the numba kernels on CPU tensors, whole-array torch code on other devices.

`device_path()` makes CPU tensors take the device path too, so that `raysvc bench launches` can count on a CPU the
ops a GPU step would launch (the numba kernels would hide them in one call)."""

from __future__ import annotations

import contextlib

import torch

_replay = False


def numba_path(t: torch.Tensor) -> bool:
    """True where `t` should go through the numba kernels: a CPU tensor outside `device_path()`."""
    return t.device.type == "cpu" and not _replay


@contextlib.contextmanager
def device_path():
    global _replay
    saved, _replay = _replay, True
    try:
        yield
    finally:
        _replay = saved
