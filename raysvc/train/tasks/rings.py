"""Water Cherenkov fine-tuning (`raysvc finetune`, task `rings`): a segmenter whose per-hit head learns each hit PMT's
particle class (the ring it belongs to, by category; dark noise the stuff class), plus event heads
(`models/event_heads.py`) for the number of rings (1R, 2R, >=3R) and the type of a single-particle event (electron,
muon, pi0). The same modes as `segmentation` (lin / dec / fft from a pretrained export, scratch).

Event labels come from the events themselves: `rings` gives the ring class, and an event whose only primary particle
is an electron, a muon or a pi0 gets that PID class (other events have none and do not enter the PID loss).
Validation: the per-hit metrics, `ring_count_confusion` and `pid` {`e_eff_at_mu_rej_999`, `e_eff_at_pi0_rej_95`}
(`inference/event_metrics.py`), pooled over the ranks. The export is the segmenter (servable as any segmenter) and
`event_heads.safetensors` beside it.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from raysvc.data.streaming.collate import collate_packed
from raysvc.inference.event_metrics import PID_CLASSES, event_labels, event_scores
from raysvc.inference.featurize import model_inputs
from raysvc.inference.metrics import ConfusionMatrix, compute
from raysvc.inference.record import EVENT_HEADS, ModelSpec
from raysvc.models.event_heads import EventHeads
from raysvc.storage import Location, write_bytes_atomic
from raysvc.train.augment import augment_coords
from raysvc.train.tasks.base import WorkerContext
from raysvc.train.tasks.segmentation import FinetuneConfig, SegmentationTask, init_backbone
from raysvc.train.worker import autocast, gather


class EventSection(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hidden: int = Field(128, gt=0, description="width of the event heads' hidden layer")
    ring_weight: float = Field(1.0, ge=0, description="weight of the ring-count loss")
    pid_weight: float = Field(1.0, ge=0, description="weight of the PID loss")
    semantic_weight: float = Field(1.0, ge=0, description="weight of the per-hit loss")


class RingsConfig(FinetuneConfig):
    task: Literal["rings"] = "rings"  # type: ignore[assignment]
    events: EventSection = Field(default_factory=EventSection)


def build_rings(cfg: RingsConfig, num_classes: int, init_state: dict | None = None) -> EventHeads:
    seg = ModelSpec(**cfg.model.model_dump()).build_segmenter(num_classes)
    return init_backbone(EventHeads(seg, hidden=cfg.events.hidden), cfg, init_state)


@torch.no_grad()
def evaluate(model, batches: list[dict], cfg: RingsConfig, device, world: int, names: list[str]) -> dict:
    """Per-hit metrics, ring-count confusion and PID figures over this rank's batches, pooled over the ranks."""
    model.eval()
    cm = ConfusionMatrix(len(names))
    rows = []  # (true ring, predicted ring, true pid, electron score) per event
    pre = cfg.val_data.preprocess
    for batch in batches:
        x = model_inputs(batch, pre.center, pre.scale, cfg.model.grid_voxels, device, cfg.model.center_events)
        with autocast(cfg.train.amp, device):
            sem, ring, pid = model(x)
        cm.update(sem.argmax(1), x["labels"])
        e_score = pid.float().softmax(1)[:, 0].cpu().numpy()
        rows += zip(
            batch["ring_class"].tolist(),
            ring.argmax(1).cpu().tolist(),
            batch["pid_class"].tolist(),
            e_score.tolist(),
            strict=True,
        )
    if world > 1:
        cm.all_reduce_()
        rows = [r for g in gather(rows, world) for r in g]
    model.train()
    t_ring, p_ring, t_pid, e = (np.array(c) for c in zip(*rows, strict=True)) if rows else [np.zeros(0)] * 4
    return {**compute(cm.matrix, names), **event_scores(t_ring, p_ring, t_pid, e)}


class RingsTask(SegmentationTask):
    name = "rings"
    config = RingsConfig
    outputs = ("event_heads",)

    @classmethod
    def finish(cls, cfg: RingsConfig, state: dict, run_loc: Location, inputs: dict, log) -> dict:
        """The segmenter part as a segmenter export (any server or `raysvc predict` reads it), the event heads in
        `event_heads.safetensors` beside it."""
        from safetensors.torch import save as save_tensors

        seg = {k.removeprefix("seg."): v for k, v in state["model"].items() if k.startswith("seg.")}
        heads = {k: v.contiguous() for k, v in state["model"].items() if not k.startswith("seg.")}
        out = super().finish(cfg, {**state, "model": seg}, run_loc, inputs, log)
        write_bytes_atomic(run_loc.join(EVENT_HEADS), save_tensors(heads))
        return out

    @classmethod
    def detector_inputs(cls, cfg: RingsConfig, detector, inputs: dict) -> dict:
        if "pid" not in detector.labels or not set(PID_CLASSES) <= set(detector.labels["pid"].classes):
            raise ValueError(
                f"task rings needs water Cherenkov events (PID classes {PID_CLASSES}); got {detector.name}"
            )
        return {"pid_names": list(detector.labels["pid"].classes)}

    @classmethod
    def curve_history(cls, history: dict) -> dict:
        keep = ("miou", "iou", "accuracy", "mf1", "f1")
        val = [{**r, "metrics": {k: v for k, v in r["metrics"].items() if k in keep}} for r in history["val"]]
        return {"train": history["train"], "val": val}

    encoder_prefix = "seg.backbone."

    def build(self, cfg: RingsConfig, ctx: WorkerContext) -> torch.nn.Module:
        return build_rings(cfg, len(ctx.inputs["class_names"]), ctx.inputs["init_state"])

    def collate(self, table: pa.Table) -> dict:
        batch = collate_packed(table)
        ring, pid = event_labels(table, tuple(self.ctx.inputs["pid_names"]))
        return {**batch, "ring_class": torch.from_numpy(ring), "pid_class": torch.from_numpy(pid)}

    def step(self, batch: dict, step: int) -> dict:
        cfg, device, ev = self.cfg, self.ctx.device, self.cfg.events
        pre = cfg.data.preprocess
        batch = {**batch, "coord": augment_coords(batch["coord"], batch["offset"], cfg.train.augment, pre.center)}
        x = model_inputs(batch, pre.center, pre.scale, cfg.model.grid_voxels, device, cfg.model.center_events)
        with autocast(cfg.train.amp, device):
            sem, ring, pid = self.model(x)
        ring_t, pid_t = batch["ring_class"].to(device), batch["pid_class"].to(device)
        zero = sem.new_zeros(())
        losses = {
            "semantic": self.loss_fn(sem.float(), x["labels"]) * ev.semantic_weight,
            "rings": F.cross_entropy(ring.float(), ring_t, ignore_index=-1) * ev.ring_weight
            if (ring_t >= 0).any()
            else zero,
            "pid": F.cross_entropy(pid.float(), pid_t, ignore_index=-1) * ev.pid_weight if (pid_t >= 0).any() else zero,
        }
        return self.optimise_parts(losses, step)

    def evaluate(self, step: int) -> None:
        val = self.validate(step, evaluate, collate=self.collate)
        ctx = self.ctx
        pid = val["pid"]
        flat = {
            "val/miou": val["miou"],
            "val/ring_accuracy": val["ring_accuracy"],
            "val/e_eff_at_mu_rej_999": pid["e_eff_at_mu_rej_999"],
            "val/e_eff_at_pi0_rej_95": pid["e_eff_at_pi0_rej_95"],
        }
        ctx.tracker.log({k: v for k, v in flat.items() if v is not None}, step)
        if ctx.rank == 0:
            fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
            print(
                f"[raysvc] val step {step}: mIoU {fmt(val['miou'])}, rings {fmt(val['ring_accuracy'])} "
                f"{val['ring_count_confusion']}, e eff @ 99.9 % mu rej {fmt(pid['e_eff_at_mu_rej_999'])}, "
                f"@ 95 % pi0 rej {fmt(pid['e_eff_at_pi0_rej_95'])} (events e/mu/pi0 {list(pid['events'].values())})",
                flush=True,
            )

    def progress(self, rec: dict) -> str:
        return (
            f"loss {rec['loss']:.4f} (hits {rec.get('semantic', 0):.3f} rings {rec.get('rings', 0):.3f} "
            f"pid {rec.get('pid', 0):.3f}) lr {rec['lr']:.2e}"
        )

    def report_metrics(self) -> dict:
        val = self.ctx.history["val"]
        return (
            {"val_miou": val[-1]["metrics"]["miou"], "val_ring_accuracy": val[-1]["metrics"]["ring_accuracy"]}
            if val
            else {}
        )
