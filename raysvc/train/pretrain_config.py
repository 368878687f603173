"""The typed config of a Panda pretraining job (`raysvc pretrain jobs/pretrain-panda-*.yaml`). Defaults are Panda-Base's
(docs/methods.md, "Panda"); the tiny job scales sizes down for CPUs. Validated before any worker starts."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from raysvc.data.config import DataConfig
from raysvc.data.views import ViewConfig
from raysvc.models.panda import PandaConfig
from raysvc.models.ptv3 import PRESETS
from raysvc.train.job_config import LoopSection, RunSection, ScalingSection
from raysvc.train.probe import ProbeConfig


class BackboneSection(BaseModel):
    model_config = ConfigDict(extra="forbid")
    size: str = Field("base", description=f"backbone preset: one of {sorted(PRESETS)}")
    overrides: dict = Field(default_factory=dict, description="PTv3Config fields that replace the preset's")

    @model_validator(mode="after")
    def _check(self) -> BackboneSection:
        if self.size not in PRESETS:
            raise ValueError(f"size must be one of {sorted(PRESETS)}, got {self.size!r}")
        return self


class PretrainTrain(LoopSection):
    batch_events: int = Field(48, gt=0, description="global batch of events (each gives 2 global + 6 local views)")
    lr: float = Field(0.0026, gt=0)
    layer_decay: float = Field(0.9, gt=0, le=1, description="lr x decay^(depth from the top) per backbone block")
    weight_decay: tuple[float, float] = Field((0.04, 0.2), description="cosine from the first to the second")
    monitor_every: int = Field(10, gt=0, description="collapse monitors (prototype usage, feature std) every N steps")


class PretrainConfig(BaseModel):
    """A pretraining job: unlabelled data, labelled held-out data for the probe, backbone, views, method, scaling."""

    model_config = ConfigDict(extra="forbid")
    data: DataConfig
    probe_data: DataConfig | None = Field(None, description="labelled held-out events for the online linear probe")
    model: BackboneSection = Field(default_factory=BackboneSection)
    views: ViewConfig = Field(default_factory=ViewConfig)
    panda: PandaConfig = Field(default_factory=PandaConfig)
    train: PretrainTrain = Field(default_factory=PretrainTrain)
    probe: ProbeConfig = Field(default_factory=ProbeConfig)
    scaling: ScalingSection = Field(default_factory=ScalingSection)
    run: RunSection = Field(default_factory=lambda: RunSection(name="pretrain-panda"))

    @model_validator(mode="after")
    def _check(self) -> PretrainConfig:
        if self.train.batch_events % self.scaling.workers:
            raise ValueError(f"train.batch_events ({self.train.batch_events}) must be a multiple of scaling.workers "
                             f"({self.scaling.workers})")  # fmt: skip
        if self.views.global_views < 2 and self.panda.roll_mask_weight > 0:
            raise ValueError("panda.roll_mask_weight needs views.global_views >= 2")
        if self.views.local_views == 0 and self.panda.unmask_weight > 0:
            raise ValueError("panda.unmask_weight needs views.local_views >= 1")
        return self

    @property
    def grid_voxels(self) -> float:
        """The view grid in voxels: fine-tuning and the probe sample at the same resolution."""
        return self.views.grid * self.data.preprocess.scale
