"""spconv as a backend for the submanifold 3x3x3 convolution: spconv-cu120 on CUDA, and spconv's CPU build only as
a single-threaded baseline.

Our weights already use spconv 2.x's layout (Cout, 3, 3, 3, Cin) and its output rows follow the input rows for
submanifold convolutions, so the same parameters run through either path (tested against dense conv3d).
spconv's CPU build has two known faults (DESIGN.md): its backward asks for a CUDA stream even on CPU, and its
scatter-add races with more than one OpenMP thread. `cpu_baseline()` works around the first and refuses the second.
"""

from __future__ import annotations

import contextlib
import functools

import torch


@functools.cache
def _spconv():
    try:
        import spconv.pytorch as sp
        from spconv.pytorch import ops as sp_ops
    except Exception:  # not installed, or a wheel that does not match this torch
        return None
    return sp, sp_ops


def cuda_available() -> bool:
    """spconv importable and CUDA present: the model's sparse conv then runs through spconv."""
    return _spconv() is not None and torch.cuda.is_available()


@contextlib.contextmanager
def cpu_baseline():
    """Let spconv's CPU build run forward and backward; only with torch on one thread, where its scatter is exact."""
    mods = _spconv()
    if mods is None:
        raise RuntimeError("spconv is not importable; install the `spconv` wheel pinned in pyproject.toml")
    if torch.get_num_threads() != 1:
        raise RuntimeError(
            f"spconv's CPU scatter-add races with {torch.get_num_threads()} threads and returns wrong "
            "sums; call torch.set_num_threads(1) first"
        )
    ops = mods[1]
    saved = ops.get_current_stream
    ops.get_current_stream = lambda: 0  # the CPU kernels never use the stream
    try:
        yield
    finally:
        ops.get_current_stream = saved


def subm_conv3d(
    feat: torch.Tensor,
    grid_coord: torch.Tensor,
    batch: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    cache: dict | None = None,
) -> torch.Tensor:
    """Same result as `sparse_conv.subm_conv3d`, through spconv. `cache` (one dict per coordinate set) keeps spconv's
    index pairs between layers, as its `indice_key` does."""
    mods = _spconv()
    if mods is None:
        raise RuntimeError("spconv is not importable")
    sp = mods[0]
    cout, cin = weight.shape[0], weight.shape[-1]
    indices = torch.cat([batch[:, None], grid_coord], 1).int().contiguous()
    shape = (grid_coord.max(0).values + 1).tolist() if len(grid_coord) else [1, 1, 1]
    batch_size = int(batch.max()) + 1 if len(batch) else 1
    x = sp.SparseConvTensor(feat, indices, shape, batch_size)
    if cache is not None:
        x.indice_dict = cache
    conv = sp.SubMConv3d(cin, cout, 3, bias=bias is not None, indice_key="raysvc_subm").to(feat.device)
    del conv.weight
    conv.weight = weight  # share our parameter: gradients flow to it
    if bias is not None:
        del conv.bias
        conv.bias = bias
    y = conv(x)
    if cache is not None:
        cache.update(y.indice_dict)
    return y.features
