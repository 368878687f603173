"""The Ray Serve segmentation endpoint, for real: `raysvc serve` with two exported models on a free 127.0.0.1 port,
bearer-token auth, requests over HTTP. Predictions equal `raysvc predict` on the same events (every encoding, both
models, concurrent requests through the batcher); every kind of bad request gets a 4xx naming the problem and the
next good request still works; the server is stopped by its session at the end and checked gone."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests

from raysvc.inference.record import export_seeded_segmenter
from raysvc.seaweed import free_port
from raysvc.serve.process import ServeProcess, session_processes, wait_until_healthy
from raysvc.storage import resolve

BIN = Path(sys.executable).parent
TOKEN = "test-token-0123456789abcdef"


def _export(d: Path, seed: int) -> Path:
    export_seeded_segmenter(resolve(str(d)), seed)
    return d


@pytest.fixture(scope="module")
def events():
    """Generated events (voxel coordinates, energies) including points below the energy threshold."""
    from raysvc.data.generator import GeneratorConfig, generate_event

    cfg = GeneratorConfig()
    return [(ev["coord"].astype(np.float32), ev["energy"].astype(np.float32))
            for ev in (generate_event(cfg, 21, i) for i in range(6))]  # fmt: skip


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    a, b = _export(root / "model-a", 1), _export(root / "model-b", 2)
    srv = ServeProcess(["--model", f"a={a}", "--model", f"b={b}", "--torch-threads", "1"], free_port(), TOKEN,
                       root / "serve.log")  # fmt: skip
    srv.__enter__()
    sid = srv.proc.pid
    try:
        yield {"url": srv.url, "a": a, "b": b, "root": root}
    finally:
        stragglers = srv.stop()
    assert not stragglers and not session_processes(sid), "serve processes left running after SIGTERM"


def _post(url: str, body, content_type: str = "application/json", token: str | None = TOKEN, model: str | None = None,
          **params) -> requests.Response:  # fmt: skip
    headers = {"Content-Type": content_type}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if model is not None:
        headers["X-Model-Id"] = model
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    return requests.post(f"{url}/v1/segment", data=data, headers=headers, params=params, timeout=60)


def _json(points: np.ndarray, energies: np.ndarray, **kw) -> dict:
    return {"points": points.tolist(), "energies": energies.tolist(), **kw}


def _offline(model_dir: Path, events, tmp_path: Path) -> list[np.ndarray]:
    """`raysvc predict` on the events written as a dataset shard."""
    from raysvc.data.schema import LABEL_FIELDS, table_from_events
    from raysvc.data.shards import shard_name, write_manifest, write_shard

    data = resolve(str(tmp_path / f"data-{model_dir.name}"))
    table = table_from_events([{"event_id": i, "coord": p, "energy": e, **{f: np.zeros(len(e), np.int8)
                                for f in LABEL_FIELDS}} for i, (p, e) in enumerate(events)], "test")  # fmt: skip
    write_manifest(data, [write_shard(data, shard_name(0), table)], {"test": True})
    out = tmp_path / f"preds-{model_dir.name}"
    subprocess.run([str(BIN / "raysvc"), "predict", "--model", str(model_dir), "--data", data.path, "--out",
                    str(out)], check=True, capture_output=True, timeout=300)  # fmt: skip
    return [np.asarray(p, np.int8) for p in pq.read_table(out / "preds-00000.parquet").column("pred").to_pylist()]


def test_endpoint_predictions_equal_raysvc_predict_for_every_encoding_and_model(server, events, tmp_path):
    url = server["url"]
    for model in ("a", "b"):
        offline = _offline(server[model], events, tmp_path)
        for (points, energies), want in zip(events, offline, strict=True):
            r = _post(url, _json(points, energies), model=model)
            assert r.status_code == 200, r.text
            got = r.json()
            assert got["model"] == model and got["num_points"] == len(points)
            assert np.array_equal(np.asarray(got["classes"], np.int8), want)
            assert set(got["timing_ms"]) == {"receive", "parse", "infer", "total"}
    a_offline = _offline(server["a"], events, tmp_path)
    assert any(not np.array_equal(x, y) for x, y in zip(a_offline, _offline(server["b"], events, tmp_path),
                                                         strict=True))  # the two models really differ  # fmt: skip

    points, energies = events[0]
    buf = io.BytesIO()
    np.savez(buf, points=points, energies=energies)
    r = _post(url, buf.getvalue(), "application/x-npz")
    assert r.status_code == 200 and np.array_equal(np.asarray(r.json()["classes"], np.int8), a_offline[0])
    table = pa.table({"x": points[:, 0], "y": points[:, 1], "z": points[:, 2], "energy": energies})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    r = _post(url, sink.getvalue().to_pybytes(), "application/vnd.apache.arrow.stream")
    assert r.status_code == 200 and np.array_equal(np.asarray(r.json()["classes"], np.int8), a_offline[0])
    assert r.json()["model"] == "a"  # the default: the first model given

    # probabilities: softmax rows that sum to 1 and agree with the classes; none below the energy threshold
    r = _post(url, _json(points, energies, probabilities=True))
    body = r.json()
    for c, p in zip(body["classes"], body["probabilities"], strict=True):
        assert (p is None) == (c == -1)
        if p is not None:
            assert abs(sum(p) - 1) < 1e-4 and int(np.argmax(p)) == c

    # concurrent requests go through the batcher (several events per forward) and still match one by one
    with ThreadPoolExecutor(8) as pool:
        rs = list(pool.map(lambda ev: _post(url, _json(*ev)), events * 3))
    for r, want in zip(rs, a_offline * 3, strict=True):
        assert r.status_code == 200 and np.array_equal(np.asarray(r.json()["classes"], np.int8), want)


def test_bad_requests_get_a_4xx_naming_the_problem_and_the_next_request_works(server, events):
    url = server["url"]
    points, energies = events[1]
    p, e = points[:50], energies[:50]
    nan_points = p.copy()
    nan_points[3, 1] = np.nan
    outside = p.copy()
    outside[7, 2] = 900.0
    cases = [
        ("malformed JSON", lambda: _post(url, b'{"points": [[1, 2, 3]', "application/json"), 400, "malformed JSON"),
        ("not an object", lambda: _post(url, b"[1, 2, 3]"), 422, "JSON object"),
        ("missing field", lambda: _post(url, {"points": p.tolist()}), 422, "energies"),
        ("wrong shape", lambda: _post(url, _json(p[:, :2], e)), 422, "shape"),
        ("not numbers", lambda: _post(url, {"points": [["a", "b", "c"]], "energies": [1.0]}), 422, "numbers"),
        ("mismatched lengths", lambda: _post(url, _json(p, e[:-1])), 422, "one energy per point"),
        ("NaN", lambda: _post(url, _json(nan_points, e)), 422, "points: coordinates contain NaN or inf"),
        ("inf energy", lambda: _post(url, _json(p, np.where(np.arange(50) == 4, np.inf, e))), 422,
         "energies: energy contains NaN or inf"),
        ("negative energy", lambda: _post(url, _json(p, -e)), 422, "energies: energy is negative"),
        ("outside the volume", lambda: _post(url, _json(outside, e)), 422, "outside the detector volume"),
        ("empty event", lambda: _post(url, {"points": [], "energies": []}), 422, "no points"),
        ("too many points", lambda: _post(url, {"points": [[1.0, 1.0, 1.0]] * 200_001,
                                                "energies": [1.0] * 200_001}), 413, "at most 200000"),
        ("oversized body", lambda: _post(url, b" " * (64 * 2**20 + 1)), 413, "limit"),
        ("wrong content type", lambda: _post(url, b"points", "text/plain"), 415, "content type"),
        ("bad npz", lambda: _post(url, b"PK-not-a-zip", "application/x-npz"), 400, ".npz"),
        ("missing token", lambda: _post(url, _json(p, e), token=None), 401, "Authorization"),
        ("wrong token", lambda: _post(url, _json(p, e), token="guess"), 401, "wrong bearer token"),
        ("unknown model id", lambda: _post(url, _json(p, e), model="zzz"), 404, "unknown model id 'zzz'"),
        ("unknown field", lambda: _post(url, {**_json(p, e), "energy": [1]}), 422, "unknown field"),
    ]  # fmt: skip
    good = _post(url, _json(p, e)).json()["classes"]
    for name, send, status, words in cases:
        r = send()
        assert r.status_code == status, (name, r.status_code, r.text[:300])
        assert words in r.json()["error"], (name, r.json())
        after = _post(url, _json(p, e))
        assert after.status_code == 200 and after.json()["classes"] == good, name


def test_models_health_and_openapi(server):
    url = server["url"]
    assert requests.get(f"{url}/healthz", timeout=10).json() == {"status": "ok", "models": 2}  # no auth needed
    assert requests.get(f"{url}/v1/models", timeout=10).status_code == 401
    models = requests.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10).json()
    assert models["default"] == "a" and [m["id"] for m in models["models"]] == ["a", "b"]
    spec = requests.get(f"{url}/openapi.json", timeout=10).json()
    assert {"/v1/segment", "/v1/models", "/healthz"} <= set(spec["paths"])
    assert TOKEN not in (server["root"] / "serve.log").read_text()  # the secret is never logged


def test_serve_refuses_to_start_without_a_token(tmp_path):
    model = _export(tmp_path / "m", 0)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAYSVC_SERVE_TOKEN")}
    env["RAY_TMPDIR"] = str(tmp_path / "ray")
    p = subprocess.run([str(BIN / "raysvc"), "serve", "--checkpoint", str(model), "--port", str(free_port())],
                       env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert p.returncode == 2 and "RAYSVC_SERVE_TOKEN" in p.stderr and "Bearer" in p.stderr
    assert not (tmp_path / "ray").exists()  # refused before any Ray started
    missing = subprocess.run([str(BIN / "raysvc"), "serve", "--checkpoint", str(tmp_path / "nowhere")], env=env,
                             capture_output=True, text=True, timeout=120)  # fmt: skip
    assert missing.returncode == 2 and "nowhere" in missing.stderr


@pytest.mark.slow
def test_bench_serve_reports_latency_throughput_and_ratios_from_one_run(tmp_path):
    out = tmp_path / "bench.json"
    p = subprocess.run([str(BIN / "raysvc"), "bench", "serve", "--json", "--out", str(out), "--requests", "6",
                        "--concurrency", "1", "3", "--events", "3", "--max-points", "1500"], capture_output=True,
                       text=True, timeout=600)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out.read_text())
    on, off = r["endpoint"]["batching"], r["endpoint"]["no_batching"]
    assert [x["concurrency"] for x in on] == [x["concurrency"] for x in off] == [1, 3]
    assert r["errors"] == 0 and all(x["p50_ms"] <= x["p99_ms"] for x in on + off)
    assert r["overhead_p50_ms"] == pytest.approx(off[0]["p50_ms"] - r["in_process_p50_ms"])
    assert r["batching_throughput_ratio"]["3"] == pytest.approx(on[1]["throughput_rps"] / off[1]["throughput_rps"])
    # the split comes from the replica's own timings in each answer: its route runs inside the client's latency
    for x in on + off:
        t = x["replica_p50_ms"]
        assert 0 < t["receive"] + t["parse"] < t["total"] < x["p50_ms"] and 0 < t["infer"] < t["total"]
        assert 0 < x["outside_replica_p50_ms"] < x["p50_ms"]
    split = r["overhead_split_ms"]
    assert split["outside_replica"] == off[0]["outside_replica_p50_ms"]
    assert 0 < r["floor_p50_ms"]["batching"] < on[0]["p50_ms"] and split["of_which_floor"] == r["floor_p50_ms"][
        "no_batching"] < off[0]["p50_ms"]  # fmt: skip
    assert split["forward_vs_in_process"] == pytest.approx(off[0]["replica_p50_ms"]["infer"] - r["in_process_p50_ms"])


@pytest.mark.slow
def test_serve_run_deploys_the_cluster_serve_config(tmp_path, events):
    """Ray's own `serve run cluster/serve/segment.yaml` on a private local Ray, with the config's model and port
    pointed at a test model: the application it names answers with the token, as `raysvc predict` does."""
    import signal

    import yaml

    cfg = yaml.safe_load((Path(__file__).parents[1] / "cluster" / "serve" / "segment.yaml").read_text())
    model = _export(tmp_path / "model", 3)
    port = free_port()
    cfg["http_options"]["port"] = port
    (app,) = cfg["applications"]
    app["args"]["models"] = {"semseg-tiny": str(model)}
    (tmp_path / "segment.yaml").write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAYSVC_SERVE_TOKEN": TOKEN}
    with open(tmp_path / "serve-run.log", "w") as log:
        proc = subprocess.Popen([str(BIN / "serve"), "run", "--address", "local", str(tmp_path / "segment.yaml")],
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            up = wait_until_healthy(url, 180, lambda: proc.poll() is None)
            assert up, (tmp_path / "serve-run.log").read_text()[-3000:]
            assert _post(url, _json(*events[0]), token=None).status_code == 401
            got = [np.asarray(_post(url, _json(p, e)).json()["classes"], np.int8) for p, e in events[:3]]
        finally:
            proc.send_signal(signal.SIGINT)  # Ctrl-C: `serve run` shuts Serve and its Ray down
            try:
                proc.wait(timeout=90)
            finally:
                for pid in session_processes(proc.pid):
                    os.kill(pid, signal.SIGKILL)
    want = _offline(model, events[:3], tmp_path)
    assert all(np.array_equal(g, w) for g, w in zip(got, want, strict=True))
    assert proc.returncode is not None and not session_processes(proc.pid)
