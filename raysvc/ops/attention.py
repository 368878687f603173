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

import numpy as np
import torch
import torch.nn.functional as F

from raysvc.ops.packed import host_list

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
    max_length: int | None = None  # the longest patch, known on the host (flash-attn's max_seqlen)
    short_patch: torch.Tensor | None = None  # (n_short_rows,) each short row's patch among the short ones
    short_col: torch.Tensor | None = None  # (n_short_rows,) its place in that patch


def make_patches(offset: torch.Tensor, size: int) -> Patches:
    """Patch layout for a packed batch whose points are already in serialized order. The layout's size depends on
    the event sizes, so the offsets are read to the host once; the layout is computed there and sent back in one
    copy (a loop over events here cost ~20 device ops and 3 syncs per level and pass)."""
    ends = host_list(offset)
    n = np.diff(np.asarray(ends, dtype=np.int64), prepend=0)
    if (n < 0).any():
        raise ValueError(f"offset must be non-decreasing cumulative point counts, got {ends}")
    starts = np.cumsum(n) - n
    # an event of more than K points is padded to a multiple of K; one of at most K points is one patch of its size
    slots = np.where(n > size, -(-n // size) * size, n)
    slot_starts = np.cumsum(slots) - slots
    event = np.repeat(np.arange(len(n)), slots)
    j = np.arange(slots.sum()) - slot_starts[event]  # slot within its event
    # slot j < n is the event's point j; a padded slot repeats the point K positions earlier (j - K < n)
    index = starts[event] + j - size * (j >= n[event])
    point_event = np.repeat(np.arange(len(n)), n)
    first = np.arange(n.sum()) - starts[point_event] + slot_starts[point_event]
    patch_len = np.minimum(n, size)
    lengths = np.repeat(patch_len, np.where(n > 0, slots // np.maximum(patch_len, 1), 0))
    full_row = patch_len[event] == size
    short_lengths = patch_len[(n > 0) & (n < size)]
    short_patch = np.repeat(np.arange(len(short_lengths)), short_lengths)
    short_col = np.arange(len(short_patch)) - (np.cumsum(short_lengths) - short_lengths)[short_patch]
    parts = [index, lengths, first, np.flatnonzero(full_row), np.flatnonzero(~full_row), short_lengths]
    parts += [short_patch, short_col]
    packed = torch.from_numpy(np.concatenate(parts)).to(offset.device)
    bounds = np.cumsum([0, *(len(a) for a in parts)]).tolist()
    views = [packed[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    max_length = int(lengths.max()) if len(lengths) else 0
    return Patches(*views[:3], size, *views[3:6], max_length, *views[6:])


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
        longest = patches.max_length if patches.max_length is not None else int(patches.lengths.max())
        out = flash_attn_varlen_qkvpacked_func(packed, cu, longest, softmax_scale=scale)
        out = out.to(qkv.dtype)
        return out[patches.first]
    k = patches.size
    parts = []  # (rows of `padded`, their outputs)
    one_kind = not len(patches.full_rows) or not len(patches.short_rows)  # then its rows are all rows, in order
    if len(patches.full_rows):  # (num_full, H, K, D) straight from the padded rows; no mask
        rows = padded if one_kind else padded[patches.full_rows]
        q, kk, v = rows.view(-1, k, 3, h, d).permute(2, 0, 3, 1, 4)
        full = F.scaled_dot_product_attention(q, kk, v, scale=scale)
        parts.append((patches.full_rows, full.transpose(1, 2).reshape(-1, h, d)))
    if len(patches.short_rows):
        rows = padded if one_kind else padded[patches.short_rows]
        where = (patches.short_patch, patches.short_col) if patches.short_patch is not None else None
        parts.append((patches.short_rows, _masked_attention(rows, patches.short_lengths, k, scale, where)))
    if not parts:
        return qkv.new_zeros(n, h, d)
    if one_kind:
        return parts[0][1][patches.first]
    out = parts[0][1].new_empty(len(padded), h, d)  # the dtype SDPA gave (bf16 under autocast)
    for rows, values in parts:
        out[rows] = values.to(out.dtype)
    return out[patches.first]


def _masked_attention(
    rows: torch.Tensor,
    lengths: torch.Tensor,
    k: int,
    scale: float | None,
    where: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Attention within patches shorter than K (rows (R, 3, H, D), patch after patch): each patch's rows go into a
    (num, K) grid and a length mask hides the empty slots (K, not the longest length, to avoid a device sync).
    `where`: each row's (patch, column) in that grid, as `make_patches` computed them on the host."""
    _, _, h, d = rows.shape
    num = len(lengths)
    if where is None:
        row = torch.repeat_interleave(torch.arange(num, device=rows.device), lengths, output_size=len(rows))
        starts = torch.cumsum(lengths, 0) - lengths
        col = torch.arange(len(row), device=rows.device) - starts[row]
    else:
        row, col = where
    grid = rows.new_zeros(num, k, 3, h, d)
    grid[row, col] = rows
    valid = torch.zeros(num, k, dtype=torch.bool, device=rows.device)
    valid[row, col] = True
    q, kk, v = (grid[:, :, i].transpose(1, 2) for i in range(3))  # (num, H, K, D)
    out = F.scaled_dot_product_attention(q, kk, v, attn_mask=valid[:, None, None, :], scale=scale)
    return out.transpose(1, 2)[row, col]
