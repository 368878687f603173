"""Ray Data pipeline (local Ray, real SeaweedFS) against the direct pyarrow path; into Ray Train workers."""

from __future__ import annotations

import numpy as np
import pytest

from raysvc.data.contract.schema import EventDataError, table_from_events
from raysvc.data.streaming.config import DataConfig
from raysvc.data.streaming.pipeline import DirectStream, build_dataset, iter_packed
from raysvc.data.streaming.shards import shard_name, write_manifest, write_shard
from raysvc.storage import resolve
from tests.conftest import make_event


def _collect(batches):
    ids, pts, feat = [], 0, 0.0
    for b in batches:
        assert b["offset"][-1] == b["coord"].shape[0] == b["semantic"].shape[0]
        ids += b["event_id"].tolist()
        pts += int(b["offset"][-1])
        feat += float(b["feat"].double().sum())
    return ids, pts, feat


def test_ray_path_equals_direct_path(ray_local, synthetic_dataset):
    cfg = DataConfig(uri=synthetic_dataset.uri, batch_events=5)
    direct = DirectStream(cfg)
    d_ids, d_pts, d_feat = _collect(direct.iter_packed())
    stream = build_dataset(cfg)
    r_ids, r_pts, r_feat = _collect(iter_packed(stream.dataset, cfg.batch_events))
    assert sorted(r_ids) == sorted(d_ids) and len(set(r_ids)) == len(r_ids)
    assert r_pts == d_pts and r_feat == pytest.approx(d_feat, rel=1e-9)
    rep, drep = stream.report(), direct.report()
    r_sec, d_sec = rep.pop("task_seconds"), drep.pop("task_seconds")
    assert rep == drep
    assert set(r_sec) == set(d_sec) == {"read", "preprocess"} and min(r_sec.values()) > 0
    assert rep["events_read"] == 120 == rep["events_out"] + rep["cut_min_points"]
    assert rep["cut_min_points"] > 0  # the generator makes some small events: they are counted, not lost


def test_subset_through_ray(ray_local, synthetic_dataset):
    small = build_dataset(DataConfig(uri=synthetic_dataset.uri, subset_events=20, subset_seed=4))
    big = build_dataset(DataConfig(uri=synthetic_dataset.uri, subset_events=60, subset_seed=4))
    s_ids = set(_collect(iter_packed(small.dataset, 8))[0])
    b_ids = set(_collect(iter_packed(big.dataset, 8))[0])
    assert s_ids <= b_ids
    assert set(small.prepared.keep_ids) <= set(big.prepared.keep_ids)
    rep = small.report()
    assert rep["selected_out"] == 100 and rep["events_out"] + rep["cut_min_points"] == 20


def test_s3_dataset_through_ray(ray_local, s3_env, tmp_path):
    from raysvc.data.sources.synthetic import generate_dataset

    uri = f"s3://pipeline-test/{tmp_path.name}"
    generate_dataset(resolve(uri), 24, seed=9, shard_events=8, show_progress=False)
    cfg = DataConfig(uri=uri)
    r = _collect(iter_packed(build_dataset(cfg).dataset, 4))
    d = _collect(DirectStream(cfg).iter_packed())
    assert sorted(r[0]) == sorted(d[0]) and r[1] == d[1]


def _dataset_with_bad_event(path, bad=True):
    rng = np.random.default_rng(0)
    root = resolve(str(path))
    recs = []
    for s in range(2):
        evs = [make_event(s * 4 + i, 1200, rng) for i in range(4)]
        if s == 1 and bad:
            evs[2]["coord"][10] = [1.0, np.nan, 3.0]
        recs.append(write_shard(root, shard_name(s), table_from_events(evs, "t")))
    write_manifest(root, recs, {})
    return root


def test_bad_event_error_names_shard_and_event_through_ray(ray_local, tmp_path):
    root = _dataset_with_bad_event(tmp_path / "bad")
    stream = build_dataset(DataConfig(uri=root.uri))
    with pytest.raises(EventDataError, match=r"events-00001.parquet, row 2, event_id 6, field 'coord'") as e:
        _collect(iter_packed(stream.dataset, 4))
    assert (e.value.kind, e.value.event_id) == ("nonfinite", 6)  # the real error type crosses from the Ray task


def test_bad_event_skipped_and_counted_through_ray(ray_local, tmp_path):
    root = _dataset_with_bad_event(tmp_path / "bad")
    stream = build_dataset(DataConfig(uri=root.uri, preprocess={"on_bad": "skip"}))
    ids = _collect(iter_packed(stream.dataset, 4))[0]
    assert sorted(ids) == [0, 1, 2, 3, 4, 5, 7]
    rep = stream.report()
    assert rep["skipped_bad"] == {"nonfinite": 1} and rep["events_out"] == 7


def test_preflight_fails_before_streaming_or_skips_and_counts(ray_local, tmp_path):
    root = _dataset_with_bad_event(tmp_path / "trunc", bad=False)
    loc = root.join(shard_name(0))
    with open(loc.path, "r+b") as f:
        f.truncate(100)
    with pytest.raises(EventDataError, match="events-00000.parquet.*truncated"):
        build_dataset(DataConfig(uri=root.uri))
    cfg = DataConfig(uri=root.uri, preprocess={"on_bad": "skip"})
    stream = build_dataset(cfg)
    assert sorted(_collect(iter_packed(stream.dataset, 4))[0]) == [4, 5, 6, 7]
    direct = DirectStream(cfg)
    assert sorted(_collect(direct.iter_packed())[0]) == [4, 5, 6, 7]
    for rep in (stream.report(), direct.report()):
        assert rep["skipped_bad"] == {"corrupt": 4} and rep["events_read"] == 8 and rep["events_out"] == 4


def test_bad_config_fails_fast_naming_field():
    from raysvc.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="preprocess.min_pointz"):
        load_config(DataConfig, sets=["uri=/x", "preprocess.min_pointz=3"])
    with pytest.raises(ConfigError, match="uri"):
        load_config(DataConfig, sets=["batch_events=4"])
    with pytest.raises(ConfigError, match="batch_events"):
        load_config(DataConfig, sets=["uri=/x", "batch_events=many"])


def test_train_workers_receive_every_event_once(ray_local, synthetic_dataset, tmp_path):
    import json
    from pathlib import Path

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from raysvc.demo.ingest import ExactSplitDataConfig, ingest_loop

    cfg = DataConfig(uri=synthetic_dataset.uri, block_mib=0.5)
    stream = build_dataset(cfg)
    trainer = TorchTrainer(
        ingest_loop,
        train_loop_config={"batch_events": 4, "num_classes": 5},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        torch_config=TorchConfig(backend="gloo"),
        datasets={"train": stream.dataset},
        dataset_config=ExactSplitDataConfig(),
        run_config=RunConfig(name="ingest-test", storage_path=str(tmp_path)),
    )
    result = trainer.fit()
    with result.checkpoint.as_directory() as d:
        got = json.loads(Path(d, "ingest.json").read_text())
    want_ids, want_pts, _ = _collect(DirectStream(cfg).iter_packed())
    assert got["event_ids"] == sorted(want_ids)  # every event, exactly once, none dropped by the split
    assert got["points"] == want_pts
    assert all(w["events"] > 0 for w in got["workers"])  # both workers got data


def _flip_byte(loc, at=200):
    data = bytearray(open(loc.path, "rb").read())
    data[at] ^= 0x01
    open(loc.path, "wb").write(bytes(data))


def test_corrupt_shard_named_or_skipped_and_counted(ray_local, tmp_path):
    clean = _dataset_with_bad_event(tmp_path / "corrupt-only", bad=False)
    _flip_byte(clean.join(shard_name(0)))  # same size: preflight passes, the sha256 check in the read task does not
    with pytest.raises(EventDataError, match=r"events-00000.parquet.*sha256"):
        _collect(iter_packed(build_dataset(DataConfig(uri=clean.uri)).dataset, 4))

    root = _dataset_with_bad_event(tmp_path / "corrupt")
    _flip_byte(root.join(shard_name(0)))
    stream = build_dataset(DataConfig(uri=root.uri, preprocess={"on_bad": "skip"}))
    assert sorted(_collect(iter_packed(stream.dataset, 4))[0]) == [4, 5, 7]
    rep = stream.report()
    assert rep["skipped_bad"] == {"corrupt": 4, "nonfinite": 1} and rep["events_read"] == 8
