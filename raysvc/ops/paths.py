"""Which path an op takes: on CPU tensors the fastest code for a CPU (numba kernels, the per-offset sparse
convolution), on other devices whole-array torch code in few, fixed ops (a GPU step is launch-bound).

`device_path()` makes CPU tensors take the device path too, so that `raysvc bench launches` can count on a CPU the
ops a GPU step would launch."""

from __future__ import annotations

import contextlib

import torch

_replay = False


def cpu_path(t: torch.Tensor) -> bool:
    """True where `t` should take the CPU path: a CPU tensor outside `device_path()`."""
    return t.device.type == "cpu" and not _replay


@contextlib.contextmanager
def device_path():
    global _replay
    saved, _replay = _replay, True
    try:
        yield
    finally:
        _replay = saved
