"""A head defined outside raysvc, as a physicist would add one: per-event deposited-energy regression on a segmenter.

One file holds both halves. The training half is a Task (`energy`: semantic segmentation plus the regression of
log10(1 + the event's summed energy) from the segmenter's pooled features); the inference half is an Output
(`energy`: the predict column `deposited_energy`, the response field `deposited_energy`, its OpenAPI schema and the
`evaluate` figure `deposited_energy_mae_log10`). Importing the module registers both; raysvc finds it through
RAYSVC_PLUGINS=tests.plugins.energy_head. No file under raysvc/ names any of it.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import nn

from raysvc.data.streaming.collate import collate_packed
from raysvc.inference.featurize import model_inputs
from raysvc.inference.outputs import Output, register_output
from raysvc.models.event_heads import pool_events
from raysvc.storage import Location, exists, read_bytes, write_bytes_atomic
from raysvc.train.augment import augment_coords
from raysvc.train.tasks import register_task
from raysvc.train.tasks.segmentation import FinetuneConfig, SegmentationTask, init_backbone
from raysvc.train.worker import autocast

WEIGHTS = "energy_head.safetensors"


def log_energy_sum(table: pa.Table, pre) -> np.ndarray:
    """Per event of a preprocessed table: log10(1 + the summed energy in MeV of its points above the threshold),
    the regression target (the table holds log-scaled energies; `pre`, its PreprocessConfig, undoes the scaling)."""
    scaled = pc.list_flatten(table.column("energy")).to_numpy(zero_copy_only=False).astype(np.float64)
    lo, hi = math.log10(pre.log_m), math.log10(pre.log_emax + pre.log_m)
    mev = 10.0 ** ((scaled + 1.0) / 2.0 * (hi - lo) + lo) - pre.log_m
    ends = np.cumsum(table.column("num_points").to_numpy().astype(np.int64))
    sums = np.diff(np.concatenate([[0.0], np.cumsum(mev)])[np.concatenate([[0], ends])])
    return np.log10(1.0 + sums)


class EnergyModel(nn.Module):
    """A segmenter plus a regression head on its pooled head features. Called as a segmenter (feat, coord,
    grid_coord, offset) it gives the cell logits; called with the model-input dict it gives (point logits, per-event
    log10 energy)."""

    def __init__(self, seg: nn.Module, hidden: int = 64):
        super().__init__()
        self.seg = seg
        c = seg.head_channels
        self.energy = nn.Sequential(nn.Linear(2 * c, hidden), nn.GELU(), nn.Linear(hidden, 1))

    @property
    def backbone(self) -> nn.Module:
        return self.seg.backbone

    def freeze_backbone(self) -> None:
        self.seg.freeze_backbone()

    def forward(self, *args):
        if len(args) == 4:
            return self.seg(*args)
        (x,) = args
        cells = self.seg.head_input(x["feat"], x["coord"], x["grid_coord"], x["offset"])
        value = self.energy(pool_events(cells.float(), x["offset"])).squeeze(1)
        return self.seg.head(cells)[x["inverse"]], value


class EnergySection(BaseModel):
    model_config = ConfigDict(extra="forbid")
    weight: float = Field(1.0, ge=0, description="weight of the energy regression loss")
    hidden: int = Field(64, gt=0)


class EnergyConfig(FinetuneConfig):
    task: Literal["energy"] = "energy"  # type: ignore[assignment]
    energy: EnergySection = Field(default_factory=EnergySection)


@register_task
class EnergyTask(SegmentationTask):
    name = "energy"
    config = EnergyConfig
    outputs = ("energy",)
    encoder_prefix = "seg.backbone."

    @classmethod
    def finish(cls, cfg: EnergyConfig, state: dict, run_loc: Location, inputs: dict, log) -> dict:
        """The segmenter as any segmenter export (its record naming the `energy` output), the head beside it."""
        seg = {k.removeprefix("seg."): v for k, v in state["model"].items() if k.startswith("seg.")}
        head = {k: v.contiguous() for k, v in state["model"].items() if not k.startswith("seg.")}
        out = super().finish(cfg, {**state, "model": seg}, run_loc, inputs, log)
        write_bytes_atomic(run_loc.join(WEIGHTS), save_tensors(head))
        return out

    @classmethod
    def export_record(cls, cfg: EnergyConfig, state: dict, inputs: dict):
        """A segmenter record that names the output and keeps the head's width (the record's `heads`)."""
        record = super().export_record(cfg, state, inputs)
        return record.model_copy(update={"heads": {"energy": {"hidden": cfg.energy.hidden}}})

    def build(self, cfg: EnergyConfig, ctx) -> nn.Module:
        from raysvc.inference.record import ModelSpec

        seg = ModelSpec(**cfg.model.model_dump()).build_segmenter(len(ctx.inputs["class_names"]))
        return init_backbone(EnergyModel(seg, cfg.energy.hidden), cfg, ctx.inputs["init_state"])

    def collate(self, table: pa.Table) -> dict:
        target = log_energy_sum(table, self.cfg.data.preprocess)
        return {**collate_packed(table), "energy_target": torch.from_numpy(target).float()}

    def step(self, batch: dict, step: int) -> dict:
        cfg, device = self.cfg, self.ctx.device
        pre = cfg.data.preprocess
        batch = {**batch, "coord": augment_coords(batch["coord"], batch["offset"], cfg.train.augment, pre.center)}
        x = model_inputs(batch, pre.center, pre.scale, cfg.model.grid_voxels, device, cfg.model.center_events)
        with autocast(cfg.train.amp, device):
            logits, value = self.model(x)
        semantic = self.loss_fn(logits.float(), x["labels"])
        energy = F.mse_loss(value.float(), batch["energy_target"].to(device)) * cfg.energy.weight
        loss = semantic + energy
        self.optimise(loss, step)
        return {"loss": loss.detach(), "semantic": semantic.detach(), "energy": energy.detach()}


class EnergyAnswer(BaseModel):
    log10_mev: float = Field(description="log10(1 + the event's summed energy in MeV), as regressed")
    mev: float = Field(description="the event's deposited energy in MeV")


@register_output
class EnergyOutput(Output):
    name = "energy"
    field = "deposited_energy"
    description = "the event's deposited energy, regressed (plug-in head `energy`)"
    response_model = EnergyAnswer

    def __init__(self, seg, loc: Location):
        super().__init__(seg, loc)
        if not exists(loc.join(WEIGHTS)):
            raise FileNotFoundError(f"{loc.uri}: the record names the energy head, but {WEIGHTS} is missing")
        self.model = EnergyModel(seg.model, seg.record.heads["energy"]["hidden"])
        weights = load_tensors(read_bytes(loc.join(WEIGHTS)))
        self.model.energy.load_state_dict({k.removeprefix("energy."): v for k, v in weights.items()})
        self.model.eval().to(seg.device)

    @classmethod
    def fields(cls, record) -> list[tuple[str, pa.DataType]]:
        return [("deposited_energy", pa.float32())]

    @classmethod
    def manifest(cls, record) -> dict:
        return {"deposited_energy_unit": "MeV"}

    @classmethod
    def merge(cls, record, states: list) -> dict:
        pairs = np.array([p for s in states for p in s], np.float64).reshape(-1, 2)
        return {"deposited_energy_mae_log10": float(np.abs(pairs[:, 0] - pairs[:, 1]).mean()) if len(pairs) else None}

    def forward(self, x: dict, batch: dict):
        return self.model(x)

    def events(self, raw, x: dict, batch: dict, kept: list) -> list:
        return [float(v) for v in raw.float().cpu().numpy()]

    def columns(self, results: list) -> dict[str, pa.Array]:
        mev = [None if r is None else 10.0**r - 1.0 for r in results]
        return {"deposited_energy": pa.array(mev, pa.float32())}

    def to_json(self, result):
        return None if result is None else {"log10_mev": result, "mev": 10.0**result - 1.0}

    def score(self, raw, x: dict, batch: dict, pre: pa.Table) -> list:
        """(true, predicted) log10 energy per scored event."""
        true = log_energy_sum(pre, self.seg.record.preprocess)
        return list(zip(true.tolist(), raw.float().cpu().numpy().tolist(), strict=True))
