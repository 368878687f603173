"""The two training loaders (`data.loader`: Ray tasks, Ray Data): the same events and view tensors in the same order
per rank, exact resume from a (shard, row) position, and each shard's cut counts counted once."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
import torch

from raysvc.data.streaming.collate import collate_packed
from raysvc.data.streaming.config import DataConfig
from raysvc.data.streaming.pipeline import DirectStream
from raysvc.data.streaming.prepared import prepare, rank_shards
from raysvc.data.streaming.views import ViewConfig, collate_view_table, views_table
from raysvc.train.worker import RankStream

LOADERS = ("tasks", "ray_data")
CUTS = {"min_points": 300}  # cuts a few events, so that the counts have something to count


def views_feed(epoch: int):
    return views_table, {"cfg": ViewConfig(local_views=2), "seed": 5, "epoch": epoch}


def stream(root, loader: str, rank: int, world: int, views: bool, position=(0, 0, 0), per_rank: int = 4):
    cfg = DataConfig(uri=root.uri, loader=loader, preprocess=CUTS)
    collate, feed = (collate_view_table, views_feed) if views else (collate_packed, None)
    return RankStream(cfg, prepare(cfg), rank, world, 7, per_rank, collate, feed, position)


def take(s: RankStream, n: int) -> tuple[list[dict], list[tuple]]:
    it = iter(s)
    batches, positions = [], []
    for b in itertools.islice(it, n):
        batches.append(b)
        positions.append(s.position())
    it.close()
    return batches, positions


def flat(batch: dict) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in batch.items():
        if isinstance(v, dict):
            out |= {f"{k}.{kk}": vv for kk, vv in v.items()}
        elif v is not None:
            out[k] = v
    return out


def assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        fx, fy = flat(x), flat(y)
        assert fx.keys() == fy.keys()
        for k in fx:
            assert fx[k].dtype == fy[k].dtype and torch.equal(fx[k], fy[k]), k


@pytest.mark.parametrize("views", [False, True], ids=["events", "views"])
def test_both_loaders_deliver_the_same_batches_in_the_same_order_per_rank(ray_local, synthetic_dataset, views):
    """Two ranks over 4 shards of 30 events, 4 events a step: 20 steps cross the epoch boundary (one epoch is 14 full
    batches of the rank's 59 or 60 events after cuts), so the next epoch's seeded shard order is compared too."""
    for rank in (0,) if views else (0, 1):  # (views cost ~10x more to make; rank 1's shards differ only by index)
        got = {loader: take(stream(synthetic_dataset, loader, rank, 2, views), 20) for loader in LOADERS}
        (a, pos_a), (b, pos_b) = got["tasks"], got["ray_data"]
        assert_same(a, b)
        assert pos_a == pos_b and pos_a[-1][0] == 1  # into the second epoch
        # the rank's own shards, in its seeded order for epoch 0: an independent read of the same events
        prep = prepare(DataConfig(uri=synthetic_dataset.uri, preprocess=CUTS))
        direct = DirectStream(DataConfig(uri=synthetic_dataset.uri, preprocess=CUTS), prep)
        by_name = {rec.name: t for rec, t in zip(prep.manifest.shards, direct.tables(), strict=True)}
        ids = [
            e
            for rec in rank_shards(prep, rank, 2, 0, 7, shuffle=True)
            for e in by_name[rec.name]["event_id"].to_pylist()
        ]
        assert [e for x in a[:14] for e in x["event_id"].tolist()] == ids[:56]


@pytest.mark.parametrize("loader", LOADERS)
def test_a_stream_resumed_from_its_position_continues_exactly_and_counts_each_shard_once(
    ray_local, synthetic_dataset, loader
):
    whole_stream = stream(synthetic_dataset, loader, 1, 2, views=False)
    whole, positions = take(whole_stream, 18)
    for k in (5, 14):  # inside the first shard; the epoch's last batch (the resumed shard has too few rows left)
        first = stream(synthetic_dataset, loader, 1, 2, views=False)
        take(first, k)
        assert first.position() == positions[k - 1]
        again = stream(synthetic_dataset, loader, 1, 2, views=False, position=first.position())
        again.counts.update(first.counts)  # what a checkpoint carries
        rest, _ = take(again, 18 - k)
        assert_same(rest, whole[k:])
        assert again.counts == whole_stream.counts, k
    # every shard read once per epoch: epoch 0 whole (2 shards) plus the first shard of epoch 1
    assert whole_stream.counts["read"] == 90
    cut = Counter(whole_stream.counts)["cut:min_points"]
    assert whole_stream.counts["out"] == 90 - cut


@pytest.mark.parametrize("loader", LOADERS)
def test_a_resumed_stream_starts_at_its_row_of_its_shard(ray_local, synthetic_dataset, loader):
    """Position (epoch 0, shard 1, row 10): the next batch is rows 10-13 of the rank's second shard (after cuts), and
    that shard's counts, counted before the checkpoint, are not counted again."""
    prep = prepare(DataConfig(uri=synthetic_dataset.uri, preprocess=CUTS))
    second = rank_shards(prep, 0, 2, 0, 7, shuffle=True)[1]
    tables = dict(
        zip(
            [r.name for r in prep.manifest.shards],
            DirectStream(DataConfig(uri=synthetic_dataset.uri, preprocess=CUTS), prep).tables(),
            strict=True,
        )
    )
    s = stream(synthetic_dataset, loader, 0, 2, views=False, position=(0, 1, 10))
    (batch,), (position,) = take(s, 1)
    assert batch["event_id"].tolist() == tables[second.name]["event_id"].to_pylist()[10:14]
    assert position == (0, 1, 14) and s.counts["read"] == 0
