"""`raysvc bench heap`: the tiny fine-tuning step with the C heap trimmed every k steps against never, each in a
fresh process (a heap's history belongs to its process) on the same batches in the same order: seconds per step,
private memory between steps (largest seen, and at the end) and peak RSS, with ratios against never trimming.
"""

from __future__ import annotations

import multiprocessing as mp
import resource
import statistics
import tempfile
import time
from itertools import cycle, islice
from pathlib import Path

import torch

from raysvc.bench.train import _job, first_batches, generate_bench_data, plain_training
from raysvc.train import heap
from raysvc.train.tasks.segmentation import FinetuneConfig, train_step
from raysvc.train.worker import seed_everything


def _measure(job_json: str, steps: int, trim_every: int, threads: int, warmup: int) -> dict:
    """One variant, in its own process: `steps` training steps cycling over the run's first batches."""
    torch.set_num_threads(threads)
    cfg = FinetuneConfig.model_validate_json(job_json)
    seed_everything(cfg.train.seed * 1000)  # as rank 0 of a Train run: every variant draws the same numbers
    model, params, opt, loss_fn = plain_training(cfg)
    batches = first_batches(cfg, steps)
    times, private, losses = [], [], []
    for i, batch in enumerate(islice(cycle(batches), steps)):
        t0 = time.perf_counter()
        losses.append(float(train_step(model, params, opt, loss_fn, batch, cfg, torch.device("cpu"))))
        if trim_every and (i + 1) % trim_every == 0:
            heap.trim()
        times.append(time.perf_counter() - t0)  # the trim is part of the step's cost
        private.append(heap.private_mb())
    return {"step_s": statistics.median(times[warmup:]), "total_s": sum(times[warmup:]),
            "private_mb_max": max(private), "private_mb_end": private[-1],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "losses": losses}  # fmt: skip


def run_heap_bench(events: int = 40, steps: int = 60, batch: int = 4, threads: int = 1, warmup: int = 5,
                   every: tuple[int, ...] = (0, 1, 10), log=print) -> dict:  # fmt: skip
    if every[0] != 0 or len(set(every)) != len(every) or min(every) < 0:
        raise ValueError(f"every {every}: distinct intervals >= 0, the first 0 (never trim: the baseline)")
    out: dict = {"settings": {"events": events, "steps": steps, "batch_events": batch, "threads": threads,
                              "warmup_steps": warmup, "trim_every": list(every)}, "variants": {}}  # fmt: skip
    spawn = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        generate_bench_data(data, events, log)
        job = _job(data, data / "runs", "tiny", steps, batch, threads).model_dump_json()
        for k in every:
            log(f"trim every {k or 'never'}: {steps} steps in a fresh process")
            with spawn.Pool(1) as pool:
                out["variants"][str(k)] = pool.apply(_measure, (job, steps, k, threads, warmup))
    base = out["variants"]["0"]
    for v in out["variants"].values():
        v["step_time_vs_never"] = v["total_s"] / base["total_s"]
        v["private_mb_max_vs_never"] = v["private_mb_max"] / base["private_mb_max"]
        v["peak_rss_vs_never"] = v["peak_rss_mb"] / base["peak_rss_mb"]
        v["same_losses_as_never"] = v["losses"] == base["losses"]
    return out
