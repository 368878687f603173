"""`raysvc bench train`: model cost per event and Ray Train's per-step overhead, both measured in one run.

1. Forward + backward (+ AdamW step) seconds per event for the tiny and small presets, plain torch on generated
   events after the training preprocessing.
2. The same training loop (tiny; the same batches in the same order, seed and threads) as plain torch in this
   process, on batches prepared beforehand, and as a one-worker `TorchTrainer` run of `seg_train_loop` (data read
   by Ray tasks, Train's worker machinery, reporting). Overhead = total Ray step time / total plain step time - 1
   after the warm-up steps. Aim: within 10 %.
3. With `profile`: one tiny segmentation step and one tiny Panda pretraining step (the jobs' batches, one thread)
   timed and profiled: the share of the step spent in matrix multiplies and their speed against the same shapes
   multiplied alone (`bench/gemm_share.py`), which says whether the CPU step is bound by arithmetic.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from itertools import islice
from pathlib import Path

import torch

from raysvc.config import load_config
from raysvc.data.contract.detectors import LARTPC
from raysvc.data.streaming.pipeline import pack_tables
from raysvc.data.streaming.prepared import prepare, rank_shards
from raysvc.data.streaming.reader import read_preprocessed
from raysvc.ray_init import init_ray
from raysvc.storage import resolve
from raysvc.train.losses import SegLoss
from raysvc.train.optim import adamw
from raysvc.train.tasks.segmentation import FinetuneConfig, build_model, train_step

JOB = Path(__file__).parents[2] / "jobs" / "semseg-tiny.yaml"


def _job(data: Path, runs: Path, size: str, steps: int, batch: int, threads: int) -> FinetuneConfig:
    sets = [
        f"data.uri={data / 'train'}",
        f"val_data.uri={data / 'val'}",
        f"run.storage={runs}",
        f"run.name=bench-{size}",
        f"model.size={size}",
        f"train.steps={steps}",
        f"train.batch_events={batch}",
        "train.log_every=1",
        f"train.val_every={steps}",
        f"train.checkpoint_every={steps}",
        "train.val_events=2",
        "scaling.workers=1",
        f"scaling.cpus_per_worker={max(threads - 0.5, 0.5)}",
        f"scaling.torch_threads={threads}",
        "run.wandb_mode=disabled",
        "data.read_cpus=0.5",
        "val_data.read_cpus=0.5",
    ]
    return load_config(FinetuneConfig, str(JOB), sets)


def generate_bench_data(data: Path, events: int, log=print) -> None:
    """The benchmarks' labelled events: `events` for training in 4 shards, 8 for validation (fixed seeds)."""
    from raysvc.data.sources.synthetic import generate_dataset

    log(f"generating {events} + 8 events")
    generate_dataset(
        resolve(str(data / "train")), events, seed=11, shard_events=max(events // 4, 1), show_progress=False
    )
    generate_dataset(resolve(str(data / "val")), 8, seed=12, shard_events=8, show_progress=False)


def first_batches(cfg: FinetuneConfig, n: int) -> list[dict]:
    """Up to n batches: exactly those, in the order, that rank 0 of a one-worker run sees in its first epoch."""
    prep = prepare(cfg.data)
    shards = rank_shards(prep, 0, 1, 0, cfg.train.seed, shuffle=True)
    pre = cfg.data.preprocess
    tables = (read_preprocessed(prep.root, rec, pre, prep.keep_ids, detector=prep.detector)[0] for rec in shards)
    return list(islice(pack_tables(tables, cfg.train.batch_events, drop_last=True), n))


def plain_training(cfg: FinetuneConfig) -> tuple:
    """(model, trainable params, AdamW, unweighted loss) of the benchmarks' loop without Ray; the caller seeds first."""
    model = build_model(cfg, len(LARTPC.class_names))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = adamw(params, cfg.train.lr, weight_decay=cfg.train.weight_decay)
    return model, params, opt, SegLoss(None)


def plain_step_times(cfg: FinetuneConfig, steps: int) -> list[float]:
    """Seconds per step of the segmentation task's step without Ray, on batches collated in memory beforehand: the
    pure-compute baseline."""
    torch.manual_seed(cfg.train.seed)
    model, params, opt, loss_fn = plain_training(cfg)
    batches = first_batches(cfg, steps)
    if len(batches) < steps:
        raise ValueError(f"{cfg.data.uri}: {len(batches)} batches for {steps} steps; generate more events")
    times = []
    for batch in batches:
        t0 = time.perf_counter()
        train_step(model, params, opt, loss_fn, batch, cfg, torch.device("cpu"))
        times.append(time.perf_counter() - t0)
    return times


def run_train_bench(
    events: int,
    steps: int,
    batch: int,
    threads: int,
    warmup: int = 3,
    sizes: tuple[str, ...] = ("tiny", "small"),
    profile: bool = False,
    log=print,
) -> dict:
    import ray

    from raysvc.train.driver import run_job

    torch.set_num_threads(threads)
    out: dict = {
        "settings": {
            "events": events,
            "steps": steps,
            "batch_events": batch,
            "threads": threads,
            "warmup_steps": warmup,
            "profile": profile,
        }
    }
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        generate_bench_data(data, events, log)
        for size in sizes:
            log(f"{size}: plain torch forward + backward")
            times = plain_step_times(_job(data, data / "runs", size, steps, batch, threads), steps)
            per_step = statistics.median(times[warmup:])
            out[f"{size}_fwd_bwd_s_per_event"] = per_step / batch
            job = _job(data, data / "runs", size, 1, batch, threads)
            out[f"{size}_params"] = sum(p.numel() for p in build_model(job, len(LARTPC.class_names)).parameters())
        log("tiny: the same loop under Ray Train (1 worker)")
        cfg = _job(data, data / "runs", "tiny", steps, batch, threads)
        plain = plain_step_times(cfg, steps)
        started = not ray.is_initialized()
        if started:
            init_ray(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
        try:
            summary = run_job(cfg, log=lambda m: None)
        finally:
            if started:
                ray.shutdown()
        recs = summary["history"]["train"]
        ray_steps = [batch / r["events_per_s"] for r in recs]
        # the same batches in the same order on both paths: compare step by step after the warm-up
        out["plain_step_s"] = statistics.median(plain[warmup:])
        out["ray_train_step_s"] = statistics.median(ray_steps[warmup:])
        out["ray_train_overhead"] = sum(ray_steps[warmup:]) / sum(plain[warmup:]) - 1.0
        out["steps_compared"] = len(plain) - warmup
        if profile:
            out |= profile_steps(data, steps, warmup, log)
    return out


def profile_steps(data: Path, steps: int, warmup: int, log=print) -> dict:
    """`seg_tiny_*` and `panda_tiny_*`: median seconds per step (one thread, the jobs' batches: 2 events for
    segmentation, 4 for Panda) and the matrix multiplies' share and speed in two profiled steps."""
    from raysvc.bench.gemm_share import gemm_share
    from raysvc.bench.heap import panda_stepper, segmentation_stepper

    out: dict = {}
    for task, make, batch in (("seg", segmentation_stepper, 2), ("panda", panda_stepper, 4)):
        log(f"{task} tiny: {steps} steps timed, 2 profiled")
        step, _ = make(data, steps + 2, batch, 1)
        times = []
        for i in range(steps):
            t0 = time.perf_counter()
            step(i)
            times.append(time.perf_counter() - t0)
        out[f"{task}_tiny_s_per_step"] = statistics.median(times[warmup:])
        prof = gemm_share(step, steps)
        # the multiplies' profiled time over the step timed without the profiler: a step with nothing else left
        # would be at most 1 / share times faster
        prof["gemm_share_of_timed_step"] = prof["gemm_s_per_step"] / out[f"{task}_tiny_s_per_step"]
        out[f"{task}_tiny_profile"] = prof
    return out
