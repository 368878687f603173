"""Patch attention (SDPA path) against a plain softmax reference built patch by patch from the definition."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from raysvc.ops.attention import make_patches, patch_attention


def reference(qkv: torch.Tensor, sizes: list[int], k: int) -> torch.Tensor:
    """Per event: chunks of k in order; the last chunk of an event longer than k is filled with the points k
    positions earlier; plain softmax(q k^T / sqrt(d)) v inside each chunk; a point keeps its first output."""
    out = torch.zeros(qkv.shape[0], qkv.shape[2], qkv.shape[3], dtype=qkv.dtype)
    start = 0
    for n in sizes:
        pts = list(range(start, start + n))
        if n > k:
            while len(pts) % k:
                pts.append(pts[len(pts) - k])
            chunks = [pts[i : i + k] for i in range(0, len(pts), k)]
        else:
            chunks = [pts] if pts else []
        done = set()
        for chunk in chunks:
            q, kk, v = (qkv[chunk, i] for i in range(3))  # (L, H, D)
            att = torch.einsum("lhd,mhd->hlm", q, kk) / math.sqrt(qkv.shape[-1])
            o = torch.einsum("hlm,mhd->lhd", att.softmax(-1), v)
            for row, p in enumerate(chunk):
                if p not in done:
                    out[p] = o[row]
                    done.add(p)
        start += n
    return out


@pytest.mark.parametrize(
    "sizes, k", [([10, 3, 25], 8), ([8, 16], 8), ([1], 4), ([40, 7, 9, 33], 16), ([3, 0, 5], 8), ([16, 32], 16)]
)
def test_sdpa_path_matches_reference(sizes, k):
    torch.manual_seed(sum(sizes))
    qkv = torch.randn(sum(sizes), 3, 2, 4, dtype=torch.float64)
    patches = make_patches(torch.cumsum(torch.tensor(sizes), 0), k)
    out = patch_attention(qkv, patches, use_flash=False)
    torch.testing.assert_close(out, reference(qkv, sizes, k))


def test_padding_layout():
    p = make_patches(torch.tensor([10, 13]), 4)  # event of 10 -> 12 slots; event of 3 -> one patch of 3
    assert p.index.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 6, 7, 10, 11, 12]
    assert p.lengths.tolist() == [4, 4, 4, 3]
    assert p.first.tolist() == list(range(10)) + [12, 13, 14]


def test_flash_requested_without_flash_attn_is_a_clear_error():
    from raysvc.ops import attention

    if attention.flash_attn_varlen_qkvpacked_func is not None:
        pytest.skip("flash-attn installed")
    with pytest.raises(RuntimeError, match="flash_attn is not installed"):
        patch_attention(torch.randn(4, 3, 1, 2), make_patches(torch.tensor([4]), 4), use_flash=True)


def _patches_by_loop(offset: list[int], k: int) -> tuple[list[int], list[int], list[int]]:
    """The layout event by event, as the module's docstring states it: (index, lengths, first)."""
    index, lengths, start = [], [], 0
    for end in offset:
        n = end - start
        if 0 < n <= k:
            index += range(start, end)
            lengths.append(n)
        elif n > k:
            n_pad = -(-n // k) * k
            index += [start + j if j < n else start + j - k for j in range(n_pad)]
            lengths += [k] * (n_pad // k)
        start = end
    first = [index.index(p) for p in range(offset[-1] if offset else 0)]
    return index, lengths, first


@pytest.mark.parametrize("k", [1, 4, 7])
def test_patch_layout_matches_the_event_loop(k):
    rng = np.random.default_rng(k)
    for _ in range(20):
        sizes = rng.integers(0, 4 * k + 3, size=rng.integers(0, 6)).tolist()
        offset = np.cumsum(sizes).tolist()
        p = make_patches(torch.tensor(offset, dtype=torch.long), k)
        index, lengths, first = _patches_by_loop(offset, k)
        assert (p.index.tolist(), p.lengths.tolist(), p.first.tolist()) == (index, lengths, first), sizes
        rows = torch.repeat_interleave(torch.tensor(lengths, dtype=torch.long), torch.tensor(lengths, dtype=torch.long))
        assert p.full_rows.tolist() == (rows == k).nonzero().flatten().tolist()
        assert p.short_rows.tolist() == (rows != k).nonzero().flatten().tolist()
        assert p.short_lengths.tolist() == [n for n in lengths if n != k]
        assert p.max_length == max(lengths, default=0)
        short = [n for n in lengths if n != k]
        assert p.short_patch.tolist() == [i for i, n in enumerate(short) for _ in range(n)]
        assert p.short_col.tolist() == [c for n in short for c in range(n)]


def test_decreasing_offsets_are_a_clear_error():
    with pytest.raises(ValueError, match="non-decreasing"):
        make_patches(torch.tensor([5, 3]), 4)
