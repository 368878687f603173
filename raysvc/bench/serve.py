"""`raysvc bench serve`: the segmentation endpoint under load from a real HTTP client, against an in-process forward
on the same events, all in one run.

1. Baseline: `Segmenter.predict_events` in this process, one event per call (p50 ms per event).
2. The endpoint (`raysvc serve` on 127.0.0.1, bearer token, same model, same torch threads), once with dynamic
   batching and once without: N requests of the same events at concurrency C from a thread pool of keep-alive
   sessions. Latency p50 / p99, throughput, errors.
3. Overhead = endpoint p50 at concurrency 1 - in-process p50 (what HTTP, JSON, the proxy and the replica add),
   split with the timings each answer carries: outside the replica's route (client, HTTP, proxy, Ray hops, response
   encoding), parsing and checks in the route, and the replica's forward against the in-process one.
   The floor, `GET /healthz` at concurrency 1, is what a request that does nothing costs through the same server.
   Batching gain = throughput with batching / without, at each concurrency.
4. With --kill-replica: the replica is SIGKILLed under load at the highest concurrency; the error budget (failed
   requests by status, wrong answers, time until Serve answers again) is reported beside the figures above.
Aims: overhead <= 5 ms, batching >= 1.5x at concurrency 8, no errors.
"""

from __future__ import annotations

import secrets
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


def bench_events(events: int, seed: int, max_points: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Generated events (voxel coordinates, energies), each cut to at most `max_points` points."""
    from raysvc.data.sources.lartpc_generator import GeneratorConfig, generate_event

    cfg = GeneratorConfig()
    out = []
    for i in range(events):
        ev = generate_event(cfg, seed, i)
        out.append((ev["coord"][:max_points].astype(np.float32), ev["energy"][:max_points].astype(np.float32)))
    return out


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def _session(local, token: str):
    """This thread's keep-alive session (in `local`, a threading.local), made on first use."""
    import requests

    s = getattr(local, "s", None)
    if s is None:
        s = local.s = requests.Session()
        s.headers.update({"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    return s


def load(url: str, token: str, bodies: list[bytes], requests_n: int, concurrency: int) -> dict:
    """Send `requests_n` requests (cycling over `bodies`) at `concurrency`; latencies, throughput, errors."""
    import threading

    import requests

    local = threading.local()

    def one(i: int) -> tuple[float, int, dict | None]:
        s = _session(local, token)
        t0 = time.perf_counter()
        try:
            r = s.post(f"{url}/v1/segment", data=bodies[i % len(bodies)], timeout=120)
        except requests.RequestException:
            return time.perf_counter() - t0, -1, None
        dt = time.perf_counter() - t0
        return dt, r.status_code, r.json()["timing_ms"] if r.status_code == 200 else None  # decoded off the clock

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(requests_n)))
    wall = time.perf_counter() - t0
    ok = [(dt * 1e3, tm) for dt, st, tm in results if st == 200]
    lat = [ms for ms, _ in ok]
    out = {
        "requests": requests_n,
        "concurrency": concurrency,
        "errors": sum(st != 200 for _, st, _ in results),
        "p50_ms": _pct(lat, 50) if lat else None,
        "p99_ms": _pct(lat, 99) if lat else None,
        "throughput_rps": len(lat) / wall,
    }
    if ok:  # where the time goes: inside the replica's route (parse+checks, batch wait+forward) and outside it
        out["replica_p50_ms"] = {k: _pct([tm[k] for _, tm in ok], 50) for k in ("receive", "parse", "infer", "total")}
        out["outside_replica_p50_ms"] = _pct([ms - tm["total"] for ms, tm in ok], 50)
    return out


def replica_pids(sid: int) -> list[int]:
    """PIDs of the Serve replicas among the processes of session `sid` (process title ray::ServeReplica:...)."""
    from raysvc.serve.process import session_processes

    out = []
    for pid in session_processes(sid):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
        except OSError:
            continue
        if title.startswith(b"ray::ServeReplica"):
            out.append(pid)
    return sorted(out)


def kill_replica_under_load(
    url: str,
    sid: int,
    token: str,
    bodies: list[bytes],
    requests_n: int = 200,
    concurrency: int = 8,
    kill_after: float = 0.3,
    answers: list | None = None,
    recover_within_s: float | None = None,
) -> dict:
    """`requests_n` requests at `concurrency`; once `kill_after` of them have answered, the replica gets SIGKILL (as
    the OOM killer or a lost node would do it). Reports the error budget: what failed and how (status, or -1 for a
    dropped connection), when, and how long until Serve answered again; with `answers` (the classes each body must
    get), every 200 answer is also checked, so "succeeded" means "right". With `recover_within_s`, once that long
    has passed since the kill without a right answer to a request sent after it, the requests left are not sent
    (status -2): an endpoint that never comes back then fails in minutes, not after every request's timeout."""
    import os
    import signal
    import threading

    import requests

    (victim,) = replica_pids(sid)  # one replica: its death leaves no other to take the requests
    local, done, t_kill, recovered = threading.local(), threading.Event(), [], threading.Event()
    finished = [0]
    lock = threading.Lock()

    def one(i: int) -> tuple[float, float, int, bool]:
        s = _session(local, token)
        t0 = time.perf_counter()
        if recover_within_s is not None and t_kill and not recovered.is_set() and t0 - t_kill[0] > recover_within_s:
            return t0, t0, -2, False  # given up on: the endpoint did not come back in time
        try:
            r = s.post(f"{url}/v1/segment", data=bodies[i % len(bodies)], timeout=120)
            status = r.status_code
            right = status == 200 and (answers is None or r.json()["classes"] == answers[i % len(bodies)])
        except requests.RequestException:
            status, right = -1, False
        if right and t_kill and t0 > t_kill[0]:
            recovered.set()
        with lock:
            finished[0] += 1
            if finished[0] >= kill_after * requests_n:
                done.set()
        return t0, time.perf_counter(), status, right

    def killer() -> None:
        done.wait()
        t_kill.append(time.perf_counter())
        os.kill(victim, signal.SIGKILL)

    threading.Thread(target=killer, daemon=True).start()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(requests_n)))
    tk = t_kill[0]
    failed = [(t0, t1, st) for t0, t1, st, ok in results if not ok]
    wrong = sum(1 for _, _, st, ok in results if st == 200 and not ok)
    after = sorted(t1 for t0, t1, st, ok in results if ok and t0 > tk)
    status_counts: dict[str, int] = {}
    for _, _, st in failed:
        status_counts[str(st)] = status_counts.get(str(st), 0) + 1
    new = replica_pids(sid)
    return {
        "requests": requests_n,
        "concurrency": concurrency,
        "killed_pid": victim,
        "replicas_after": new,
        "restarted": bool(new) and victim not in new,
        "errors": len(failed),
        "wrong_answers": wrong,
        "error_budget": len(failed) / requests_n,
        "status_counts": status_counts,
        "given_up": status_counts.get("-2", 0),  # not sent: no recovery within recover_within_s
        "errors_before_kill": sum(1 for t0, t1, _ in failed if t1 < tk),
        "errors_started_after_recovery": sum(1 for t0, _, _ in failed if after and t0 > after[0]),
        "recovery_s": (after[0] - tk) if after else None,
    }


def floor_p50_ms(url: str, n: int = 200) -> float:
    """p50 of `GET /healthz` at concurrency 1: the round trip of a request that does nothing (client, HTTP, proxy,
    the Ray hop to the replica and back), the least any request through this server costs."""
    import requests

    lat = []
    with requests.Session() as s:
        for _ in range(n):
            t0 = time.perf_counter()
            s.get(f"{url}/healthz", timeout=30).raise_for_status()
            lat.append((time.perf_counter() - t0) * 1e3)
    return _pct(lat, 50)


def run_serve_bench(
    requests_n: int,
    concurrency: list[int],
    events: int,
    max_points: int,
    threads: int,
    model: str | None,
    kill_replica: bool,
    log=print,
) -> dict:
    import json

    import torch

    from raysvc.inference.record import export_seeded_segmenter
    from raysvc.inference.segmenter import Segmenter
    from raysvc.seaweed import free_port
    from raysvc.serve.process import ServeProcess
    from raysvc.storage import resolve

    evs = bench_events(events, 31, max_points)
    bodies = [json.dumps({"points": p.tolist(), "energies": e.tolist()}).encode() for p, e in evs]
    with tempfile.TemporaryDirectory() as tmp:
        if model is None:
            model = str(Path(tmp) / "model")
            export_seeded_segmenter(resolve(model), seed=0)  # latency does not depend on the weights
        torch.set_num_threads(threads)
        seg = Segmenter(resolve(model))
        for p, e in evs[:2]:
            seg.predict_events([(p, e)])  # warm-up
        inproc = []
        for _ in range(3):
            for p, e in evs:
                t0 = time.perf_counter()
                seg.predict_events([(p, e)])
                inproc.append((time.perf_counter() - t0) * 1e3)
        result = {
            "events": events,
            "points_per_event": statistics.mean(len(p) for p, _ in evs),
            "threads": threads,
            "in_process_p50_ms": _pct(inproc, 50),
            "endpoint": {},
        }
        log(f"[raysvc] in-process forward: p50 {result['in_process_p50_ms']:.1f} ms per event")
        token = secrets.token_hex(16)
        for batching in (True, False):
            key = "batching" if batching else "no_batching"
            args = ["--checkpoint", model, "--torch-threads", str(threads)] + ([] if batching else ["--no-batching"])
            with ServeProcess(args, free_port(), token, Path(tmp) / f"serve-{key}.log") as srv:
                load(srv.url, token, bodies, 2 * len(bodies), 2)  # warm-up: replica, proxy, batcher
                result.setdefault("floor_p50_ms", {})[key] = floor_p50_ms(srv.url)
                runs = []
                for c in concurrency:
                    r = load(srv.url, token, bodies, requests_n, c)
                    log(
                        f"[raysvc] {key}, concurrency {c}: p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, "
                        f"{r['throughput_rps']:.1f} req/s, {r['errors']} errors"
                    )
                    runs.append(r)
                if batching and kill_replica:
                    c = max(concurrency)
                    k = kill_replica_under_load(srv.url, srv.proc.pid, token, bodies, requests_n, c)
                    log(
                        f"[raysvc] replica killed under load (concurrency {c}): {k['errors']} of {k['requests']} "
                        f"requests failed ({k['status_counts']}), answering again after {k['recovery_s']:.1f} s, "
                        f"replica restarted: {k['restarted']}"
                    )
                    result["replica_kill"] = k
            result["endpoint"][key] = runs
    on, off = result["endpoint"]["batching"], result["endpoint"]["no_batching"]
    c1 = next((r for r in off if r["concurrency"] == 1), off[0])
    result["overhead_p50_ms"] = c1["p50_ms"] - result["in_process_p50_ms"]
    # The overhead split (medians, so only roughly additive): HTTP + proxy + Ray hops + response encoding outside
    # the route; request parsing and checks inside it; and the replica's forward against the in-process one.
    result["overhead_split_ms"] = {
        "outside_replica": c1["outside_replica_p50_ms"],
        "of_which_floor": result["floor_p50_ms"]["no_batching"],
        "receive_body": c1["replica_p50_ms"]["receive"],
        "parse_and_checks": c1["replica_p50_ms"]["parse"],
        "forward_vs_in_process": c1["replica_p50_ms"]["infer"] - result["in_process_p50_ms"],
    }
    result["batching_throughput_ratio"] = {
        str(a["concurrency"]): a["throughput_rps"] / b["throughput_rps"] for a, b in zip(on, off, strict=True)
    }
    result["errors"] = sum(r["errors"] for r in on + off)  # the replica-kill phase counts its own (error_budget)
    return result
