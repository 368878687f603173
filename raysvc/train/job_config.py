"""The typed config of a segmentation job (`raysvc finetune jobs/semseg-*.yaml`); every field validated before any
worker starts, and unknown keys rejected by name."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from raysvc.data.config import DataConfig
from raysvc.models.ptv3 import PRESETS
from raysvc.train.augment import AugmentConfig


class ModelSection(BaseModel):
    model_config = ConfigDict(extra="forbid")
    size: str = Field("tiny", description=f"backbone preset: one of {sorted(PRESETS)}")
    overrides: dict = Field(default_factory=dict, description="PTv3Config fields that replace the preset's")
    head: Literal["lin", "dec"] = "dec"
    mode: Literal["lin", "dec", "fft", "scratch"] = Field(
        "scratch", description="lin / dec: frozen encoder; fft: everything trains from `init`; scratch: no init")
    init: str | None = Field(None, description="directory (file:// or s3://) with backbone.safetensors or "
                                               "model.safetensors + config.json to start from")  # fmt: skip
    grid_voxels: float = Field(1.0, gt=0, description="grid sampling cell side in voxels (1: every voxel a site)")
    center_events: bool = Field(False, description="shift each event's coordinates to its mean (a Panda backbone "
                                "was pretrained on centred views; set from model.init's config when it says so)")

    @model_validator(mode="after")
    def _check(self) -> ModelSection:
        if self.size not in PRESETS:
            raise ValueError(f"size must be one of {sorted(PRESETS)}, got {self.size!r}")
        if self.mode in ("lin", "dec") and self.head != self.mode:
            raise ValueError(f"mode {self.mode!r} trains the {self.mode!r} head: set head: {self.mode}")
        return self


class LoopSection(BaseModel):
    """What every training loop (fine-tuning, pretraining) is steered by."""

    model_config = ConfigDict(extra="forbid")
    steps: int = Field(1000, gt=0)
    warmup_frac: float = Field(0.05, ge=0, lt=1, description="one-cycle: linear warmup, then cosine to lr * final")
    final_lr_frac: float = Field(0.01, ge=0, le=1)
    grad_clip: float | None = Field(3.0, gt=0)
    checkpoint_every: int = Field(200, gt=0)
    log_every: int = Field(10, gt=0)
    seed: int = 0
    amp: bool = Field(True, description="bf16 autocast on CUDA (LayerNorm stays fp32); ignored on CPU")
    trim_heap: bool = Field(False, description="on CPU, return freed heap pages to the OS after each step (glibc "
                            "malloc_trim): a worker then holds ~0.5 GB between steps instead of GBs of freed "
                            "activations, at 9-60 % more step time here (raysvc bench heap)")  # fmt: skip


class TrainSection(LoopSection):
    batch_events: int = Field(8, gt=0, description="global batch: split evenly over the workers")
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    class_weight_power: float = Field(0.5, ge=0, description="inverse class frequency ** power; 0: unweighted")
    lovasz_weight: float = Field(0.0, ge=0)
    backbone_lr_scale: float = Field(0.05, gt=0, le=1, description="fft: encoder lr = lr x this x layer decay")
    layer_decay: float = Field(0.9, gt=0, le=1, description="fft: lr x decay^(depth from the top) per encoder block")
    encoder_frozen_steps: int = Field(0, ge=0, description="fft: only the head (and decoder) train for the first N "
                                      "steps, then everything (linear-probe-then-fine-tune)")  # fmt: skip
    val_every: int = Field(200, gt=0, description="validate every N steps (and at the end)")
    val_events: int | None = Field(None, gt=0, description="cap on validation events (default: all)")
    augment: AugmentConfig = Field(default_factory=AugmentConfig, description="per-event rotations / mirrors of the "
                                   "training batches (validation never)")  # fmt: skip


class ScalingSection(BaseModel):
    model_config = ConfigDict(extra="forbid")
    workers: int = Field(1, gt=0)
    cpus_per_worker: float = Field(1.0, gt=0)
    use_gpu: bool = False
    torch_threads: int | None = Field(None, gt=0, description="torch threads per worker (default: its CPUs)")


class RunSection(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field("semseg", pattern=r"^[A-Za-z0-9_.-]+$", description="same name + storage: resume")
    storage: str = Field("runs", description="run storage root: a path, file:// or s3://")
    max_failures: int = Field(0, ge=-1, description="restarts from the last checkpoint on a worker failure")
    keep_checkpoints: int = Field(2, gt=0)
    wandb_project: str = "raysvc"
    wandb_mode: Literal["offline", "online", "disabled", "auto"] = Field(
        "auto", description="auto: online when WANDB_API_KEY is set, else offline")
    wandb_group: str | None = Field(None, description="wandb group (a sweep puts its trials in one)")


class FinetuneConfig(BaseModel):
    """A segmentation training job: data, model, optimisation, scaling and run storage."""

    model_config = ConfigDict(extra="forbid")
    data: DataConfig
    val_data: DataConfig
    model: ModelSection = Field(default_factory=ModelSection)
    train: TrainSection = Field(default_factory=TrainSection)
    scaling: ScalingSection = Field(default_factory=ScalingSection)
    run: RunSection = Field(default_factory=RunSection)

    @model_validator(mode="after")
    def _check(self) -> FinetuneConfig:
        if self.train.batch_events % self.scaling.workers:
            raise ValueError(f"train.batch_events ({self.train.batch_events}) must be a multiple of scaling.workers "
                             f"({self.scaling.workers})")  # fmt: skip
        if self.model.mode == "fft" and not self.model.init:
            raise ValueError("model.mode fft fine-tunes a pretrained backbone: set model.init (or use mode scratch)")
        if self.train.encoder_frozen_steps and self.model.mode != "fft":
            raise ValueError(f"train.encoder_frozen_steps ({self.train.encoder_frozen_steps}) holds a pretrained "
                             f"encoder still at first: it needs model.mode fft, not {self.model.mode!r}")  # fmt: skip
        return self
