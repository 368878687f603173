"""The one per-worker training loop that `ray.train.torch.TorchTrainer` runs (Train V2 API), for every task.

Reads top to bottom: set up the worker, let the task build its modules, restore the last checkpoint if the run has
one, then step: a batch from this rank's deterministic stream (`data.loader`: Ray tasks or Ray Data) -> the
task's optimisation step -> logging every `log_every` steps (means over the window), the task's evaluation every
`eval_every` steps, a checkpoint every `checkpoint_every` steps, each also at the last step.

Determinism (resume == uninterrupted run): every rank loops over its own fixed shards in a seeded order per epoch,
and a checkpoint stores each rank's (epoch, shard, row) position and its torch / numpy / Python RNG states. Ranks run
the same number of steps, so uneven data per rank can never leave one waiting in a collective.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from pathlib import Path

import torch

from raysvc.train import heap
from raysvc.train.tasks import WorkerContext, get_task
from raysvc.train.tracking import Tracker
from raysvc.train.worker import load_checkpoint_state, restore, save, worker_setup


def train_loop(config: dict) -> None:
    """`config`: {"task": name, "job": the job config as JSON, "inputs": the task's prepared inputs, "fault": for
    the fault-tolerance tests, {"step": n, "marker": path, "kind": "raise" | "sigkill"} makes rank 0 fail once at
    step n (see `_inject`)}."""
    task_cls = get_task(config["task"])
    cfg = task_cls.config.model_validate(config["job"])
    rank, world, device = worker_setup(cfg.train.seed, cfg.scaling)
    inputs = config["inputs"]
    ctx = WorkerContext(rank, world, device, inputs, per_rank=cfg.train.batch_events // world)
    task = task_cls(cfg, ctx)

    step, ctx.history, position, resumed_counts = restore(
        load_checkpoint_state(), task.parts, rank, world, {k: [] for k in task.history_keys}
    )
    rank_stream = task.stream(position)
    rank_stream.counts.update(resumed_counts)
    stream = iter(rank_stream)
    ctx.t_start = time.perf_counter()  # elapsed times count this process's steps, not Ray's startup

    local_dir = (
        None if cfg.run.storage.startswith("s3://") else os.path.abspath(cfg.run.storage.removeprefix("file://"))
    )
    run_dir = None if local_dir is None else os.path.join(local_dir, cfg.run.name)
    ctx.tracker = Tracker(
        cfg.run.wandb_project,
        cfg.run.name,
        cfg.run.wandb_mode,
        config["job"],
        rank,
        local_dir,
        group=cfg.run.wandb_group,
    )
    fault = config.get("fault") or {}
    total = cfg.train.steps
    task.start(step)
    if step >= total:  # re-run of a finished run: hand its last state back
        _report(task, step, rank, world, rank_stream, run_dir)
    t_last, ev_since, sums = time.perf_counter(), 0, Counter()
    while step < total:
        t0, c0 = time.perf_counter(), time.process_time()
        batch = next(stream)
        t1, c1 = time.perf_counter(), time.process_time()
        losses = task.step(batch, step)
        # where the worker's time goes: waiting for data vs the step itself (wall and this process's CPU)
        sums["data_wait_s"] += t1 - t0
        sums["data_cpu_s"] += c1 - c0
        sums["step_s"] += time.perf_counter() - t1
        sums["step_cpu_s"] += time.process_time() - c1
        step += 1
        if cfg.train.trim_heap and device.type == "cpu" and step % cfg.train.trim_heap_every == 0:
            heap.trim()
        ev_since += ctx.per_rank
        for k, v in losses.items():
            sums[k] += float(v.detach() if torch.is_tensor(v) else v)
        sums["n"] += 1
        if fault and step == fault["step"] and rank == 0 and not os.path.exists(fault["marker"]):
            _inject(fault, step)
        task.after_step(step)
        if step % cfg.train.log_every == 0 or step == total:
            dt = time.perf_counter() - t_last
            timing = {k: sums.pop(k) for k in ("data_wait_s", "data_cpu_s", "step_s", "step_cpu_s")}
            means = {k: v / sums["n"] for k, v in sums.items() if k != "n"}
            wait_frac = timing["data_wait_s"] / max(timing["data_wait_s"] + timing["step_s"], 1e-12)
            rec = {"step": step, **means, "lr": task.lr(), "events_per_s": ev_since * world / dt}
            rec |= {**timing, "data_wait_frac": wait_frac, "time": time.time()}  # window totals, rank 0's worker
            rec = heap.with_private_mb({**rec, "allocator": heap.allocator()})
            ctx.history["train"].append(rec)
            ctx.tracker.log({f"train/{k}": v for k, v in rec.items() if k != "step" and not isinstance(v, str)}, step)
            if rank == 0:
                print(
                    f"[raysvc] step {step}/{total} {task.progress(rec)} {rec['events_per_s']:.2f} ev/s"
                    f"{heap.memory_note(rec)}",
                    flush=True,
                )
            t_last, ev_since, sums = time.perf_counter(), 0, Counter()
        if step % task.eval_every == 0 or step == total:
            task.evaluate(step)
        if step % cfg.train.checkpoint_every == 0 or step == total:
            _report(task, step, rank, world, rank_stream, run_dir)
    stream.close()  # stop the reads still in flight (a Ray Data executor, a ledger actor) before the worker goes
    ctx.tracker.finish()


def _inject(fault: dict, step: int) -> None:
    """Fail rank 0 once (the marker file says it happened): "raise" is a Python exception in the loop, "sigkill"
    kills the worker process outright, as the OOM killer or a lost node would: no handler, no flush, no goodbye."""
    Path(fault["marker"]).write_text(str(step))
    if fault.get("kind", "raise") == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise RuntimeError(f"injected fault at step {step}")


def _report(task, step: int, rank: int, world: int, stream, run_dir: str | None) -> None:
    train = task.ctx.history["train"]
    metrics = {"step": step, "loss": train[-1]["loss"] if train else None, **task.report_metrics()}
    save(task.parts, step, task.ctx.history, rank, world, stream, metrics, run_dir)
