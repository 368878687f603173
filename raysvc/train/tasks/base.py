"""The contract between the one training loop (`train/loop.py`) and a task or method (segmentation fine-tuning,
Panda pretraining, ...). A task is one file with a subclass of `Task` and its typed job config; the loop and the
driver own everything else (Ray Train, the rank's resumable stream, checkpoints and exact restore, logging cadence,
fault injection, summary.json)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pyarrow as pa
import torch

from raysvc.data.streaming.collate import collate_packed
from raysvc.storage import Location
from raysvc.train.config import JobConfig
from raysvc.train.worker import RankStream


@dataclass
class WorkerContext:
    """What the loop hands a task on a Train worker."""

    rank: int
    world: int
    device: torch.device
    inputs: dict  # what the task's `prepare` returned on the driver (prepared datasets, init weights, ...)
    per_rank: int  # events per step on this rank: the job's global batch split evenly
    history: dict = field(default_factory=dict)  # the run's history, restored with the checkpoint; tasks append
    tracker: Any = None  # rank 0's wandb tracker (`train.tracking.Tracker`)
    t_start: float = 0.0  # perf_counter when this process began stepping (elapsed times count from here)


class Task:
    """One method or downstream task on the shared loop.

    Driver side (class methods): `prepare` checks what can be checked before any worker starts and returns the
    workers' inputs (at least "train_data": the prepared training dataset); `finish` exports the model, draws the
    plots and returns the task's own summary.json keys.

    Worker side: `__init__` builds modules, optimizer and scheduler and fills `parts` (what a checkpoint holds, by
    name); `feed` and `collate` say how the rank's rows become batches (the loop reads them); `step` is one
    optimisation step (`stream` gives this rank's batches: by default the job's `data` read through `feed` and
    `collate`); `after_step`, `evaluate` (every `eval_every` steps and at the end) and `start` (after a
    restore, before the first step) are hooks for monitors, validation and probes."""

    name: ClassVar[str]
    kind: ClassVar[str]  # "pretrain" (a self-supervised method: `raysvc pretrain`) or "finetune" (`raysvc finetune`)
    config: ClassVar[type[JobConfig]]
    history_keys: ClassVar[tuple[str, ...]] = ("train",)

    parts: dict  # checkpointed state by name: modules, optimizer, scheduler
    eval_every: int

    def __init__(self, cfg: JobConfig, ctx: WorkerContext):
        self.cfg, self.ctx = cfg, ctx

    # --- driver side ---
    @classmethod
    def prepare(cls, cfg: JobConfig, log) -> dict:
        raise NotImplementedError

    @classmethod
    def finish(cls, cfg: JobConfig, state: dict, run_loc: Location, inputs: dict, log) -> dict:
        raise NotImplementedError

    # --- worker side ---
    def feed(self, epoch: int) -> tuple[Callable | None, dict]:
        """The function the read tasks apply to each shard's preprocessed rows in `epoch` (Arrow table in, Arrow table
        out, one row per event: it runs in Ray tasks or Ray Data map tasks), and its kwargs; None: the rows as they
        are."""
        return None, {}

    def collate(self, table: pa.Table) -> dict:
        """`per_rank` rows (as `feed` made them) -> the batch `step` takes."""
        return collate_packed(table)

    def stream(self, position: tuple) -> RankStream:
        """This rank's endless, resumable stream of batches, starting at `position` (what the stream's `position()`
        gave when the checkpoint was taken; (0, 0, 0) for a fresh run). The loop iterates it, checkpoints its
        `position()` and sums its `counts` of what the reads removed."""
        cfg, ctx = self.cfg, self.ctx
        return RankStream(
            cfg.data,
            ctx.inputs["train_data"],
            ctx.rank,
            ctx.world,
            cfg.train.seed,
            ctx.per_rank,
            self.collate,
            self.feed,
            position,
        )

    def start(self, step: int) -> None:
        """After the restore, before the first step (e.g. the probe of the random initialisation)."""

    def step(self, batch, step: int) -> dict:
        """One optimisation step on `batch` at step index `step` (0-based); returns its losses ("loss" and parts)."""
        raise NotImplementedError

    def after_step(self, step: int) -> None:
        """After step `step` (1-based count of steps done), before logging: monitors."""

    def evaluate(self, step: int) -> None:
        """Validation or probe after `step` steps; appends to `ctx.history` and prints on rank 0."""

    def lr(self) -> float:
        return max(self.parts["scheduler"].get_last_lr())

    def progress(self, rec: dict) -> str:
        """The task's part of the progress line of a log record (the loop adds step, ev/s, memory)."""
        return f"loss {rec['loss']:.4f} lr {rec['lr']:.2e}"

    def report_metrics(self) -> dict:
        """Metrics attached to each checkpoint report (besides step and loss)."""
        return {}

    @classmethod
    def outcome(cls, summary: dict) -> dict:
        """What `raysvc pretrain` / `finetune` print of a finished run's summary.json: the run and its steps, and
        the task's headline figures (subclasses add theirs)."""
        return {"run": summary["uri"], "steps": summary["steps"]}
