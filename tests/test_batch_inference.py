"""Batch inference as Ray Data jobs (`raysvc predict` / `raysvc evaluate` with --actors): the actor pool gives the
predictions and metrics of the in-process path, bit for bit, to file:// and to s3:// (SeaweedFS)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raysvc.data.streaming.shards import load_manifest, read_shard
from raysvc.inference.batch import chunks, evaluate_dataset, predict_dataset
from raysvc.inference.record import export_seeded_segmenter
from raysvc.storage import S3Options, read_bytes, resolve

quiet = lambda m: None  # noqa: E731


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    loc = resolve(str(tmp_path_factory.mktemp("model") / "seeded"))
    export_seeded_segmenter(loc, seed=0)
    return loc


def test_chunks_cover_every_event_in_order_within_both_bounds(synthetic_dataset):
    table = read_shard(synthetic_dataset, load_manifest(synthetic_dataset).shards[0])
    points = table.column("num_points").to_numpy()
    for batch_events, max_points in ((8, 10**9), (30, 5000), (4, 1)):
        got = list(chunks(table, batch_events, max_points))
        starts = [s for s, _ in got]
        sizes = [c.num_rows for _, c in got]
        assert starts == list(np.cumsum([0] + sizes[:-1])) and sum(sizes) == table.num_rows
        for s, c in got:
            assert c.num_rows <= batch_events
            assert c.num_rows == 1 or points[s : s + c.num_rows].sum() <= max_points  # one big event goes alone
            assert c.column("event_id").to_pylist() == table.column("event_id").to_pylist()[s : s + c.num_rows]
            if s + c.num_rows < table.num_rows and c.num_rows < batch_events:  # cut early only by the points bound
                assert points[s : s + c.num_rows + 1].sum() > max_points
    assert max(len(list(chunks(table, 30, 5000))), 1) > 1  # the points bound does cut this shard


def _files(out) -> pa.Table:
    info = json.loads((out / "manifest.json").read_text())
    return info, pa.concat_tables([pq.read_table(out / f) for f in info["files"]])


def test_predict_and_evaluate_through_an_actor_pool_equal_the_in_process_path(
    ray_local, synthetic_dataset, model, tmp_path
):
    kw = {"batch_events": 6, "max_points": 20000, "log": quiet}
    local = predict_dataset(model, synthetic_dataset, resolve(str(tmp_path / "local")), actors=0, **kw)
    pool = predict_dataset(
        model, synthetic_dataset, resolve(str(tmp_path / "pool")), actors=2, cpus_per_actor=0.5, **kw
    )
    # the same bytes, shard for shard; every event of every shard, in input order
    assert [s["sha256"] for s in pool["shards"]] == [s["sha256"] for s in local["shards"]]
    info, preds = _files(tmp_path / "pool")
    inputs = pa.concat_tables([read_shard(synthetic_dataset, r) for r in load_manifest(synthetic_dataset).shards])
    assert info["events"] == inputs.num_rows == preds.num_rows and info["actors"] == 2
    assert preds.column("event_id").to_pylist() == inputs.column("event_id").to_pylist()
    assert preds.column("num_points").to_pylist() == inputs.column("num_points").to_pylist()
    assert set(preds.column_names) >= {"event_id", "pred"}
    for f in info["shards"]:
        assert (tmp_path / "pool" / f["name"]).stat().st_size == f["bytes"]

    ev = {"batch_events": 5, "max_points": 20000, "log": quiet}
    a = evaluate_dataset(model, synthetic_dataset, actors=0, **ev)
    b = evaluate_dataset(model, synthetic_dataset, actors=2, cpus_per_actor=0.5, **ev)
    assert a["confusion"] == b["confusion"] and a["events"] == b["events"] and a["miou"] == b["miou"]
    assert a["events"]["events_read"] == 120 and sum(map(sum, a["confusion"])) > 0
    # --max-events: the first N events in shard order, on both paths
    c = evaluate_dataset(model, synthetic_dataset, actors=0, max_events=40, **ev)
    d = evaluate_dataset(model, synthetic_dataset, actors=1, cpus_per_actor=0.5, max_events=40, **ev)
    assert c["events"]["events_read"] == d["events"]["events_read"] == 40 and c["confusion"] == d["confusion"]


def test_predictions_from_and_to_s3_through_the_actor_pool(ray_local, s3_env, model, tmp_path):
    """Events on SeaweedFS, read by the Ray Data read tasks (sha256 checked), predictions written back to it."""
    from raysvc.data.sources.synthetic import generate_dataset

    s3 = S3Options(endpoint_url=s3_env.endpoint)
    data, out = resolve("s3://batch-in/events", s3), resolve("s3://batch-out/seeded", s3)
    generate_dataset(data, 40, seed=8, shard_events=20, workers=1, show_progress=False)
    info = predict_dataset(model, data, out, actors=1, cpus_per_actor=0.5, log=quiet)
    local = predict_dataset(model, data, resolve(str(tmp_path / "local")), actors=0, log=quiet)
    manifest = json.loads(read_bytes(out.join("manifest.json")))
    assert manifest["files"] == local["files"] == ["preds-00000.parquet", "preds-00001.parquet"]
    assert [s["sha256"] for s in manifest["shards"]] == [s["sha256"] for s in local["shards"]]
    got = pq.read_table(pa.BufferReader(read_bytes(out.join("preds-00001.parquet"))))
    assert got.num_rows == 20 and info["events"] == 40


def test_the_chunks_of_one_shard_are_shared_by_every_actor_of_the_pool(ray_local, model, tmp_path):
    """A read task's chunks would leave it as one block, which Ray Data hands whole to one actor. 2 x 0.75 CPU
    leaves the read tasks their 0.25 and nothing more: a 1-CPU step between read and pool would wait forever."""
    from raysvc.data.sources.synthetic import generate_dataset

    data = resolve(str(tmp_path / "one-shard"))
    generate_dataset(data, 12, seed=5, shard_events=12, workers=1, show_progress=False)
    kw = {"batch_events": 2, "log": quiet}
    info = predict_dataset(model, data, resolve(str(tmp_path / "pool")), actors=2, cpus_per_actor=0.75, **kw)
    local = predict_dataset(model, data, resolve(str(tmp_path / "local")), actors=0, **kw)
    assert len(info["shards"]) == 1 and info["shards"][0]["sha256"] == local["shards"][0]["sha256"]
    assert sum(info["chunks_per_actor"]) == 6 and len(info["chunks_per_actor"]) == 2, info["chunks_per_actor"]
    assert local["chunks_per_actor"] == [] and info["actor_nodes"] == 1


def test_an_actor_pool_that_leaves_no_cpu_for_reading_is_refused(ray_local, synthetic_dataset, model, tmp_path):
    with pytest.raises(ValueError, match="leave no room for the read tasks"):
        predict_dataset(model, synthetic_dataset, resolve(str(tmp_path / "p")), actors=2, cpus_per_actor=1, log=quiet)


def test_a_predict_waiting_for_cpus_says_so_then_runs_with_the_cpus_the_reads_leave(
    ray_local, model, tmp_path, monkeypatch, capfd
):
    """`raysvc predict --actors 1` (no --cpus-per-actor) while an actor holds both CPUs of the 2-CPU Ray: within
    seconds the console says what the work waits for; once the CPUs are free the predict runs, its actor on the
    1.75 CPUs that the read tasks (0.25) leave, and its predictions equal the in-process path's."""
    import threading
    import time

    import ray

    from raysvc.cli import main
    from raysvc.data.sources.synthetic import generate_dataset

    data = resolve(str(tmp_path / "events"))
    generate_dataset(data, 8, seed=6, shard_events=8, workers=1, show_progress=False)

    @ray.remote(num_cpus=2)
    class Hog:
        def ping(self) -> int:
            return 1

    hog = Hog.remote()
    ray.get(hog.ping.remote())
    monkeypatch.chdir(tmp_path)  # the command's log file goes under runs/logs/ here
    out = tmp_path / "preds"
    args = ["predict", "--model", model.path, "--data", data.path, "--out", str(out), "--actors", "1"]
    failed = []
    t0 = time.monotonic()
    run = threading.Thread(target=lambda: failed.extend(_raised(main, args)))
    run.start()
    said = None
    while said is None and time.monotonic() - t0 < 30:
        time.sleep(0.5)
        logs = list((tmp_path / "runs" / "logs").glob("predict-*.log"))
        if logs and "waiting" in logs[0].read_text():
            said = time.monotonic() - t0
    ray.kill(hog)
    run.join(timeout=300)
    assert not run.is_alive() and not failed, failed
    console = capfd.readouterr().err
    assert said is not None and said < 12, f"no waiting line within 12 s: {console}"
    print(f"the waiting line came {said:.1f} s after the command started")
    line = next(x for x in console.splitlines() if "waiting" in x)
    assert "1 x {CPU: 1.75}" in line and "0 of 2 CPU free" in line, line
    assert "1 model actor(s) on cpu, 1.75 CPU each" in console and "resources free" in console
    assert "\x1b" not in console
    local = predict_dataset(model, data, resolve(str(tmp_path / "local")), actors=0, log=quiet)
    info = json.loads((out / "manifest.json").read_text())
    assert [s["sha256"] for s in info["shards"]] == [s["sha256"] for s in local["shards"]]


def _raised(fn, *args) -> list:
    try:
        fn(*args)
    except BaseException as e:  # SystemExit included: the thread reports it to the test
        return [e]
    return []
