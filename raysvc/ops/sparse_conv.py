"""Submanifold sparse 3x3x3 convolution (the xCPE kernel of PTv3), CPU-safe, any device.

Gather-GEMM: a neighbour table (N, 27) is built once per coordinate set (sorted keys + searchsorted); a layer then
gathers the 27 neighbour features of every active site and does one matmul. There is no scatter in the forward
pass, so no race between threads: spconv's CPU scatter-add returns wrong sums with more than one OpenMP thread
(DESIGN.md). The backward pass is torch's own (index_select -> index_add), which is correct with any thread count.

Weights use spconv 2.x's layout (Cout, kx, ky, kz, Cin), so that published checkpoints map onto them directly;
kernel index (a, b, c) reads the neighbour at offset (a-1, b-1, c-1), as dense conv3d with padding 1 does.
"""

from __future__ import annotations

import math

import torch
from torch import nn

OFFSETS = torch.tensor([(a - 1, b - 1, c - 1) for a in range(3) for b in range(3) for c in range(3)])
_BITS = 20  # per axis in the key; coordinates are shifted by +1 so that offsets of -1 stay non-negative


def kernel_map(grid_coord: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """(N, 27) index of the active neighbour at each kernel offset, -1 where the site is empty."""
    g = grid_coord.long() + 1
    if g.numel() and (g.min() < 1 or g.max() >= (1 << _BITS) - 1):
        raise ValueError(f"grid coordinates must lie in [0, {(1 << _BITS) - 2})")

    def key(c: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (((b.long() << _BITS | c[..., 0]) << _BITS | c[..., 1]) << _BITS) | c[..., 2]

    keys = key(g, batch)
    sorted_keys, perm = torch.sort(keys)
    query = key(g[:, None, :] + OFFSETS.to(g.device)[None], batch[:, None].expand(-1, 27))
    pos = torch.searchsorted(sorted_keys, query).clamp(max=len(keys) - 1)
    found = sorted_keys[pos] == query
    return torch.where(found, perm[pos], torch.full_like(pos, -1))


def subm_conv3d(feat: torch.Tensor, nbr: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                chunk: int = 16384) -> torch.Tensor:  # fmt: skip
    """out[i] = bias + sum_k weight[:, k] . feat[nbr[i, k]] over the existing neighbours; weight (Cout,3,3,3,Cin)."""
    cout, cin = weight.shape[0], weight.shape[-1]
    w = weight.reshape(cout, 27, cin).permute(1, 2, 0).reshape(27 * cin, cout)
    padded = torch.cat([feat, feat.new_zeros(1, cin)])  # row N is zeros: empty sites gather it
    idx = torch.where(nbr >= 0, nbr, torch.full_like(nbr, len(feat)))
    outs = []
    for start in range(0, len(feat), chunk):
        block = idx[start: start + chunk]
        outs.append(padded.index_select(0, block.reshape(-1)).reshape(len(block), 27 * cin) @ w)
    out = torch.cat(outs) if outs else feat.new_zeros(0, cout)
    return out + bias if bias is not None else out


class SubMConv3d(nn.Module):
    """Submanifold 3x3x3 convolution on a precomputed kernel map (see `kernel_map`)."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_channels, 3, 3, 3, in_channels))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        nn.init.kaiming_uniform_(self.weight.view(out_channels, -1), a=math.sqrt(5))

    def forward(self, feat: torch.Tensor, nbr: torch.Tensor) -> torch.Tensor:
        return subm_conv3d(feat, nbr, self.weight, self.bias)
