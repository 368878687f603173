"""Faults injected into real components, each ending with nothing lost: the object store (SeaweedFS) stopped and
restarted under a running fine-tune, or gone for longer than the retry budget; shards corrupted on S3 after their
manifest was written (bytes flipped, truncated, deleted) under both bad-input policies; the run's local storage
full when a checkpoint is written. (A SIGKILLed Train worker: test_train / test_pretrain.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from raysvc.data.streaming.shards import load_manifest, shard_name
from raysvc.inference.record import load_export
from raysvc.seaweed import SeaweedS3
from raysvc.storage import S3Options, resolve

RAYSVC = str(Path(sys.executable).parent / "raysvc")
JOB = str(Path(__file__).parents[1] / "jobs" / "semseg-tiny.yaml")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A SeaweedFS of this module's own (the tests stop and restart it) holding a 16-event training set in 4 shards
    and an 8-event validation set."""
    from raysvc.data.sources.synthetic import generate_dataset

    server = SeaweedS3(data_dir=str(tmp_path_factory.mktemp("weed"))).start()
    try:
        for name, n, seed, per in (("train", 16, 31, 4), ("val", 8, 32, 8)):
            generate_dataset(_s3(server, f"s3://faults/{name}"), n, seed=seed, shard_events=per, show_progress=False)
        yield server
    finally:
        server.stop()


def _s3(server: SeaweedS3, uri: str):
    return resolve(
        uri, S3Options(endpoint_url=server.endpoint, access_key=server.access_key, secret_key=server.secret_key)
    )


def _finetune(
    server: SeaweedS3,
    data: str,
    storage: Path,
    name: str,
    log: Path,
    *sets: str,
    env: dict | None = None,
    verbose: bool = False,
) -> subprocess.Popen:
    args = [
        f"data.uri={data}",
        "val_data.uri=s3://faults/val",
        f"run.storage={storage}",
        f"run.name={name}",
        "scaling.workers=1",
        "scaling.cpus_per_worker=1",
        "scaling.torch_threads=1",
        "train.batch_events=2",
        "train.steps=24",
        "train.val_every=24",
        "train.val_events=4",
        "train.checkpoint_every=8",
        "train.log_every=2",
        "run.max_failures=0",
        "run.wandb_mode=disabled",
        "data.read_cpus=0.25",
        "val_data.read_cpus=0.25",
        *sets,
    ]
    full_env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | server.env() | (env or {})
    cmd = [RAYSVC, "finetune", JOB, *[a for s in args for a in ("--set", s)], *(["--verbose"] if verbose else [])]
    return subprocess.Popen(cmd, env=full_env, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def _wait_for(log: Path, text: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while text not in log.read_text(errors="replace"):
        assert proc.poll() is None, f"ended before {text!r}:\n{log.read_text()[-3000:]}"
        assert time.time() < deadline, f"no {text!r} within {timeout} s"
        time.sleep(0.2)


def _done(proc: subprocess.Popen, log: Path, timeout: float = 600) -> str:
    proc.wait(timeout=timeout)
    text = log.read_text(errors="replace")
    assert proc.returncode == 0, text[-4000:]
    return text


def _weights(storage: Path, name: str) -> dict:
    return load_export(resolve(str(storage / name)))[0]


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def straight(store, tmp_path_factory):
    """The fine-tune undisturbed: (weights, data counts) that the faulted runs must end with."""
    root = tmp_path_factory.mktemp("straight")
    log = root / "straight.log"
    console = _done(_finetune(store, "s3://faults/train", root, "straight", log), log)
    # the console: raysvc's own lines; Ray's (start-up, checkpoints, its workers' prefixes) are in the run's log
    assert "[raysvc] step 24/24" in console and "pid=" not in console and "Checkpoint successfully" not in console
    (ray_log,) = (root / "straight" / "logs").glob("console-*.log")
    assert f"Ray's own output: {ray_log}" in console
    assert "Checkpoint successfully created" in ray_log.read_text() and "(RayTrainWorker pid=" in ray_log.read_text()
    return _weights(root, "straight"), json.loads((root / "straight" / "summary.json").read_text())["data"]


@pytest.mark.slow
@pytest.mark.long
def test_object_store_restarted_mid_run_the_run_continues_with_the_same_events(store, straight, tmp_path):
    want, want_data = straight

    # down for 12 s from step 6: every shard read in that time fails, is retried with backoff, and succeeds later
    log = tmp_path / "restarted.log"
    proc = _finetune(store, "s3://faults/train", tmp_path, "restarted", log)
    _wait_for(log, "step 6/24", proc)
    store.stop(keep_data=True)
    time.sleep(12)
    store.start()
    text = _done(proc, log)
    assert "retry 1 in 0.5 s" in text and "s3://faults/train/events-" in text  # the retries were said
    assert _equal(_weights(tmp_path, "restarted"), want)
    got_data = json.loads((tmp_path / "restarted" / "summary.json").read_text())["data"]
    assert {k: got_data[k] for k in ("events_read", "events_out", "skipped_bad")} == {
        k: want_data[k] for k in ("events_read", "events_out", "skipped_bad")
    }


@pytest.mark.slow
def test_object_store_gone_past_the_retry_budget_stops_the_run_with_a_named_error(store, tmp_path):
    log = tmp_path / "gone.log"
    proc = _finetune(
        store, "s3://faults/train", tmp_path, "gone", log, env={"RAYSVC_STORAGE_RETRY_S": "6"}, verbose=True
    )
    _wait_for(log, "step 4/24", proc)
    store.stop(keep_data=True)
    try:
        proc.wait(timeout=300)
    finally:
        store.start()
    text = log.read_text(errors="replace")
    assert proc.returncode != 0
    assert "the object store did not answer" in text and "RAYSVC_STORAGE_RETRY_S=6" in text
    assert "s3://faults/train/events-" in text
    assert "raysvc: error: training failed on rank 0" in text  # the CLI's own verdict, not only a traceback
    assert "(TrainController pid=" in text  # --verbose: Ray's own lines on the console too


def _silently_flipped(data: bytes) -> bytes:
    """`data` (a Parquet shard) with one bit flipped from the middle on, at the first place where the file still
    decodes, to other values: the corruption that only the manifest's checksum can see."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    want = pq.read_table(pa.BufferReader(data))
    for at in range(len(data) // 2, len(data)):
        flipped = bytearray(data)
        flipped[at] ^= 0x01
        try:
            got = pq.read_table(pa.BufferReader(bytes(flipped)))
        except (pa.ArrowException, OSError):
            continue
        if not got.equals(want):
            return bytes(flipped)
    raise AssertionError("no bit flip leaves this shard readable")


def _corrupt_copy(server: SeaweedS3, name: str) -> tuple[str, dict[str, int]]:
    """A copy of the training set on S3 with a bit of shard 1 flipped (same size, still valid Parquet with other
    values: only the checksum sees it), shard 2 truncated and shard 3 deleted, all after its manifest was written.
    Returns (uri, events per shard)."""
    src, dst = _s3(server, "s3://faults/train"), _s3(server, f"s3://faults/{name}")
    manifest = load_manifest(src)
    for f in ("manifest.json", *(r.name for r in manifest.shards)):
        src.fs.copy_file(src.join(f).path, dst.join(f).path)
    flipped = _silently_flipped(src.fs.open_input_file(src.join(shard_name(1)).path).read())
    with dst.fs.open_output_stream(dst.join(shard_name(1)).path) as f:
        f.write(flipped)
    whole = src.fs.open_input_file(src.join(shard_name(2)).path).read()
    with dst.fs.open_output_stream(dst.join(shard_name(2)).path) as f:
        f.write(whole[: len(whole) // 2])
    dst.fs.delete_file(dst.join(shard_name(3)).path)
    return f"s3://faults/{name}", {r.name: r.events for r in manifest.shards}


@pytest.mark.slow
@pytest.mark.long
def test_shards_corrupted_on_s3_are_a_named_error_or_a_counted_skip(store, tmp_path):
    uri, events = _corrupt_copy(store, "corrupt")

    # on_bad=error: the first bad shard the driver's preflight finds stops the job, named
    log = tmp_path / "error.log"
    proc = _finetune(store, uri, tmp_path, "error", log)
    proc.wait(timeout=300)
    text = log.read_text(errors="replace")
    assert proc.returncode == 2 and f"{uri}/{shard_name(2)}" in text and "truncated" in text, text[-3000:]

    # on_bad=skip: the preflight leaves out the truncated and the deleted shard; the flipped one passes it (same
    # size, intact footer) and is caught by its checksum each time it is read. Every skipped event is counted.
    log = tmp_path / "skip.log"
    _done(_finetune(store, uri, tmp_path, "skip", log, "data.preprocess.on_bad=skip"), log)
    data = json.loads((tmp_path / "skip" / "summary.json").read_text())["data"]
    bad = data["skipped_bad"]
    assert bad["missing"] == events[shard_name(3)]
    corrupt_reads = (bad["corrupt"] - events[shard_name(2)]) / events[shard_name(1)]
    assert corrupt_reads >= 1 and corrupt_reads == int(corrupt_reads)  # shard 1 whole, once per read
    assert (
        data["events_read"]
        == data["selected_out"] + data["skipped_bad_total"] + data["cut_min_points"] + data["events_out"]
    )
    assert data["events_out"] > 0


def test_a_shard_deleted_after_the_preflight_is_missing_not_a_storage_failure(store, monkeypatch):
    """Between the driver's preflight and a worker's read, a shard disappears: under on_bad=error the read names it
    as missing; under skip its events are counted as bad:missing."""
    from raysvc.data.contract.schema import EventDataError
    from raysvc.data.streaming.config import DataConfig
    from raysvc.data.streaming.prepared import prepare
    from raysvc.data.streaming.reader import read_preprocessed

    uri, events = _corrupt_copy(store, "deleted-later")
    for k, v in store.env().items():
        monkeypatch.setenv(k, v)
    cfg = DataConfig(uri=uri, preprocess={"on_bad": "skip"})
    prep = prepare(cfg)
    rec = next(r for r in prep.manifest.shards if r.name == shard_name(0))
    prep.root.fs.delete_file(prep.root.join(rec.name).path)
    _, counts, _ = read_preprocessed(prep.root, rec, cfg.preprocess, None, True, prep.detector)
    assert counts == {"read": events[rec.name], "bad:missing": events[rec.name]}
    with pytest.raises(EventDataError, match=f"{uri}/{rec.name}.*missing"):
        read_preprocessed(prep.root, rec, cfg.preprocess.model_copy(update={"on_bad": "error"}), None, True)


@pytest.fixture
def small_disk(tmp_path):
    """A 64 MiB tmpfs: room for one tiny-model checkpoint (~40 MiB), not two. Mounting needs root (CI runs as root
    here); elsewhere the test says why it cannot run."""
    d = tmp_path / "small"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(d)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}); the disk-full test needs root")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)


@pytest.mark.slow
@pytest.mark.long
def test_disk_full_at_a_checkpoint_is_a_named_error_and_the_previous_checkpoint_resumes(
    store, straight, tmp_path, small_disk
):
    want = straight[0]

    # step 8's checkpoint fits, step 16's does not: refused before a byte is written, the run stops saying so
    log = tmp_path / "full.log"
    proc = _finetune(store, "s3://faults/train", small_disk, "full", log)
    proc.wait(timeout=600)
    text = log.read_text(errors="replace")
    assert proc.returncode == 1, text[-3000:]
    assert "raysvc: error: training failed on rank 0" in text and "checkpoint of step 16 not saved" in text
    assert "MiB free" in text and str(small_disk / "full") in text
    (ckpt,) = [p for p in (small_disk / "full").glob("checkpoint_*") if p.is_dir()]
    assert torch.load(ckpt / "state.pt", weights_only=False)["step"] == 8  # the previous checkpoint is whole
    # Ray's checkpoint index still reads
    json.loads(next((small_disk / "full").glob("checkpoint_manager_snapshot.json")).read_text())

    # with room again, the same job resumes from step 8 and ends as the uninterrupted run
    subprocess.run(["mount", "-o", "remount,size=512m", str(small_disk)], check=True)
    log = tmp_path / "again.log"
    text = _done(_finetune(store, "s3://faults/train", small_disk, "full", log), log)
    assert "resumed from step 8" in text
    assert _equal(_weights(small_disk, "full"), want)


@pytest.mark.slow
def test_endpoint_replica_killed_under_load_is_restarted_and_answers_stay_right(tmp_path):
    """`raysvc serve` with one replica takes 120 requests at concurrency 4; after 30 % the replica is SIGKILLed.
    Only requests in flight at that moment may fail, with a 5xx or a dropped connection; Serve starts a new replica
    within 90 s and every later request gets the same classes as before the kill."""
    import json as _json

    import requests

    from raysvc.bench.serve import bench_events, kill_replica_under_load
    from raysvc.inference.record import export_seeded_segmenter
    from raysvc.seaweed import free_port
    from raysvc.serve.process import ServeProcess

    token = "replica-kill-token-0123456789"
    export_seeded_segmenter(resolve(str(tmp_path / "model")), 4)
    bodies = [_json.dumps({"points": p.tolist(), "energies": e.tolist()}).encode() for p, e in bench_events(6, 5, 3000)]
    args = ["--checkpoint", str(tmp_path / "model"), "--torch-threads", "1"]
    with ServeProcess(args, free_port(), token, tmp_path / "serve.log") as srv:
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        answers = [
            requests.post(f"{srv.url}/v1/segment", data=b, headers=headers, timeout=60).json()["classes"]
            for b in bodies
        ]
        # an endpoint that has not answered right within 90 s of the kill is given up on (status -2), so that one that
        # never comes back fails this test in minutes
        k = kill_replica_under_load(srv.url, srv.proc.pid, token, bodies, 120, 4, 0.3, answers, recover_within_s=90)
    assert k["restarted"], k  # a new replica process, not the killed one
    assert k["wrong_answers"] == 0 and k["errors_before_kill"] == 0, k
    assert k["errors"] <= 4, k  # at most the requests in flight when the replica died
    assert set(k["status_counts"]) <= {"-1", "500", "502", "503", "504"}, k
    assert k["recovery_s"] is not None and k["errors_started_after_recovery"] == 0, k
