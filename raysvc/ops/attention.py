"""Patch attention over serialized point order (PTv3).

Points of each event, in serialized order, are cut into patches of K. An event with more than K points is padded
to a multiple of K by repeating points from K positions earlier (the previous patch), as PTv3 does; an event with K
points or fewer is one shorter patch. Attention runs inside each patch: torch SDPA with a length mask on any device,
or flash-attn varlen on CUDA when it is importable (the same patches, as cu_seqlens). Each point's output is taken
from its first occurrence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

try:  # the GPU extra
    from flash_attn import flash_attn_varlen_qkvpacked_func
except ImportError:  # pragma: no cover - CPU machines
    flash_attn_varlen_qkvpacked_func = None


@dataclass
class Patches:
    index: torch.Tensor  # (P,) positions in serialized order, patch after patch (with repeats)
    lengths: torch.Tensor  # (num_patches,) K, or the event's size when it has at most K points
    first: torch.Tensor  # (N,) for each serialized position, its first slot in `index`
    size: int  # K


def make_patches(offset: torch.Tensor, size: int) -> Patches:
    """Patch layout for a packed batch whose points are already in serialized order."""
    index, lengths = [], []
    start = 0
    for end in offset.tolist():
        n = end - start
        if n <= size:
            index.append(torch.arange(start, end))
            if n:
                lengths.append(n)
        else:
            n_pad = -(-n // size) * size
            # the padding repeats the points K positions earlier (j - K < n for every padded slot j)
            index.append(torch.cat([torch.arange(start, end), torch.arange(end - size, start + n_pad - size)]))
            lengths.extend([size] * (n_pad // size))
        start = end
    index_t = torch.cat(index) if index else torch.zeros(0, dtype=torch.long)
    n_total = int(offset[-1]) if len(offset) else 0
    # first occurrence of each point (amin is deterministic where a plain indexed write with repeats is not)
    first = torch.full((n_total,), len(index_t), dtype=torch.long).scatter_reduce(
        0, index_t, torch.arange(len(index_t)), "amin"
    )
    return Patches(
        index_t.to(offset.device),
        torch.tensor(lengths, dtype=torch.long, device=offset.device),
        first.to(offset.device),
        size,
    )


def patch_attention(
    qkv: torch.Tensor, patches: Patches, scale: float | None = None, use_flash: bool | None = None
) -> torch.Tensor:
    """qkv (N, 3, H, D) in serialized order -> attention output (N, H, D)."""
    n, _, h, d = qkv.shape
    padded = qkv[patches.index]  # (P, 3, H, D)
    flash = use_flash if use_flash is not None else (flash_attn_varlen_qkvpacked_func is not None and qkv.is_cuda)
    if flash:
        if flash_attn_varlen_qkvpacked_func is None:
            raise RuntimeError("use_flash=True but flash_attn is not installed (pip install 'raysvc[gpu]')")
        cu = F.pad(torch.cumsum(patches.lengths, 0), (1, 0)).int()
        packed = padded.half() if padded.dtype == torch.float32 else padded  # flash-attn takes fp16/bf16
        out = flash_attn_varlen_qkvpacked_func(packed, cu, int(patches.lengths.max()), softmax_scale=scale)
        out = out.to(qkv.dtype)
        return out[patches.first]
    k = patches.size
    num = len(patches.lengths)
    # place each patch's rows into a (num, K) grid; short patches (small events) are masked
    row = torch.repeat_interleave(torch.arange(num, device=qkv.device), patches.lengths)
    starts = torch.cumsum(patches.lengths, 0) - patches.lengths
    col = torch.arange(len(row), device=qkv.device) - starts[row]
    grid = qkv.new_zeros(num, k, 3, h, d)
    grid[row, col] = padded
    valid = torch.zeros(num, k, dtype=torch.bool, device=qkv.device)
    valid[row, col] = True
    q, kk, v = (grid[:, :, i].transpose(1, 2) for i in range(3))  # (num, H, K, D)
    mask = valid[:, None, None, :]  # keys that exist
    out = F.scaled_dot_product_attention(q, kk, v, attn_mask=mask, scale=scale)  # (num, H, K, D)
    out = out.transpose(1, 2)[row, col]  # back to padded rows (P, H, D)
    return out[patches.first]
