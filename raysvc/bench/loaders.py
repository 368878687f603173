"""`raysvc bench ingest --loaders`: the two training loaders (`data.loader`: Ray tasks, Ray Data) and batch inference
(`raysvc predict` with an actor pool vs in-process), on the same events from a local SeaweedFS, in one run.

Loaders, per loader:
- delivery: events/s that 1 and 2 consumer ranks receive (the rank's real stream, Panda views included, no model:
  each rank in its own Ray task, as Train workers are);
- a real Panda pretraining (`raysvc pretrain`, its own private Ray, tiny PTv3): events/s, the fraction of the
  worker's step time spent waiting for data (the loop measures it), the CPU-seconds that every process of the run
  except the Train workers burnt (read tasks, Ray Data executor, Ray's daemons) plus the workers' own CPU while
  waiting, per 100 steps, and the peak memory of all the run's processes together (sampled from /proc).
Batch inference: events/s of `predict_dataset` in this process (the baseline) and with 1 and 2 model actors.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from raysvc.serve.process import session_processes

JOBS = Path(__file__).parents[2] / "jobs"
PARTS = ("delivery", "choices", "predict", "pretrain")  # what `--loader-parts` can pick
PREFETCH = (1, 2, 4)  # data.prefetch_shards (tasks: shards in flight; ray_data: blocks prefetched by the rank)
BLOCK_MIB = (1, 4, 16)  # data.block_mib: the ray_data loader's target block size
_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _proc(pid: int) -> tuple[float, int, bool] | None:
    """(CPU seconds, proportional set size in bytes, is a Ray Train worker) of a live process, or None. PSS splits
    shared pages (torch's libraries in every worker) between the processes that map them, so PSS values add up."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        pss = next(
            int(ln.split()[1])
            for ln in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
            if ln.startswith("Pss:")
        )
    except (OSError, StopIteration):
        return None
    f = stat[stat.rindex(")") + 2 :].split()
    return (int(f[11]) + int(f[12])) / _TICK, pss * 1024, b"RayTrainWorker" in cmd


class SessionSampler:
    """CPU and memory of every process of a session (a command and all it started), sampled every `period` s.
    CPU: the last value seen per process, so processes that ended still count (up to their last sample); `series`
    holds (time, CPU of the non-worker processes so far) to cut out a time window."""

    def __init__(self, sid: int):
        self.sid = sid
        self.cpu: dict[int, tuple[float, bool]] = {}
        self.peak_pss = 0
        self.series: list[tuple[float, float]] = []

    def sample(self) -> None:
        pss = 0
        for pid in session_processes(self.sid):
            got = _proc(pid)
            if got is not None:
                self.cpu[pid] = (got[0], got[2])
                pss += got[1]
        self.peak_pss = max(self.peak_pss, pss)
        self.series.append((time.time(), self.cpu_s(train_workers=False)))

    def cpu_s(self, train_workers: bool) -> float:
        return sum(c for c, w in self.cpu.values() if w == train_workers)

    def cpu_between(self, t0: float, t1: float) -> float:
        """CPU seconds of the non-worker processes between two wall-clock times (nearest samples)."""
        at = lambda t: min(self.series, key=lambda p: abs(p[0] - t))[1]  # noqa: E731
        return at(t1) - at(t0)


def _pretrain(job: str, sets: list[str], env: dict, period: float = 0.25) -> SessionSampler:
    """Run `raysvc pretrain` in its own session; the sampled CPU and memory of all its processes."""
    cmd = [sys.executable, "-m", "raysvc.cli", "pretrain", job, *[x for s in sets for x in ("--set", s)]]
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        sampler = SessionSampler(proc.pid)
        while proc.poll() is None:
            sampler.sample()
            time.sleep(period)
        if proc.returncode:
            log.seek(0)
            raise RuntimeError(f"bench pretraining failed ({proc.returncode}):\n{log.read()[-3000:]}")
    return sampler


def run_loader_bench(
    events: int,
    steps: int,
    parts: tuple[str, ...],
    shard_events: int = 100,
    batch_events: int = 4,
    predict_events: int = 300,
    workdir: str = "runs/bench-loaders",
    log=print,
) -> dict:
    import ray

    from raysvc.data.sources.synthetic import generate_dataset
    from raysvc.ray_init import init_ray
    from raysvc.seaweed import SeaweedS3
    from raysvc.storage import S3Options, resolve

    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"--loader-parts: unknown {sorted(unknown)}; expected some of {', '.join(PARTS)}")
    work = Path(workdir).absolute()
    work.mkdir(parents=True, exist_ok=True)
    out: dict = {"events": events, "shard_events": shard_events, "steps": steps, "batch_events": batch_events}
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(SeaweedS3())
        env = {**os.environ, **server.env()}
        env.pop("RAY_ADDRESS", None)
        os.environ.update(server.env())
        s3 = S3Options(endpoint_url=server.endpoint)
        train, val = "s3://bench/pretrain", "s3://bench/val"
        log(f"[raysvc] bench loaders: {events} events into {train} (SeaweedFS {server.endpoint})")
        generate_dataset(resolve(train, s3), events, 0, shard_events, workers=os.cpu_count() or 1, show_progress=False)
        generate_dataset(resolve(val, s3), 60, 1, 30, workers=1, show_progress=False)

        init_ray(include_dashboard=False, logging_level="WARNING", log_to_driver=False)
        if "delivery" in parts:  # 1. delivery to 1 and 2 consumer ranks, no model
            out["delivery"] = {
                loader: {str(w): _delivery(train, s3, loader, w, batch_events, steps) for w in (1, 2)}
                for loader in ("tasks", "ray_data")
            }
            for loader, d in out["delivery"].items():
                log(
                    f"[raysvc]   delivery {loader}: "
                    + ", ".join(f"{w} rank(s) {v['events_per_s']:.1f} ev/s" for w, v in d.items())
                )
        if "choices" in parts:
            out["choices"] = _choices(train, s3, batch_events, steps, log)
        if "predict" in parts:
            out["batch_inference"] = _batch_inference(work, s3, predict_events, log)
        ray.shutdown()
        if "pretrain" in parts:
            out |= _pretrainings(work, train, val, env, steps, batch_events, log)
    out["cpus"] = os.cpu_count()
    return out


def _batch_inference(work: Path, s3, predict_events: int, log) -> dict:
    """events/s of `predict_dataset` in this process and with 1 and 2 model actors, on the same events; and with 2
    actors on the same events in one shard (`2_one_shard`: the pool shares a shard's chunks)."""
    from raysvc.data.sources.synthetic import generate_dataset
    from raysvc.inference.batch import predict_dataset
    from raysvc.inference.record import export_seeded_segmenter
    from raysvc.storage import resolve

    model = resolve(str(work / "model"))
    export_seeded_segmenter(model, seed=0)
    shards50, one_shard = resolve("s3://bench/predict", s3), resolve("s3://bench/predict-one-shard", s3)
    generate_dataset(shards50, predict_events, 3, 50, workers=1, show_progress=False)
    generate_dataset(one_shard, predict_events, 3, predict_events, workers=1, show_progress=False)  # same events
    cases = {"0": (0, shards50), "1": (1, shards50), "2": (2, shards50), "2_one_shard": (2, one_shard)}
    inference = {}
    for name, (actors, data) in cases.items():
        t0 = time.perf_counter()
        info = predict_dataset(
            model,
            data,
            resolve(str(work / f"preds-{name}")),
            actors=actors,
            cpus_per_actor=0.75 if actors == 2 else 1.0,
            log=lambda m: None,
        )
        inference[name] = {
            "events_per_s": info["events"] / (time.perf_counter() - t0),
            "events": info["events"],
            "shards": len(info["shards"]),
            "chunks_per_actor": info["chunks_per_actor"],
        }
    base = inference["0"]["events_per_s"]
    for v in inference.values():
        v["vs_in_process"] = v["events_per_s"] / base
    log(
        "[raysvc]   predict: "
        + ", ".join(
            f"{a} actor(s) {v['events_per_s']:.1f} ev/s ({v['vs_in_process']:.2f}x)" for a, v in inference.items()
        )
    )
    return inference


def _pretrainings(work: Path, train: str, val: str, env: dict, steps: int, batch_events: int, log) -> dict:
    """A real pretraining per loader and worker count, each alone on the machine."""
    out, runs = {}, {}
    for loader in ("tasks", "ray_data"):
        for workers in (1, 2):
            name = f"pt-{loader}-{workers}w"
            sets = [
                f"data.uri={train}",
                f"probe_data.uri={val}",
                f"data.loader={loader}",
                f"run.storage={work}",
                f"run.name={name}",
                f"train.steps={steps}",
                f"train.batch_events={batch_events * workers}",
                "train.log_every=10",
                "train.checkpoint_every=100000",
                "probe.every=100000",
                "probe.train_events=8",
                "probe.val_events=8",
                f"scaling.workers={workers}",
                f"scaling.cpus_per_worker={1.0 if workers == 1 else 0.5}",
            ]
            shutil.rmtree(work / name, ignore_errors=True)  # measured anew, never resumed from a stale run
            log(f"[raysvc]   pretraining {name}: {steps} steps")
            t0 = time.perf_counter()
            sampler = _pretrain(str(JOBS / "pretrain-panda-tiny.yaml"), sets, env)
            wall = time.perf_counter() - t0
            # steady state: from the first log record (step 10: start-up, first reads behind) to the last
            train_hist = json.loads((work / name / "summary.json").read_text())["history"]["train"]
            hist = train_hist[1:]
            wait = sum(r["data_wait_s"] for r in hist)
            step_s = sum(r["step_s"] for r in hist)
            n = train_hist[-1]["step"] - train_hist[0]["step"]
            other = sampler.cpu_between(train_hist[0]["time"], train_hist[-1]["time"])
            runs[name] = {
                "loader": loader,
                "workers": workers,
                "events_per_s": sum(r["events_per_s"] for r in hist) / len(hist),
                "data_wait_frac": wait / (wait + step_s),
                # CPU outside the step: every non-worker process (reads, views, Ray Data's executor, Ray's
                # daemons) plus the workers' own CPU while waiting for a batch
                "data_cpu_s_per_100_steps": (other + sum(r["data_cpu_s"] for r in hist)) * 100 / n,
                "step_cpu_s_per_100_steps": sum(r["step_cpu_s"] for r in hist) * 100 / n,
                "peak_pss_mib": sampler.peak_pss / 2**20,
                "wall_s": wall,
            }
            r = runs[name]
            log(
                f"[raysvc]     {r['events_per_s']:.2f} ev/s, waiting for data {100 * r['data_wait_frac']:.1f} % of "
                f"step time, data-path CPU {r['data_cpu_s_per_100_steps']:.0f} s per 100 steps, peak "
                f"{r['peak_pss_mib']:.0f} MiB"
            )
    out["pretrain"] = runs
    for w in (1, 2):
        a, b = runs[f"pt-tasks-{w}w"], runs[f"pt-ray_data-{w}w"]
        out[f"ray_data_vs_tasks_{w}w"] = {
            "events_per_s": b["events_per_s"] / a["events_per_s"],
            "data_cpu": b["data_cpu_s_per_100_steps"] / a["data_cpu_s_per_100_steps"],
            "peak_memory": b["peak_pss_mib"] / a["peak_pss_mib"],
        }
    return out


def _choices(uri: str, s3, batch_events: int, batches: int, log) -> dict:
    """Delivery to one rank per loader setting: `prefetch_shards` for both loaders, `block_mib` for ray_data. Each
    setting: events/s and the CPU-seconds per delivered event of every process of this session (the rank, read
    tasks, Ray Data's executor, SeaweedFS, Ray's daemons); each against the default setting's run."""
    from raysvc.data.streaming.config import DataConfig

    default = DataConfig(uri=uri)
    settings = [("tasks", p, default.block_mib) for p in PREFETCH]
    settings += [("ray_data", p, b) for b in BLOCK_MIB for p in PREFETCH]
    out: dict = {}
    for loader, prefetch, block in settings:
        sampler = SessionSampler(os.getsid(0))
        sampler.sample()
        with _sampling(sampler):
            got = _delivery(uri, s3, loader, 1, batch_events, batches, prefetch_shards=prefetch, block_mib=block)
        sampler.sample()
        cpu = sampler.series[-1][1] - sampler.series[0][1]  # no Train workers here: every process counts
        key = f"{loader} prefetch={prefetch}" + (f" block_mib={block:g}" if loader == "ray_data" else "")
        events = got["per_rank"][0]["events"]
        out[key] = {
            "loader": loader,
            "prefetch_shards": prefetch,
            "block_mib": block,
            "events_per_s": got["events_per_s"],
            "cpu_s_per_event": cpu / events,
        }
        log(f"[raysvc]   {key}: {got['events_per_s']:.1f} ev/s, {cpu / events:.2f} CPU-s per event")
    for loader in ("tasks", "ray_data"):
        base = out[
            f"{loader} prefetch={default.prefetch_shards}"
            + (f" block_mib={default.block_mib:g}" if loader == "ray_data" else "")
        ]
        for v in out.values():
            if v["loader"] == loader:
                v["vs_default_events_per_s"] = v["events_per_s"] / base["events_per_s"]
                v["vs_default_cpu"] = v["cpu_s_per_event"] / base["cpu_s_per_event"]
    return out


@contextlib.contextmanager
def _sampling(sampler: SessionSampler, period: float = 0.5):
    """Sample `sampler` every `period` s in a thread while the block runs (processes that end still count)."""
    import threading

    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(period):
            sampler.sample()

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()


def _delivery(uri: str, s3, loader: str, world: int, batch_events: int, batches: int, **data) -> dict:
    """events/s that `world` ranks (one Ray task each) receive from their streams, Panda views included; `data`:
    more DataConfig settings."""
    import ray

    task = ray.remote(num_cpus=0.5, scheduling_strategy="DEFAULT")(_consume_rank)
    t0 = time.perf_counter()
    args = (uri, s3.endpoint_url, loader, world, batch_events, batches, data)
    got = ray.get([task.remote(args[0], args[1], args[2], r, *args[3:]) for r in range(world)])
    wall = time.perf_counter() - t0
    return {"events_per_s": sum(g["events"] for g in got) / wall, "per_rank": got, "wall_s": wall}


def _consume_rank(
    uri: str, endpoint: str, loader: str, rank: int, world: int, per_rank: int, batches: int, data: dict
) -> dict:
    from raysvc.data.streaming.config import DataConfig
    from raysvc.data.streaming.prepared import prepare
    from raysvc.data.streaming.views import ViewConfig, collate_view_table, views_table
    from raysvc.train.worker import RankStream

    cfg = DataConfig(uri=uri, loader=loader, s3_endpoint_url=endpoint, read_cpus=0.5, **data)
    views = ViewConfig(local_views=4)
    stream = RankStream(
        cfg,
        prepare(cfg),
        rank,
        world,
        0,
        per_rank,
        collate_view_table,
        lambda e: (views_table, {"cfg": views, "seed": 0, "epoch": e}),
    )
    it = iter(stream)
    next(it)  # first batch: worker start-up, not delivery
    t0, c0 = time.perf_counter(), time.process_time()
    events = 0
    for _ in range(batches):
        events += len(next(it)["event_id"])
    it.close()
    return {"events": events, "wall_s": time.perf_counter() - t0, "consumer_cpu_s": time.process_time() - c0}
