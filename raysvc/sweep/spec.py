"""Typed sweep specs (`tune/*.yaml`): what `raysvc sweep` runs. A spec names its kind, its grid, how trials are
scheduled and where the experiment lives; unknown keys are rejected by name like every other config."""

from __future__ import annotations

from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from raysvc.config import ConfigError, load_config
from raysvc.data.streaming.config import DataConfig


class TuneSection(BaseModel):
    """How Tune schedules the trials. On a 2-core machine keep `max_concurrent_trials * (cpus_per_trial + what a
    trial starts itself)` <= 2, or trials wait on each other's CPUs."""

    model_config = ConfigDict(extra="forbid")
    max_concurrent_trials: int = Field(2, gt=0, description="trials running at once")
    cpus_per_trial: float = Field(
        1.0,
        gt=0,
        description="CPUs reserved for the trial function itself (a token "
        "0.01 when it only drives a Ray Train run; its workers reserve theirs)",
    )
    max_failures: int = Field(0, ge=0, description="retries of a crashed trial before it is reported failed")
    scheduler: Literal["fifo"] = Field(
        "fifo",
        description="every trial runs to the end: the grids are the result "
        "(an early-stopping scheduler would leave holes in the table)",
    )


class SweepBase(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="experiment name; same name + storage: resume")
    storage: str = Field("runs/sweeps", description="experiment root: a path, file:// or s3://")
    tune: TuneSection = Field(default_factory=TuneSection)
    wandb_project: str = "raysvc"
    wandb_mode: Literal["offline", "online", "disabled", "auto"] = Field(
        "auto", description="auto: online when WANDB_API_KEY is set, else offline; one wandb group per sweep"
    )


class CNMSGrid(BaseModel):
    model_config = ConfigDict(extra="forbid")
    radius: list[float] = Field(description="ball radius (voxels)")
    overlap: list[float] = Field(description="overlap factor: centres >= 2 * radius * overlap apart")


class FPSGrid(BaseModel):
    model_config = ConfigDict(extra="forbid")
    groups: list[int] = Field(description="FPS centres per event")
    radius: list[float] = Field(default_factory=list, description="ball radius (voxels), FPS + ball query only")


class TokenProbeObjective(BaseModel):
    """The C-NMS sweep's second objective, as PoLAr-MAE's paper scores tokenisations: a short PoLAr-MAE pretraining
    per (radius, overlap) setting, each scored by its token probe on held-out labelled events (the sweep's own)."""

    model_config = ConfigDict(extra="forbid")
    job: str = Field(description="PoLAr-MAE pretraining job YAML every setting starts from")
    data: str | None = Field(
        None,
        description="the pretraining events (a dataset URI); null: the sweep's own `data`. The token probe reads "
        "the sweep's `data` too; `set` (data.uri=..., probe_data.uri=...) overrides either",
    )
    set: list[str] = Field(default_factory=list, description="key=value overrides of `job` for every setting")
    settings: Literal["recommended"] | list[tuple[float, float]] = Field(
        "recommended",
        description="(radius, overlap) pairs in voxels, or `recommended`: each radius at its recommended overlap",
    )
    tune: TuneSection = Field(
        default_factory=lambda: TuneSection(max_concurrent_trials=1, cpus_per_trial=0.01),
        description="each setting is a Ray Train run whose workers reserve their own CPUs",
    )


class CNMSSweep(SweepBase):
    """C-NMS + ball query against FPS + kNN and FPS + ball query on the same held-out events: coverage (missed /
    duplicated points), groups per event, points per group and speed of each setting."""

    kind: Literal["cnms"]
    metrics: list[str] = Field(
        ["missed_ratio", "duplicated_ratio"],
        description="the two objectives, both minimised: the Pareto front and the recommended overlap use them",
    )
    data: DataConfig
    events: int = Field(50, gt=0, description="the first N events (after the energy cut) of `data`")
    max_points: int = Field(32, gt=0, description="points per group (ball query / kNN size)")
    cnms: CNMSGrid
    fps_knn: FPSGrid | None = None
    fps_ball: FPSGrid | None = None
    pretrain: TokenProbeObjective | None = Field(
        None, description="the representation objective (PoLAr-MAE token probe per setting); None: coverage only"
    )

    @field_validator("metrics")
    @classmethod
    def _two(cls, v: list[str]) -> list[str]:
        if sorted(v) != ["duplicated_ratio", "missed_ratio"]:
            raise ValueError(f"the C-NMS sweep minimises missed_ratio and duplicated_ratio, got {v}")
        return v


class FinetuneSweep(SweepBase):
    """Label fraction x fine-tuning mode (x training seed), each trial a Ray Train fine-tuning run of `job` (any
    fine-tuning task: segmentation, panoptic) from the backbone `init`, scored on `job`'s validation events (the same
    for every trial)."""

    kind: Literal["finetune"]
    metric: str = Field(
        "miou",
        description="validation metric of the mode x events table: a key of the run's summary `val`, dotted "
        "for nested ones (segmentation: miou; panoptic: particle.pq, semantic.miou, ...)",
    )
    columns: list[str] = Field(
        default_factory=list,
        description="more validation metrics (dotted keys of `val`) for the results table: one row per mode x "
        "labelled events, one column per metric, mean and standard deviation over the seeds",
    )
    seeds: list[int] | None = Field(
        None,
        description="training seeds (train.seed) per mode x events cell, each its own trial; null: one trial "
        "per cell with the job's seed",
    )
    job: str = Field(description="fine-tuning job YAML every trial starts from")
    set: list[str] = Field(default_factory=list, description="key=value overrides of `job` for every trial")
    init: str = Field(description="exported pretrained backbone (raysvc pretrain's run directory)")
    events: list[int | None] = Field(description="labelled training events per trial; null = all of them")
    modes: list[Literal["lin", "dec", "fft", "scratch"]]
    subset_seed: int = Field(0, description="seed of the nested label subsets (same seed, same events)")

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or len(set(v)) != len(v)):
            raise ValueError(f"seeds must be a non-empty list of distinct seeds, got {v}")
        return v


SweepSpec = CNMSSweep | FinetuneSweep


def load_spec(path: str, sets: list[str] | None = None) -> SweepSpec:
    """The spec at `path` (with --set overrides), validated as the model its `kind` names."""
    try:
        with open(path) as f:
            kind = (yaml.safe_load(f) or {}).get("kind")
    except (OSError, yaml.YAMLError, AttributeError) as e:
        raise ConfigError(f"{path}: cannot read sweep spec ({e})") from e
    for s in sets or []:
        if s.startswith("kind="):
            kind = s.split("=", 1)[1]
    models = {"cnms": CNMSSweep, "finetune": FinetuneSweep}
    if kind not in models:
        raise ConfigError(f"{path}: kind must be one of {sorted(models)}, got {kind!r}")
    return load_config(models[kind], path, sets)
