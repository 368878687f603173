"""Patch attention over serialized point order (PTv3).

Points of each event, in serialized order, are cut into patches of K. An event with more than K points is padded to a
multiple of K by repeating points from K positions earlier (the previous patch), as PTv3 does; an event with K points or
fewer is one shorter patch. Attention runs inside each patch: flash-attn varlen on CUDA when it is importable (the same
patches, as cu_seqlens), else torch SDPA. SDPA takes the full patches without a mask, so that on CUDA it may pick its
own flash kernel (which refuses any attn_mask), and only the short patches with a length mask. Each point's output is
taken from its first occurrence. This is the reference implementation's flash-path patching (fixed K; its non-flash
path shrinks K to the batch's smallest event instead), so that published checkpoints give their numbers here.
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
    full_rows: torch.Tensor  # rows of `index` that belong to patches of exactly K
    short_rows: torch.Tensor  # the other rows (events of fewer than K points), patch after patch
    short_lengths: torch.Tensor  # (n_short,) lengths of those patches


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
    lengths_t = torch.tensor(lengths, dtype=torch.long)
    full_row = (lengths_t == size).repeat_interleave(lengths_t)
    dev = offset.device
    return Patches(
        index_t.to(dev),
        lengths_t.to(dev),
        first.to(dev),
        size,
        full_row.nonzero().flatten().to(dev),
        (~full_row).nonzero().flatten().to(dev),
        lengths_t[lengths_t != size].to(dev),
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
    parts = []  # (rows of `padded`, their outputs)
    if len(patches.full_rows):  # (num_full, H, K, D) straight from the padded rows; no mask
        q, kk, v = padded[patches.full_rows].view(-1, k, 3, h, d).permute(2, 0, 3, 1, 4)
        full = F.scaled_dot_product_attention(q, kk, v, scale=scale)
        parts.append((patches.full_rows, full.transpose(1, 2).reshape(-1, h, d)))
    if len(patches.short_rows):
        short = _masked_attention(padded[patches.short_rows], patches.short_lengths, k, scale)
        parts.append((patches.short_rows, short))
    if not parts:
        return qkv.new_zeros(n, h, d)
    out = parts[0][1].new_empty(len(padded), h, d)  # the dtype SDPA gave (bf16 under autocast)
    for rows, values in parts:
        out[rows] = values.to(out.dtype)
    return out[patches.first]


def _masked_attention(rows: torch.Tensor, lengths: torch.Tensor, k: int, scale: float | None) -> torch.Tensor:
    """Attention within patches shorter than K (rows (R, 3, H, D), patch after patch): each patch's rows go into a
    (num, K) grid and a length mask hides the empty slots (K, not the longest length, to avoid a device sync)."""
    _, _, h, d = rows.shape
    num = len(lengths)
    row = torch.repeat_interleave(torch.arange(num, device=rows.device), lengths)
    starts = torch.cumsum(lengths, 0) - lengths
    col = torch.arange(len(row), device=rows.device) - starts[row]
    grid = rows.new_zeros(num, k, 3, h, d)
    grid[row, col] = rows
    valid = torch.zeros(num, k, dtype=torch.bool, device=rows.device)
    valid[row, col] = True
    q, kk, v = (grid[:, :, i].transpose(1, 2) for i in range(3))  # (num, H, K, D)
    out = F.scaled_dot_product_attention(q, kk, v, attn_mask=valid[:, None, None, :], scale=scale)
    return out.transpose(1, 2)[row, col]
