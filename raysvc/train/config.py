"""Config sections every training job shares (backbone, loop, scaling, run) and `JobConfig`, the base of each
task's typed job config. Every field is validated before any worker starts, and unknown keys are rejected by name."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from raysvc.data.streaming.config import DataConfig
from raysvc.models.ptv3 import PRESETS


class HeldOutProbeSection(BaseModel):
    """What the probes of a backbone share (the linear probe, the token probe): when they run during pretraining, and
    on how many held-out labelled events."""

    model_config = ConfigDict(extra="forbid")
    every: int = Field(250, gt=0, description="probe every N steps (and at step 0 and the end)")
    train_events: int = Field(100, gt=0, description="held-out labelled events the probe is fitted on")
    val_events: int = Field(100, gt=0, description="further held-out events it is scored on")


class BackboneSection(BaseModel):
    """The PTv3 backbone: a named preset and the fields that replace the preset's."""

    model_config = ConfigDict(extra="forbid")
    size: str = Field("tiny", description=f"backbone preset: one of {sorted(PRESETS)}")
    overrides: dict = Field(default_factory=dict, description="PTv3Config fields that replace the preset's")

    @model_validator(mode="after")
    def _check_size(self) -> BackboneSection:
        if self.size not in PRESETS:
            raise ValueError(f"size must be one of {sorted(PRESETS)}, got {self.size!r}")
        return self


class LoopSection(BaseModel):
    """What the training loop (`train/loop.py`) is steered by, whatever the task."""

    model_config = ConfigDict(extra="forbid")
    steps: int = Field(1000, gt=0)
    batch_events: int = Field(8, gt=0, description="global batch of events per step: split evenly over the workers")
    warmup_frac: float = Field(0.05, ge=0, lt=1, description="one-cycle: linear warmup, then cosine to lr * final")
    final_lr_frac: float = Field(0.01, ge=0, le=1)
    grad_clip: float | None = Field(3.0, gt=0)
    checkpoint_every: int = Field(200, gt=0)
    log_every: int = Field(10, gt=0)
    seed: int = 0
    amp: bool = Field(True, description="bf16 autocast on CUDA (LayerNorm stays fp32); ignored on CPU")
    trim_heap: bool = Field(
        False,
        description="on CPU, return the heap's freed pages to the OS every `trim_heap_every` steps (glibc "
        "malloc_trim): glibc otherwise keeps every freed activation page and, as batch shapes change, its "
        "fragmented free heap keeps growing (raysvc bench heap)",
    )
    trim_heap_every: int = Field(1, gt=0, description="steps between trims when trim_heap is on")
    allocator: Literal["glibc", "jemalloc"] = Field(
        "glibc",
        description="the Train workers' C allocator: jemalloc (Ray's own, preloaded, background purge) keeps a CPU "
        "worker's memory flat over long runs at ~23 % more step time; glibc is the fastest but keeps a fragmented "
        "free heap that grows as batch shapes change (docs/benchmarks.md, Memory)",
    )


class ScalingSection(BaseModel):
    model_config = ConfigDict(extra="forbid")
    workers: int = Field(1, gt=0)
    cpus_per_worker: float = Field(1.0, gt=0)
    use_gpu: bool = False
    torch_threads: int | None = Field(None, gt=0, description="torch threads per worker (default: its CPUs)")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="how Ray places the workers on nodes (STRICT_SPREAD: one worker per node)"
    )


class RunSection(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field("semseg", pattern=r"^[A-Za-z0-9_.-]+$", description="same name + storage: resume")
    storage: str = Field("runs", description="run storage root: a path, file:// or s3://")
    max_failures: int = Field(0, ge=-1, description="restarts from the last checkpoint on a worker failure")
    keep_checkpoints: int = Field(2, gt=0)
    wandb_project: str = "raysvc"
    wandb_mode: Literal["offline", "online", "disabled", "auto"] = Field(
        "auto", description="auto: online when WANDB_API_KEY is set, else offline"
    )
    wandb_group: str | None = Field(None, description="wandb group (a sweep puts its trials in one)")


class JobConfig(BaseModel):
    """What every job has: the task it runs (its `task` key names it), training data, scaling and run storage.
    A task's config adds its own sections (model, train with at least LoopSection's fields, ...)."""

    model_config = ConfigDict(extra="forbid")
    task: str
    data: DataConfig
    train: LoopSection
    scaling: ScalingSection = Field(default_factory=ScalingSection)
    run: RunSection = Field(default_factory=RunSection)

    @model_validator(mode="after")
    def _check_batch(self) -> JobConfig:
        if self.train.batch_events % self.scaling.workers:
            raise ValueError(
                f"train.batch_events ({self.train.batch_events}) must be a multiple of scaling.workers "
                f"({self.scaling.workers})"
            )
        return self
