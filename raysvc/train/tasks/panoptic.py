"""Panoptic fine-tuning (`raysvc finetune`, task `panoptic`): a segmenter (PTv3 or PoLAr-MAE encoder, lin or dec
head, from scratch or a pretrained export, the same modes as `segmentation`) plus one query-based instance head per
instance task: `particle` (instances = the `particle` column, classes = the detector's PID classes) and
`interaction` (instances = the `interaction` column, one class). Points of the detector's stuff class (LArTPC: low-
energy depositions) and points without an instance are stuff.

A step: the semantic loss of `segmentation` plus, per instance task, the set-prediction loss of
`train/instance_loss.py`. Validation: the semantic metrics and, per instance task, the post-processed instances
(`inference/instances.py`) scored by `inference/instance_metrics.py` (PQ / SQ / RQ, ARI, detection, PID accuracy),
pooled over the ranks.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from raysvc.data.streaming.collate import collate_packed
from raysvc.inference.featurize import model_inputs
from raysvc.inference.instance_metrics import InstanceScores
from raysvc.inference.instances import (
    PostprocessConfig,
    instance_classes,
    instance_labels,
    regression_targets,
    score_events,
)
from raysvc.inference.metrics import ConfusionMatrix, compute
from raysvc.inference.record import ExportedModel, ModelSpec
from raysvc.models.mask_decoder import MaskDecoderConfig, regress_dims
from raysvc.models.panoptic import PanopticModel
from raysvc.train.augment import augment_with_transforms
from raysvc.train.instance_loss import InstanceLossConfig, instance_loss
from raysvc.train.tasks.base import WorkerContext
from raysvc.train.tasks.segmentation import FinetuneConfig, SegmentationTask, init_backbone
from raysvc.train.worker import autocast, gather

INSTANCE_TASKS = ("particle", "interaction")


class InstanceSection(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tasks: list[Literal["particle", "interaction"]] = Field(default_factory=lambda: list(INSTANCE_TASKS))
    particle: MaskDecoderConfig = Field(default_factory=lambda: MaskDecoderConfig(queries=32))
    interaction: MaskDecoderConfig = Field(default_factory=lambda: MaskDecoderConfig(queries=12))
    loss: InstanceLossConfig = Field(default_factory=InstanceLossConfig)
    postprocess: PostprocessConfig = Field(default_factory=PostprocessConfig)
    semantic_weight: float = Field(1.0, ge=0, description="weight of the semantic loss beside the instance losses")

    @model_validator(mode="after")
    def _check(self) -> InstanceSection:
        if not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"instances.tasks must name each of {INSTANCE_TASKS} at most once, got {self.tasks}")
        if self.interaction.regress:
            raise ValueError("instances.interaction.regress: regression outputs are per particle (instances.particle)")
        return self


class PanopticConfig(FinetuneConfig):
    task: Literal["panoptic"] = "panoptic"  # type: ignore[assignment]
    instances: InstanceSection = Field(default_factory=InstanceSection)


def check_particle_truth(prep, where: str) -> None:
    """Refuse a dataset whose first shard has no particle truth: the regression heads would never learn."""
    from raysvc.data.streaming.shards import read_shard

    shard = next((s for s in prep.manifest.shards if s.events), None)
    if shard is None:
        return
    table = read_shard(prep.root, shard, verify_checksum=False)
    if table.column("particles").null_count == table.num_rows:
        raise ValueError(
            f"instances.particle.regress needs the particles' truth (the `particles` column), but {where} has none "
            f"(shard {shard.name}: written before the column existed, or converted from PILArNet-M v1)"
        )


def build_panoptic(cfg: PanopticConfig, detector, num_classes: int, init_state: dict | None = None) -> PanopticModel:
    seg = ModelSpec(**cfg.model.model_dump()).build_segmenter(num_classes)
    tasks = {t: len(instance_classes(detector, t)) for t in cfg.instances.tasks}
    return init_backbone(PanopticModel(seg, tasks, {t: getattr(cfg.instances, t) for t in tasks}), cfg, init_state)


@torch.no_grad()
def evaluate(model, batches: list[dict], cfg: PanopticConfig, device, world: int, names: list[str], detector) -> dict:
    """{"semantic": metrics.compute's dict, task: InstanceScores.result()} over this rank's validation batches,
    pooled over the ranks."""
    model.eval()
    cm = ConfusionMatrix(len(names))
    scores = {t: InstanceScores(instance_classes(detector, t)) for t in cfg.instances.tasks}
    pre = cfg.val_data.preprocess
    frame = (pre.center, pre.scale)
    for batch in batches:
        x = model_inputs(batch, pre.center, pre.scale, cfg.model.grid_voxels, device, cfg.model.center_events)
        with autocast(cfg.train.amp, device):
            sem, inst = model(x, batch["offset"].to(device))
        cm.update(sem.argmax(1), x["labels"])
        for t, outs in inst.items():
            regress = getattr(cfg.instances, t).regress
            score_events(scores[t], outs, batch, t, detector.stuff_class, cfg.instances.postprocess, frame, regress)
    if world > 1:
        cm.all_reduce_()
        gathered = gather(scores, world)
        scores = {t: InstanceScores.merged([g[t] for g in gathered]) for t in scores}
    model.train()
    return {"semantic": compute(cm.matrix, names), **{t: s.result() for t, s in scores.items()}}


class PanopticTask(SegmentationTask):
    name = "panoptic"
    config = PanopticConfig
    outputs = ("instances",)

    @classmethod
    def export_record(cls, cfg: PanopticConfig, state: dict, inputs: dict) -> ExportedModel:
        from raysvc.data.contract.detectors import get_detector

        detector = get_detector(inputs["detector"])
        instances = {
            t: {"classes": instance_classes(detector, t), "decoder": getattr(cfg.instances, t).model_dump()}
            for t in cfg.instances.tasks
        }
        seg = super().export_record(cfg, state, inputs)
        return ExportedModel.model_validate(
            seg.model_dump()
            | {"kind": "panoptic", "instances": instances, "postprocess": cfg.instances.postprocess.model_dump()}
        )

    @classmethod
    def detector_inputs(cls, cfg: PanopticConfig, detector, inputs: dict) -> dict:
        if "particle" in cfg.instances.tasks and "pid" not in detector.labels:
            raise ValueError(f"instances.tasks has particle, but {detector.name} events have no pid labels")
        if "particle" in cfg.instances.tasks and cfg.instances.particle.regress:
            check_particle_truth(inputs["train_data"], f"data.uri {cfg.data.uri}")
            check_particle_truth(inputs["val_data"], f"val_data.uri {cfg.val_data.uri}")
        return {}

    @classmethod
    def outcome(cls, summary: dict) -> dict:
        val = summary.get("val") or {}
        tasks = [t for t in INSTANCE_TASKS if t in val]
        return super().outcome(summary) | {
            k: v for t in tasks for k, v in ((f"val_{t}_pq", val[t]["pq"]), (f"val_{t}_ari", val[t]["ari"]))
        }

    @classmethod
    def curve_history(cls, history: dict) -> dict:
        return {"train": history["train"], "val": [{**r, "metrics": r["metrics"]["semantic"]} for r in history["val"]]}

    encoder_prefix = "seg.backbone."

    def build(self, cfg: PanopticConfig, ctx: WorkerContext) -> torch.nn.Module:
        from raysvc.data.contract.detectors import get_detector

        self.detector = get_detector(ctx.inputs["detector"])
        return build_panoptic(cfg, self.detector, len(ctx.inputs["class_names"]), ctx.inputs["init_state"])

    def collate(self, table) -> dict:
        # the particles' truth only where the regression outputs learn from it (a Python list per batch otherwise)
        return collate_packed(table, particles=bool(self.cfg.instances.particle.regress))

    def step(self, batch: dict, step: int) -> dict:
        cfg, device = self.cfg, self.ctx.device
        pre = cfg.data.preprocess
        coord, turn = augment_with_transforms(batch["coord"], batch["offset"], cfg.train.augment, pre.center)
        # regression targets from the points as read (offsets from centroids), turned as the points are below
        targets = {
            t: regression_targets(batch, getattr(cfg.instances, t).regress, (pre.center, pre.scale), turn)
            for t in cfg.instances.tasks
            if getattr(cfg.instances, t).regress
        }
        batch = {**batch, "coord": coord}
        x = model_inputs(batch, pre.center, pre.scale, cfg.model.grid_voxels, device, cfg.model.center_events)
        with autocast(cfg.train.amp, device):
            sem, inst = self.model(x, batch["offset"].to(device))
        losses = {"semantic": self.loss_fn(sem.float(), x["labels"]) * cfg.instances.semantic_weight}
        for t, outs in inst.items():
            ids, cls, stuff = (v.to(device) for v in instance_labels(batch, t, self.detector.stuff_class))
            dims = regress_dims(getattr(cfg.instances, t).regress)
            got = instance_loss(outs, ids, cls, stuff, batch["offset"], cfg.instances.loss, targets.get(t), dims)
            losses[t] = got["loss"]
        return self.optimise_parts(losses, step)

    def evaluate(self, step: int) -> None:
        collate = functools.partial(collate_packed, particles=bool(self.cfg.instances.particle.regress))
        val = self.validate(step, evaluate, self.detector, collate=collate)
        ctx = self.ctx
        flat = {"val/miou": val["semantic"]["miou"]}
        for t in self.cfg.instances.tasks:
            flat |= {f"val/{t}_pq": val[t]["pq"], f"val/{t}_ari": val[t]["ari"]}
        ctx.tracker.log({k: v for k, v in flat.items() if v is not None}, step)
        if ctx.rank == 0:
            parts = [f"mIoU {val['semantic']['miou'] or 0:.3f}"]
            for t in self.cfg.instances.tasks:
                parts.append(f"{t} PQ {val[t]['pq'] or 0:.3f} ARI {val[t]['ari'] or 0:.3f}")
            print(f"[raysvc] val step {step}: " + ", ".join(parts), flush=True)

    def progress(self, rec: dict) -> str:
        parts = " ".join(f"{t} {rec[t]:.3f}" for t in self.cfg.instances.tasks if t in rec)
        return f"loss {rec['loss']:.4f} (semantic {rec.get('semantic', 0):.3f} {parts}) lr {rec['lr']:.2e}"

    def report_metrics(self) -> dict:
        val = self.ctx.history["val"]
        if not val:
            return {}
        m = val[-1]["metrics"]
        return {"val_miou": m["semantic"]["miou"], **{f"val_{t}_pq": m[t]["pq"] for t in self.cfg.instances.tasks}}
