"""Submanifold sparse 3x3x3 convolution (the xCPE kernel of PTv3), CPU-safe, any device.

Gather-GEMM: a neighbour table (N, 27) is built once per coordinate set (sorted keys + searchsorted; numba on CPU)
and shared by every convolution on it (`NeighbourMap`: missing neighbours point at a zero row appended to the
features). A layer is then one gather of the (N, 27 * Cin) neighbourhoods and one GEMM with the (27 * Cin, Cout)
weight, a fixed number of ops whatever the data: on a GPU the step is launch-bound, and the per-offset loop it
replaces (`KernelPairs`, kept for comparison) issued ~235 ops per convolution with its backward and one `nonzero`
sync per offset. The backward pass is the same shape (`_SubMConv`): the input gradient is the convolution of the
output gradient with the flipped, transposed kernel (the neighbour of i at offset k has i at offset 26 - k), a gather
and a GEMM again, so every sum runs in a fixed order with no scatter-add: exact on any thread count (tested against
dense conv3d on 2 threads; spconv's CPU scatter-add is not, DESIGN.md).

Weights use spconv 2.x's layout (Cout, kx, ky, kz, Cin), so that published checkpoints map onto them directly;
kernel index (a, b, c) reads the neighbour at offset (a-1, b-1, c-1), as dense conv3d with padding 1 does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from raysvc.ops import cpu_kernels
from raysvc.ops.paths import cpu_path
from raysvc.ops.ranges import assert_range_async

OFFSETS = torch.tensor([(a - 1, b - 1, c - 1) for a in range(3) for b in range(3) for c in range(3)])
# Bits per axis in the key; coordinates are shifted by +1 so that offsets of -1 stay non-negative. The event index
# takes the 63 - 3 * 17 = 12 bits above them (up to 4,096 events or views a batch). With 20 bits per axis it had 3:
# event 16's key wrapped onto event 0's, and events 16 apart in a batch saw each other's sites as neighbours.
_BITS = 17
MAX_EVENTS = 1 << (63 - 3 * _BITS)


def kernel_map(grid_coord: torch.Tensor, batch: torch.Tensor, num_events: int | None = None) -> torch.Tensor:
    """(N, 27) index of the active neighbour at each kernel offset, -1 where the site is empty. `num_events`
    (known on the host: the length of the offsets) bounds the event index without a check on the device."""
    if num_events is not None and num_events > MAX_EVENTS:
        raise ValueError(f"a batch holds at most {MAX_EVENTS} events (or views) for the kernel map, got {num_events}")
    if not cpu_path(grid_coord):  # checked on the device: reading the bounds back would stall the host
        assert_range_async(grid_coord.long(), 0, (1 << _BITS) - 2, "grid coordinates out of range")
        if num_events is None:
            assert_range_async(batch.long(), 0, MAX_EVENTS, f"at most {MAX_EVENTS} events a batch")
    g = grid_coord.long() + 1
    if g.numel() and cpu_path(g):
        if g.min() < 1 or g.max() >= (1 << _BITS) - 1:
            raise ValueError(f"grid coordinates must lie in [0, {(1 << _BITS) - 2})")
        if num_events is None and (batch.min() < 0 or batch.max() >= MAX_EVENTS):
            raise ValueError(f"a batch holds at most {MAX_EVENTS} events (or views) for the kernel map")

    def key(c: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (((b.long() << _BITS | c[..., 0]) << _BITS | c[..., 1]) << _BITS) | c[..., 2]

    keys = key(g, batch)
    if cpu_path(keys):
        return torch.from_numpy(cpu_kernels.kernel_map(keys.contiguous().numpy(), _BITS))
    sorted_keys, perm = torch.sort(keys)
    # every field stays in [0, 2^20) under an offset of +-1, so a neighbour's key is the site's plus a constant
    query = keys[:, None] + _offset_keys(g.device)[None]
    pos = torch.searchsorted(sorted_keys, query).clamp(max=len(keys) - 1)
    found = sorted_keys[pos] == query
    return torch.where(found, perm[pos], torch.full_like(pos, -1))


_OFFSET_KEYS: dict[torch.device, torch.Tensor] = {}


def _offset_keys(device: torch.device) -> torch.Tensor:
    """(27,) what each kernel offset adds to a site's key."""
    if device not in _OFFSET_KEYS:
        _OFFSET_KEYS[device] = ((OFFSETS[:, 0] << _BITS) + OFFSETS[:, 1] << _BITS) + OFFSETS[:, 2]
        _OFFSET_KEYS[device] = _OFFSET_KEYS[device].to(device)
    return _OFFSET_KEYS[device]


@dataclass
class NeighbourMap:
    """The (N, 27) neighbour table of one coordinate set with missing neighbours at index N (the zero row appended
    to the features): built once per batch and level and shared by every convolution on it."""

    num_sites: int
    index: torch.Tensor  # (N * 27,) int64, site-major

    @classmethod
    def from_map(cls, nbr: torch.Tensor) -> NeighbourMap:
        n = len(nbr)
        return cls(n, torch.where(nbr >= 0, nbr, n).reshape(-1))


def _gather(x: torch.Tensor, nmap: NeighbourMap) -> torch.Tensor:
    """(N, 27 * C): row i holds x at site i's 27 neighbours, zeros where there is none."""
    return F.pad(x, (0, 0, 0, 1)).index_select(0, nmap.index).view(nmap.num_sites, -1)


class _SubMConv(torch.autograd.Function):
    """out = gather(feat) @ W + b with a backward of the same shape. Saves the features, not the (N, 27 * Cin)
    gathered rows (27x larger): the backward gathers them again."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, feat, weight, bias, nmap):
        ctx.save_for_backward(feat, weight)
        ctx.nmap, ctx.has_bias = nmap, bias is not None
        w = weight.reshape(weight.shape[0], -1)  # (Cout, 27 * Cin), offset-major like the gathered rows
        return F.linear(_gather(feat, nmap), w, bias)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_out):
        feat, weight = ctx.saved_tensors
        nmap = ctx.nmap
        cout, cin = weight.shape[0], weight.shape[-1]
        grad_feat = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            # site j receives grad_out[i] . W[:, k] from each i that has j at offset k, i.e. j's neighbour at 26 - k
            w_t = weight.reshape(cout, 27, cin).flip(1).transpose(0, 1).reshape(27 * cout, cin)
            grad_feat = (_gather(grad_out, nmap) @ w_t.to(grad_out.dtype)).to(feat.dtype)
        if ctx.needs_input_grad[1]:
            gathered = _gather(feat.to(grad_out.dtype), nmap)
            grad_w = (grad_out.t() @ gathered).view(weight.shape).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum(0).to(weight.dtype)
        return grad_feat, grad_w, grad_b, None


@dataclass
class KernelPairs:
    """Per kernel offset k, the (output site, input site) pairs that exist: the earlier per-offset path, kept to
    compare against (`raysvc bench ops`). Each output site appears at most once per offset."""

    num_sites: int
    pairs: list[tuple[torch.Tensor, torch.Tensor]]  # 27 x (out_idx, in_idx); offset 13 (the centre) is the identity

    @classmethod
    def from_map(cls, nbr: torch.Tensor) -> KernelPairs:
        pairs = []
        for k in range(27):
            out_idx = (nbr[:, k] >= 0).nonzero().squeeze(1)
            pairs.append((out_idx, nbr[out_idx, k]))
        return cls(len(nbr), pairs)


def _subm_conv3d_pairs(feat: torch.Tensor, kp: KernelPairs, weight: torch.Tensor, bias: torch.Tensor | None):
    """One GEMM per offset on the pairs that exist, added into the output with index_add_ (exact on any thread
    count: each output row occurs once per offset)."""
    cout, cin = weight.shape[0], weight.shape[-1]
    # unbind, not w[k]: 27 selects would each build a zero-filled full-size gradient in backward
    w = weight.reshape(cout, 27, cin).permute(1, 2, 0).unbind(0)  # 27 x (Cin, Cout)
    out = feat @ w[13]  # the centre offset: every site is its own neighbour
    for k, (out_idx, in_idx) in enumerate(kp.pairs):
        if k != 13 and len(out_idx):
            out.index_add_(0, out_idx, feat.index_select(0, in_idx) @ w[k])
    return out + bias if bias is not None else out


def subm_conv3d(
    feat: torch.Tensor,
    kmap: torch.Tensor | NeighbourMap | KernelPairs,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """out[i] = bias + sum_k weight[:, k] . feat[nbr[i, k]] over the existing neighbours; weight (Cout,3,3,3,Cin).
    `kmap`: the (N, 27) table of `kernel_map`, or what a level built from it once (`NeighbourMap`, or `KernelPairs`
    for the per-offset path)."""
    if isinstance(kmap, KernelPairs):
        return _subm_conv3d_pairs(feat, kmap, weight, bias)
    nmap = kmap if isinstance(kmap, NeighbourMap) else NeighbourMap.from_map(kmap)
    return _SubMConv.apply(feat, weight, bias, nmap)


class SubMConv3d(nn.Module):
    """Submanifold 3x3x3 convolution on a precomputed kernel map (see `kernel_map`)."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_channels, 3, 3, 3, in_channels))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        nn.init.kaiming_uniform_(self.weight.view(out_channels, -1), a=math.sqrt(5))

    def forward(self, feat: torch.Tensor, kmap: torch.Tensor | NeighbourMap | KernelPairs) -> torch.Tensor:
        return subm_conv3d(feat, kmap, self.weight, self.bias)
