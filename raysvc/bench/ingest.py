"""`raysvc bench ingest`: events/s through the Ray Data pipeline vs direct pyarrow reading, same shards, same run.

Both paths read the same shards from the same store (by default a fresh local SeaweedFS) with the same preprocessing
and collate into the same packed tensors; the consumer only touches the tensors. Ray is warmed up by one untimed pass
(worker processes start once per job); each path's best of `repeats` passes is reported, with the breakdown of the
direct path (read / preprocess / collate) to show where the time goes.
"""

from __future__ import annotations

import contextlib
import os
import platform
import time

from raysvc.data.streaming.config import DataConfig
from raysvc.data.streaming.pipeline import DirectStream, build_dataset, iter_packed
from raysvc.data.streaming.prepared import prepare
from raysvc.ray_init import init_ray


def _consume(batches) -> tuple[int, int]:
    events = points = 0
    for b in batches:
        events += len(b["event_id"])
        points += int(b["offset"][-1])
        b["feat"].sum()  # touch the tensors
    return events, points


def run_ingest_bench(
    events: int, uri: str | None, batch_events: int, repeats: int, shard_events: int, seed: int = 0
) -> dict:
    import ray

    from raysvc.data.sources.synthetic import generate_dataset
    from raysvc.seaweed import SeaweedS3
    from raysvc.storage import S3Options, resolve

    with contextlib.ExitStack() as stack:
        store = "given"
        if uri is None:
            server = stack.enter_context(SeaweedS3())
            for k, v in server.env().items():
                os.environ[k] = v
            uri = "s3://bench/events"
            generate_dataset(
                resolve(uri, S3Options(endpoint_url=server.endpoint)),
                events,
                seed,
                shard_events,
                workers=os.cpu_count() or 1,
                show_progress=False,
            )
            store = "seaweedfs (local, 127.0.0.1)"
        cfg = DataConfig(uri=uri, batch_events=batch_events)
        prepared = prepare(cfg)

        direct_times, breakdown = [], {}
        for _ in range(repeats):
            d = DirectStream(cfg, prepared)
            t0 = time.perf_counter()
            n_direct, pts_direct = _consume(d.iter_packed())
            direct_times.append(time.perf_counter() - t0)
            breakdown = dict(d.timings)

        started_here = not ray.is_initialized()
        if started_here:
            init_ray(include_dashboard=False, logging_level="WARNING", log_to_driver=False)
            stack.callback(ray.shutdown)
        ray.data.DataContext.get_current().enable_progress_bars = False
        stream = build_dataset(cfg)
        _consume(iter_packed(stream.dataset, batch_events))  # warm-up: worker processes, imports
        stream.report(reset=True)
        ray_times, driver_cpu = [], []
        for _ in range(repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            n_ray, pts_ray = _consume(iter_packed(stream.dataset, batch_events))
            ray_times.append(time.perf_counter() - t0)
            driver_cpu.append(time.process_time() - c0)
        ledger = stream.report()
    if (n_ray, pts_ray) != (n_direct, pts_direct):
        raise RuntimeError(f"paths disagree: ray {n_ray} events / {pts_ray} points, direct {n_direct} / {pts_direct}")
    ray_eps, direct_eps = n_ray / min(ray_times), n_direct / min(direct_times)
    return {
        "ray_data_events_per_s": ray_eps,
        "direct_events_per_s": direct_eps,
        "ratio": ray_eps / direct_eps,
        "events_per_pass": n_ray,
        "points_per_pass": pts_ray,
        "events_in_dataset": prepared.manifest.events,
        "shards": len(prepared.manifest.shards),
        "batch_events": batch_events,
        "repeats": repeats,
        "ray_pass_s": ray_times,
        "direct_pass_s": direct_times,
        "direct_breakdown_s": breakdown,
        "ray_driver_cpu_s": driver_cpu,  # CPU of this process per pass: fetching blocks, batching, collate
        "ray_task_s_per_pass": {k: v / repeats for k, v in ledger["task_seconds"].items()},
        "ray_ledger": ledger,
        "store": store,
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
    }
