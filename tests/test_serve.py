"""The Ray Serve segmentation endpoint, for real: `raysvc serve` with two exported models on a free 127.0.0.1 port,
bearer-token auth, requests over HTTP. Predictions equal `raysvc predict` on the same events (every encoding, both
models, concurrent requests through the batcher); every kind of bad request gets a 4xx naming the problem and the
next good request still works; the server is stopped by its session at the end and checked gone."""

from __future__ import annotations

import io
import ipaddress
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
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
from tests.conftest import Commands, with_heads

BIN = Path(sys.executable).parent
TOKEN = "test-token-0123456789abcdef"
BODY_TIMEOUT_S = 5
NPZ, ARROW = "application/x-npz", "application/vnd.apache.arrow.stream"


def _export(d: Path, seed: int, detector: str = "lartpc") -> Path:
    export_seeded_segmenter(resolve(str(d)), seed, detector=detector)
    return d


@pytest.fixture(scope="module")
def events():
    """Generated events (voxel coordinates, energies) including points below the energy threshold."""
    from raysvc.data.sources.lartpc_generator import GeneratorConfig, generate_event

    cfg = GeneratorConfig()
    return [
        (ev["coord"].astype(np.float32), ev["energy"].astype(np.float32))
        for ev in (generate_event(cfg, 21, i) for i in range(6))
    ]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    a, b = _export(root / "model-a", 1), _export(root / "model-b", 2)
    w = root / "model-w"  # a water Cherenkov model with ring-count and PID heads, as a `rings` run exports
    export_seeded_segmenter(resolve(str(w)), 3, detector="wch", event_heads=True)
    models = ["--model", f"a={a}", "--model", f"b={b}", "--model", f"w={w}"]
    srv = ServeProcess(
        [*models, "--torch-threads", "1", "--body-timeout-s", str(BODY_TIMEOUT_S)],
        free_port(),
        TOKEN,
        root / "serve.log",
    )
    srv.__enter__()
    sid = srv.proc.pid
    try:
        yield {"url": srv.url, "port": srv.port, "a": a, "b": b, "w": w, "root": root, "sid": sid}
    finally:
        stragglers = srv.stop()
    assert not stragglers and not session_processes(sid), "serve processes left running after SIGTERM"


def _post(
    url: str,
    body,
    content_type: str = "application/json",
    token: str | None = TOKEN,
    model: str | None = None,
    **params,
) -> requests.Response:
    headers = {"Content-Type": content_type}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if model is not None:
        headers["X-Model-Id"] = model
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    return requests.post(f"{url}/v1/segment", data=data, headers=headers, params=params, timeout=60)


def _json(points: np.ndarray, energies: np.ndarray, **kw) -> dict:
    return {"points": points.tolist(), "energies": energies.tolist(), **kw}


def _offline(commands: Commands, model_dir: Path, events, tmp_path: Path) -> Callable[[], list[np.ndarray]]:
    """`raysvc predict` on the events written as a dataset shard, started; the function returned waits for its
    predictions."""
    from raysvc.data.contract.schema import LABEL_FIELDS, table_from_events
    from raysvc.data.streaming.shards import shard_name, write_manifest, write_shard

    data = resolve(str(tmp_path / f"data-{model_dir.name}"))
    table = table_from_events(
        [
            {"event_id": i, "coord": p, "energy": e, **{f: np.zeros(len(e), np.int8) for f in LABEL_FIELDS}}
            for i, (p, e) in enumerate(events)
        ],
        "test",
    )
    write_manifest(data, [write_shard(data, shard_name(0), table)], {"test": True})
    out = tmp_path / f"preds-{model_dir.name}"
    commands.start(out.name, "predict", "--model", str(model_dir), "--data", data.path, "--out", str(out))

    def predictions() -> list[np.ndarray]:
        commands.finished(out.name)
        return [np.asarray(p, np.int8) for p in pq.read_table(out / "preds-00000.parquet").column("pred").to_pylist()]

    return predictions


def test_endpoint_predictions_equal_raysvc_predict_for_every_encoding_and_model(server, events, tmp_path):
    url = server["url"]
    with Commands(tmp_path) as commands:  # both predictions at once
        pending = {model: _offline(commands, server[model], events, tmp_path) for model in ("a", "b")}
        offline = {model: predictions() for model, predictions in pending.items()}
    for model in ("a", "b"):
        for (points, energies), want in zip(events, offline[model], strict=True):
            r = _post(url, _json(points, energies), model=model)
            assert r.status_code == 200, r.text
            got = r.json()
            assert got["model"] == model and got["num_points"] == len(points)
            assert np.array_equal(np.asarray(got["classes"], np.int8), want)
            assert set(got["timing_ms"]) == {"receive", "parse", "infer", "total"}
    assert any(
        not np.array_equal(x, y) for x, y in zip(offline["a"], offline["b"], strict=True)
    )  # the two models really differ

    points, energies = events[0]
    buf = io.BytesIO()
    np.savez(buf, points=points, energies=energies)
    r = _post(url, buf.getvalue(), "application/x-npz")
    assert r.status_code == 200 and np.array_equal(np.asarray(r.json()["classes"], np.int8), offline["a"][0])
    table = pa.table({"x": points[:, 0], "y": points[:, 1], "z": points[:, 2], "energy": energies})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    r = _post(url, sink.getvalue().to_pybytes(), "application/vnd.apache.arrow.stream")
    assert r.status_code == 200 and np.array_equal(np.asarray(r.json()["classes"], np.int8), offline["a"][0])
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
    for r, want in zip(rs, offline["a"] * 3, strict=True):
        assert r.status_code == 200 and np.array_equal(np.asarray(r.json()["classes"], np.int8), want)


@pytest.fixture(scope="module")
def tank_events():
    """Generated water Cherenkov events: hit PMT positions (cm), charges (PE) and times (ns)."""
    from raysvc.data.sources.wch_generator import WChGeneratorConfig, generate_wch_record

    cfg = WChGeneratorConfig()
    recs = [generate_wch_record(cfg, 31, i) for i in range(3)]
    return [(r["coord"].astype(np.float32), r["energy"].astype(np.float32), r["time"].astype(np.float32)) for r in recs]


def test_a_water_cherenkov_model_answers_tank_events_and_a_lartpc_model_refuses_them(server, tank_events):
    """The request names its detector and carries hit times (JSON, npz, Arrow); the WCh model's answer equals the
    exported model's own prediction in-process; a LArTPC model refuses the same event naming both detectors."""
    from raysvc.inference.segmenter import Segmenter

    url = server["url"]
    seg = Segmenter(resolve(str(server["w"])))
    want = with_heads(seg, tank_events)
    for (points, energies, times), (classes, _, event) in zip(tank_events, want, strict=True):
        npz = io.BytesIO()
        np.savez(npz, points=points, energies=energies, times=times)
        arrow = io.BytesIO()
        cols = {"x": points[:, 0], "y": points[:, 1], "z": points[:, 2], "energy": energies, "time": times}
        with pa.ipc.new_stream(arrow, pa.table(cols).schema) as w:
            w.write_table(pa.table(cols))
        answers = [
            _post(url, _json(points, energies, times=times.tolist(), detector="wch"), model="w"),
            _post(url, npz.getvalue(), NPZ, model="w", detector="wch"),
            _post(url, arrow.getvalue(), ARROW, model="w"),  # no detector named: the model's own
        ]
        for r in answers:
            assert r.status_code == 200, r.text
            got = r.json()
            assert got["class_names"] == ["gamma", "electron", "muon", "pion", "noise"]
            assert np.array_equal(np.asarray(got["classes"], np.int8), classes)
            assert got["event"]["rings"]["predicted"] == event["rings"]["predicted"]
            np.testing.assert_allclose(got["event"]["pid"]["probabilities"], event["pid"]["probabilities"], rtol=1e-5)
    points, energies, times = tank_events[0]
    body = _json(points, energies, times=times.tolist(), detector="wch")
    refused = _post(url, body, model="a")
    assert refused.status_code == 422
    error = refused.json()["error"]
    assert error.startswith("detector mismatch") and "serves lartpc events" in error and "a wch event" in error
    no_times = _post(url, _json(points, energies, detector="wch"), model="w")
    assert (
        no_times.status_code == 422
        and "times" in no_times.json()["error"]
        and "wch events need them" in (no_times.json()["error"])
    )
    lar_points, lar_energies, lar_times = tank_events[1][0] / 5, tank_events[1][1], tank_events[1][2]
    timed = _post(url, _json(lar_points, lar_energies, times=lar_times.tolist()), model="a")
    assert timed.status_code == 422 and "lartpc events carry no hit times" in timed.json()["error"]
    unknown = _post(url, body | {"detector": "dune"}, model="w")
    assert unknown.status_code == 422 and "unknown detector 'dune'" in unknown.json()["error"]
    assert _post(url, body, model="w").status_code == 200  # and the endpoint still answers


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
        (
            "inf energy",
            lambda: _post(url, _json(p, np.where(np.arange(50) == 4, np.inf, e))),
            422,
            "energies: energy contains NaN or inf",
        ),
        ("negative energy", lambda: _post(url, _json(p, -e)), 422, "energies: energy is negative"),
        ("outside the volume", lambda: _post(url, _json(outside, e)), 422, "outside the detector volume"),
        ("empty event", lambda: _post(url, {"points": [], "energies": []}), 422, "no points"),
        (
            "too many points",
            lambda: _post(url, {"points": [[1.0, 1.0, 1.0]] * 200_001, "energies": [1.0] * 200_001}),
            413,
            "at most 200000",
        ),
        ("oversized body", lambda: _post(url, b" " * (16 * 2**20 + 1)), 413, "limit"),
        ("wrong content type", lambda: _post(url, b"points", "text/plain"), 415, "content type"),
        ("bad npz", lambda: _post(url, b"PK-not-a-zip", "application/x-npz"), 400, ".npz"),
        ("missing token", lambda: _post(url, _json(p, e), token=None), 401, "Authorization"),
        ("wrong token", lambda: _post(url, _json(p, e), token="guess"), 401, "wrong bearer token"),
        ("unknown model id", lambda: _post(url, _json(p, e), model="zzz"), 404, "unknown model id 'zzz'"),
        ("unknown field", lambda: _post(url, {**_json(p, e), "energy": [1]}), 422, "unknown field"),
    ]
    good = _post(url, _json(p, e)).json()["classes"]
    for name, send, status, words in cases:
        r = send()
        assert r.status_code == status, (name, r.status_code, r.text[:300])
        assert words in r.json()["error"], (name, r.json())
        after = _post(url, _json(p, e))
        assert after.status_code == 200 and after.json()["classes"] == good, name


def test_models_health_and_openapi(server):
    url = server["url"]
    assert requests.get(f"{url}/healthz", timeout=10).json() == {"status": "ok", "models": 3}  # no auth needed
    assert requests.get(f"{url}/v1/models", timeout=10).status_code == 401
    models = requests.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10).json()
    assert models["default"] == "a" and [m["id"] for m in models["models"]] == ["a", "b", "w"]
    assert [m["detector"] for m in models["models"]] == ["lartpc", "lartpc", "wch"]
    assert [m["event_heads"] for m in models["models"]] == [False, False, True]
    spec = requests.get(f"{url}/openapi.json", timeout=10).json()
    assert {"/v1/segment", "/v1/models", "/healthz"} <= set(spec["paths"])
    assert TOKEN not in (server["root"] / "serve.log").read_text()  # the secret is never logged


def test_openapi_documents_bodies_errors_and_the_bearer_scheme(server, events):
    """Enough to generate a client: the three request encodings, the response, every error status the endpoint
    answers, and the bearer scheme on the /v1 routes; a real request and its answer validate against it."""
    import jsonschema

    url = server["url"]
    spec = requests.get(f"{url}/openapi.json", timeout=10).json()
    seg = spec["paths"]["/v1/segment"]["post"]
    assert set(seg["requestBody"]["content"]) == {"application/json", NPZ, ARROW}
    assert {"400", "401", "404", "408", "413", "415", "422", "503"} <= set(seg["responses"])
    assert spec["components"]["securitySchemes"]["bearer"] == {
        **spec["components"]["securitySchemes"]["bearer"],
        "type": "http",
        "scheme": "bearer",
    }
    assert seg["security"] == [{"bearer": []}] and spec["paths"]["/v1/models"]["get"]["security"] == [{"bearer": []}]
    assert "security" not in spec["paths"]["/healthz"]["get"]

    def resolved(schema: dict) -> dict:  # the schema with the spec's components, for jsonschema's $ref lookups
        return {**schema, "components": spec["components"]}

    request_schema = seg["requestBody"]["content"]["application/json"]["schema"]
    body = _json(*events[0], probabilities=True)
    jsonschema.validate(body, resolved(request_schema))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"points": [[1, 2]], "energies": [1]}, resolved(request_schema))
    answer = _post(url, body)
    jsonschema.validate(answer.json(), resolved(seg["responses"]["200"]["content"]["application/json"]["schema"]))
    refused = _post(url, {"points": [[1, 2]], "energies": [1]})
    error_schema = seg["responses"]["422"]["content"]["application/json"]["schema"]
    jsonschema.validate(refused.json(), resolved(error_schema))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"detail": "x"}, resolved(error_schema))


def test_serve_refuses_to_start_without_a_token(tmp_path):
    model = _export(tmp_path / "m", 0)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAYSVC_SERVE_TOKEN")}
    env["RAY_TMPDIR"] = str(tmp_path / "ray")
    p = subprocess.run(
        [str(BIN / "raysvc"), "serve", "--checkpoint", str(model), "--port", str(free_port())],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2 and "RAYSVC_SERVE_TOKEN" in p.stderr and "Bearer" in p.stderr
    assert not (tmp_path / "ray").exists()  # refused before any Ray started
    missing = subprocess.run(
        [str(BIN / "raysvc"), "serve", "--checkpoint", str(tmp_path / "nowhere")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 2 and "nowhere" in missing.stderr


@pytest.mark.slow
@pytest.mark.long
def test_bench_serve_reports_latency_throughput_and_ratios_from_one_run(tmp_path):
    out = tmp_path / "bench.json"
    p = subprocess.run(
        [
            str(BIN / "raysvc"),
            "bench",
            "serve",
            "--json",
            "--out",
            str(out),
            "--requests",
            "6",
            "--concurrency",
            "1",
            "3",
            "--events",
            "3",
            "--max-points",
            "1500",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
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
    assert (
        0 < r["floor_p50_ms"]["batching"] < on[0]["p50_ms"]
        and split["of_which_floor"] == r["floor_p50_ms"]["no_batching"] < off[0]["p50_ms"]
    )
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
        proc = subprocess.Popen(
            [str(BIN / "serve"), "run", "--address", "local", str(tmp_path / "segment.yaml")],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
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
    # raysvc predict after `serve run` has gone, not beside it: started together, the check below came seconds after
    # the Ctrl-C and once found a process of serve run's session still there (a clean-clone CI run)
    with Commands(tmp_path) as commands:
        want = _offline(commands, model, events[:3], tmp_path)()
    assert all(np.array_equal(g, w) for g, w in zip(got, want, strict=True))
    assert proc.returncode is not None and not session_processes(proc.pid)


def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _arrow(columns: dict, compression: str | None = None) -> bytes:
    table = pa.table(columns)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema, options=pa.ipc.IpcWriteOptions(compression=compression)) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


def test_hostile_bodies_get_a_named_4xx_in_one_shape_and_the_next_request_works(server, events):
    """Inputs that crashed a parser (500) or were wrongly accepted (200) before, each class with cases of its own;
    every answer is {"error", "status"}, FastAPI's own errors included."""
    url = server["url"]
    p, e = events[1][0][:50], events[1][1][:50]
    npy = io.BytesIO()
    np.save(npy, p)
    cols = {"x": p[:, 0], "y": p[:, 1], "z": p[:, 2], "energy": e}
    js = json.dumps(_json(p, e))

    def chunked():  # no Content-Length: only the streamed count can stop it
        for _ in range(17):
            yield b" " * 2**20

    cases = [
        ("deep JSON", lambda: _post(url, b"[" * 50_000), 400, "nested too deeply"),
        (
            "huge integer",
            lambda: _post(url, b'{"points": [[' + b"7" * 5000 + b', 1, 1]], "energies": [1]}'),
            422,
            "5000 digits",
        ),
        (
            "float beyond float32",
            lambda: _post(
                url, js.replace("[[", "[[1e39, 1, 1], [", 1).replace('"energies": [', '"energies": [1, ', 1).encode()
            ),
            422,
            "points: coordinates contain NaN or inf",
        ),
        ("npy as npz", lambda: _post(url, npy.getvalue(), NPZ), 400, "single .npy array"),
        (
            "timestamp column",
            lambda: _post(url, _arrow({**cols, "x": pa.array(np.zeros(50, "datetime64[ms]"))}), ARROW),
            422,
            "column x: type timestamp[ms]",
        ),
        (
            "nulls in a column",
            lambda: _post(url, _arrow({**cols, "energy": pa.array([None] * 50, pa.float32())}), ARROW),
            422,
            "null values",
        ),
        (
            "coordinates as strings",
            lambda: _post(url, {"points": p.astype(str).tolist(), "energies": e.tolist()}),
            422,
            "points: expected numbers, got a string",
        ),
        (
            "energies as booleans",
            lambda: _post(url, {"points": p.tolist(), "energies": [True] * 50}),
            422,
            "energies: expected numbers, got true/false",
        ),
        (
            "complex npz",
            lambda: _post(url, _npz(points=p.astype(np.complex64), energies=e), NPZ),
            422,
            "points: dtype complex64",
        ),
        ("text npz", lambda: _post(url, _npz(points=p, energies=e.astype("U8")), NPZ), 422, "energies: dtype <U8"),
        (
            "duplicate key",
            lambda: _post(url, js.replace("{", '{"energies": [1], ', 1).encode()),
            422,
            "duplicate key 'energies'",
        ),
        (
            "query parameter of the wrong type",
            lambda: _post(url, _json(p, e), probabilities="maybe"),
            422,
            "probabilities",
        ),
        ("chunked body over the limit", lambda: _post(url, chunked()), 413, "limit"),
        ("unknown path", lambda: requests.get(f"{url}/v1/nothing", timeout=10), 404, "/v1/nothing"),
        ("wrong method", lambda: requests.delete(f"{url}/v1/segment", timeout=10), 405, "DELETE /v1/segment"),
    ]
    good = _post(url, _json(p, e)).json()["classes"]
    for name, send, status, words in cases:
        r = send()
        assert r.status_code == status, (name, r.status_code, r.text[:300])
        assert r.json()["status"] == status and words in r.json()["error"], (name, r.json())
        after = _post(url, _json(p, e))
        assert after.status_code == 200 and after.json()["classes"] == good, name


def _status(pid: int, key: str) -> int:
    """A /proc/PID/status field in KiB."""
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith(key + ":"))
    return int(line.split()[1])


def test_bombs_are_refused_without_growing_the_replica(server):
    """An .npz that inflates to 10 M points (120 MB) and a zstd Arrow stream of 8 M rows (128 MB), each a few
    hundred KB on the wire: 413 from their declared sizes; the replica's peak RSS (reset first) barely moves."""
    from raysvc.bench.serve import replica_pids

    (pid,) = replica_pids(server["sid"])
    zeros = np.zeros(8_000_000, np.float32)
    npz = io.BytesIO()
    np.savez_compressed(npz, points=np.zeros((10_000_000, 3), np.float32), energies=zeros[:1])
    arrow = _arrow({"x": zeros, "y": zeros, "z": zeros, "energy": zeros}, "zstd")
    bombs = [(npz.getvalue(), NPZ, "10000000 points"), (arrow, ARROW, "8000000 rows")]
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset the peak RSS to the current RSS
    before = _status(pid, "VmHWM")
    for body, ctype, words in bombs:
        assert len(body) < 2**20
        r = _post(server["url"], body, ctype)
        assert r.status_code == 413 and words in r.json()["error"], r.text
    grown = (_status(pid, "VmHWM") - before) / 1024
    print(f"replica peak RSS +{grown:.1f} MiB under the bombs")
    assert grown < 48, grown


def test_stalled_bodies_get_408_and_never_block_a_valid_request(server, events):
    """Eight connections send headers and a few body bytes, then stall. A valid request is answered at once (the
    replica takes more requests than that), and each stalled one gets 408 after the body timeout."""
    url, port = server["url"], server["port"]
    stalled = [_stall(port) for _ in range(8)]
    t0 = time.perf_counter()
    try:
        time.sleep(0.5)  # let them all reach the replica
        t1 = time.perf_counter()
        r = _post(url, _json(*events[2]))
        answered = time.perf_counter() - t1
        assert r.status_code == 200 and answered < 2, answered  # with Serve's default of 5 in flight: ~4.5 s
        for s in stalled:
            reply = b""
            while chunk := s.recv(65536):
                reply += chunk
                if b"}" in reply:
                    break
            head, _, body = reply.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 408"), reply[:300]
            assert f"did not arrive within {BODY_TIMEOUT_S} s".encode() in body and b"of 100000 bytes" in body
        assert time.perf_counter() - t0 < BODY_TIMEOUT_S + 10
    finally:
        for s in stalled:
            s.close()


def _listening() -> dict[str, tuple[str, int]]:
    """Socket inode -> (address, port) of every listening TCP socket on the host (/proc/net/tcp, tcp6)."""
    out = {}
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            f = line.split()
            if f[3] != "0A":  # TCP_LISTEN
                continue
            addr, port = f[1].split(":")
            raw = bytes.fromhex(addr)
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))  # kernel words are little-endian
            out[f[9]] = (socket.inet_ntop(family, raw), int(port, 16))
    return out


def test_every_process_the_server_started_listens_on_loopback_only(server):
    listening = _listening()
    found = []
    for pid in session_processes(server["sid"]):
        try:
            title = Path(Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()).name
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in listening:
                found.append((title, *listening[target[8:-1]]))
    titles = {t for t, _, _ in found}
    assert any(t.startswith("ray::ServeReplica") for t in titles) and any("gcs_server" in t for t in titles), found
    assert any(t.startswith("ray::ProxyActor") and port == server["port"] for t, _, port in found), found

    def loopback(addr: str) -> bool:
        ip = ipaddress.ip_address(addr)
        return (ip.ipv4_mapped or ip).is_loopback if ip.version == 6 else ip.is_loopback

    print("\n".join(f"{t}: {a} {p}" for t, a, p in found))
    exposed = [f for f in found if not loopback(f[1])]
    assert not exposed, f"listening beyond loopback: {exposed}"


def _stall(port: int) -> socket.socket:
    """A connection that sends a request's headers and a few bytes of its body, then nothing."""
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(
        b"POST /v1/segment HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nAuthorization: "
        b"Bearer " + TOKEN.encode() + b'\r\nContent-Length: 100000\r\n\r\n{"points": [[1, '
    )
    return s


def test_an_overloaded_endpoint_answers_503_with_retry_after(tmp_path, events):
    """One request in flight and one queued at most (a small server): a third gets 503 with Retry-After at once,
    not a hang; when the stalled ones time out (408) the endpoint answers again."""
    model = _export(tmp_path / "m", 0)
    args = [
        "--checkpoint",
        str(model),
        "--max-ongoing-requests",
        "1",
        "--max-queued-requests",
        "1",
        "--body-timeout-s",
        "4",
        "--torch-threads",
        "1",
    ]
    with ServeProcess(args, free_port(), TOKEN, tmp_path / "serve.log") as srv:
        assert _post(srv.url, _json(*events[0])).status_code == 200
        stalled = [_stall(srv.port)]
        time.sleep(0.5)  # in the replica
        stalled.append(_stall(srv.port))
        time.sleep(0.5)  # queued at the proxy
        try:
            t0 = time.perf_counter()
            r = _post(srv.url, _json(*events[0]))
            assert r.status_code == 503 and time.perf_counter() - t0 < 2, (r.status_code, r.text[:300])
            assert r.headers["Retry-After"] == "1"
            deadline = time.time() + 30
            while (r := _post(srv.url, _json(*events[0]))).status_code == 503 and time.time() < deadline:
                time.sleep(float(r.headers["Retry-After"]))
            assert r.status_code == 200
        finally:
            for s in stalled:
                s.close()
