"""Packed collate vs per-event concatenation; nested, seeded label subsets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raysvc.data.streaming.collate import collate_packed
from raysvc.data.streaming.subset import event_keys, select_subset
from tests.conftest import make_table


def test_collate_matches_concatenation():
    table, events = make_table(5, points=(5, 40), seed=2)
    b = collate_packed(table.slice(1, 3))  # a slice: offsets must not leak from the parent
    sel = events[1:4]
    counts = [len(e["energy"]) for e in sel]
    assert b["offset"].tolist() == np.cumsum(counts).tolist()
    assert b["event_id"].tolist() == [e["event_id"] for e in sel]
    np.testing.assert_array_equal(b["coord"].numpy(), np.concatenate([e["coord"] for e in sel]))
    np.testing.assert_array_equal(b["energy"][:, 0].numpy(), np.concatenate([e["energy"] for e in sel]))
    np.testing.assert_array_equal(b["semantic"].numpy(), np.concatenate([e["semantic"] for e in sel]))
    np.testing.assert_array_equal(b["batch"].numpy(), np.repeat(np.arange(3), counts))
    assert torch.equal(b["feat"], torch.cat([b["coord"], b["energy"]], 1))
    assert b["semantic"].dtype == torch.int64 and b["feat"].dtype == torch.float32


def test_subsets_nested_deterministic_and_exact():
    ids = np.random.default_rng(0).permutation(5000).astype(np.int64) * 7 + 3
    s10, s100, s1000 = (select_subset(ids, seed=11, n=n) for n in (10, 100, 1000))
    assert (len(s10), len(s100), len(s1000)) == (10, 100, 1000)
    assert set(s10) <= set(s100) <= set(s1000)
    assert np.array_equal(s100, select_subset(ids[::-1].copy(), seed=11, n=100))  # independent of order
    assert not np.array_equal(s100, select_subset(ids, seed=12, n=100))
    assert np.array_equal(select_subset(ids, seed=11, fraction=0.02), s100)


def test_subset_is_uniform_over_ids():
    ids = np.arange(100_000, dtype=np.int64)
    chosen = select_subset(ids, seed=1, n=10_000)
    hist = np.histogram(chosen, bins=10, range=(0, 100_000))[0]
    assert hist.min() > 850 and hist.max() < 1150  # ~1000 per decile
    assert len(np.unique(event_keys(ids, 1))) == len(ids)


@pytest.mark.parametrize(
    "kw, words", [({"n": 0}, "subset of 0"), ({"n": 11}, "has 10"), ({"fraction": 1.5}, "(0, 1]"), ({}, "exactly one")]
)
def test_subset_bad_requests(kw, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace("]", r"\]")):
        select_subset(np.arange(10), seed=0, **kw)


class _Blocks:
    """Stands in for a Ray DataIterator: yields given Arrow blocks (iter_batches with batch_size=None)."""

    def __init__(self, blocks):
        self.blocks = blocks

    def iter_batches(self, batch_size, batch_format, prefetch_batches):
        assert batch_size is None and batch_format == "pyarrow"
        yield from self.blocks


@pytest.mark.parametrize("sizes, batch", [([7, 3, 10, 1, 4], 4), ([2, 2, 2], 5), ([9], 3), ([1, 1, 1, 1], 2)])
def test_iter_packed_rebatching_keeps_every_event_in_order(sizes, batch):
    from raysvc.data.streaming.pipeline import iter_packed

    table, _ = make_table(sum(sizes), points=(3, 9), seed=7)
    blocks, at = [], 0
    for n in sizes:
        blocks.append(table.slice(at, n))
        at += n
    got = list(iter_packed(_Blocks(blocks), batch))
    ids = [i for b in got for i in b["event_id"].tolist()]
    assert ids == table.column("event_id").to_pylist()
    assert all(len(b["event_id"]) == batch for b in got[:-1]) and 0 < len(got[-1]["event_id"]) <= batch
    whole = collate_packed(table)
    assert torch.equal(torch.cat([b["feat"] for b in got]), whole["feat"])
    dropped = list(iter_packed(_Blocks(blocks), batch, drop_last=True))
    assert all(len(b["event_id"]) == batch for b in dropped)
