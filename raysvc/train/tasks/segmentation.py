"""Semantic segmentation fine-tuning (`raysvc finetune`, task `segmentation`): a PTv3 encoder (from scratch or from
a pretrained export) with a lin or dec head, trained on labelled events with class-weighted cross-entropy or focal
loss (+ Lovasz), on all the detector's classes or, with `preprocess.remove_led`, on all but its stuff class.

Modes (docs/methods.md, "Fine-tuning"): lin / dec freeze the encoder and train the head; fft trains everything from
`model.init`, the encoder at lr x `backbone_lr_scale` with layer decay; scratch is fft without init. A step: a packed
batch (augmented when `train.augment` asks) -> model inputs -> forward (bf16 autocast on CUDA) -> loss on the
points -> backward -> clip -> AdamW -> one-cycle lr. Validation confusion matrices are all-reduced over the ranks.
The export is a `segmenter` record with the class names of the training data's detector.
"""

from __future__ import annotations

import time
from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from raysvc.data.streaming.collate import collate_packed
from raysvc.data.streaming.config import DataConfig
from raysvc.data.streaming.pipeline import pack_tables, stream_tables
from raysvc.data.streaming.prepared import Prepared, prepare, rank_shards
from raysvc.data.streaming.reader import read_preprocessed
from raysvc.hub import read_model
from raysvc.inference.featurize import model_inputs
from raysvc.inference.metrics import ConfusionMatrix, compute
from raysvc.inference.record import ExportedModel, ModelSpec, load_backbone_weights, save_export
from raysvc.models.archs import ARCHS, check_size, with_input_channels
from raysvc.storage import Location, resolve, write_bytes_atomic
from raysvc.train.augment import AugmentConfig, augment_coords
from raysvc.train.config import BackboneSection, JobConfig, LoopSection
from raysvc.train.losses import SegLoss, class_weights
from raysvc.train.optim import adamw, encoder_depths, param_groups
from raysvc.train.plots import curves_png
from raysvc.train.schedule import one_cycle_scheduler
from raysvc.train.tasks.base import Task, WorkerContext
from raysvc.train.worker import autocast


class ModelSection(BackboneSection):
    arch: str = Field("ptv3", description=f"the encoder, one of {sorted(ARCHS)} (model.init's export sets it)")
    head: Literal["lin", "dec"] = "dec"
    mode: Literal["lin", "dec", "fft", "scratch"] = Field(
        "scratch", description="lin / dec: frozen encoder; fft: everything trains from `init`; scratch: no init"
    )
    init: str | None = Field(
        None,
        description="the model to start from: a raysvc export directory (file:// or s3://), a Sonata / Pointcept "
        "checkpoint file or a pimm export directory (what they do not state is this job's)",
    )
    grid_voxels: float = Field(1.0, gt=0, description="grid sampling cell side in voxels (1: every voxel a site)")
    center_events: bool = Field(
        False,
        description="shift each event's coordinates to its mean (a Panda backbone "
        "was pretrained on centred views; set from model.init's config when it says so)",
    )

    @model_validator(mode="after")
    def _check_size(self) -> ModelSection:  # replaces BackboneSection's: the presets depend on the architecture
        check_size(self.arch, self.size)
        return self

    @model_validator(mode="after")
    def _check(self) -> ModelSection:
        if self.mode in ("lin", "dec") and self.head != self.mode:
            raise ValueError(f"mode {self.mode!r} trains the {self.mode!r} head: set head: {self.mode}")
        return self


class TrainSection(LoopSection):
    batch_events: int = Field(8, gt=0, description="global batch: split evenly over the workers")
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    class_weight_power: float = Field(0.5, ge=0, description="inverse class frequency ** power; 0: unweighted")
    lovasz_weight: float = Field(0.0, ge=0)
    focal_gamma: float = Field(
        0.0,
        ge=0,
        description="focal loss: each point's weighted cross entropy x (1 - p_true)^gamma; 0 is plain cross "
        "entropy, 2 the focal loss PoLAr-MAE fine-tunes with",
    )
    backbone_lr_scale: float = Field(0.05, gt=0, le=1, description="fft: encoder lr = lr x this x layer decay")
    layer_decay: float = Field(0.9, gt=0, le=1, description="fft: lr x decay^(depth from the top) per encoder block")
    encoder_frozen_steps: int = Field(
        0,
        ge=0,
        description="fft: only the head (and decoder) train for the first N "
        "steps, then everything (linear-probe-then-fine-tune)",
    )
    val_every: int = Field(200, gt=0, description="validate every N steps (and at the end)")
    val_events: int | None = Field(None, gt=0, description="cap on validation events (default: all)")
    augment: AugmentConfig = Field(
        default_factory=AugmentConfig,
        description="per-event rotations / mirrors of the training batches (validation never)",
    )


class FinetuneConfig(JobConfig):
    """A segmentation training job: data, model, optimisation, scaling and run storage."""

    task: Literal["segmentation"] = "segmentation"
    val_data: DataConfig
    model: ModelSection = Field(default_factory=ModelSection)
    train: TrainSection = Field(default_factory=TrainSection)

    @model_validator(mode="after")
    def _check(self) -> FinetuneConfig:
        if self.model.mode == "fft" and not self.model.init:
            raise ValueError("model.mode fft fine-tunes a pretrained backbone: set model.init (or use mode scratch)")
        if self.val_data.preprocess.remove_led != self.data.preprocess.remove_led:
            raise ValueError(
                f"data.preprocess.remove_led is {self.data.preprocess.remove_led} but val_data.preprocess.remove_led "
                f"is {self.val_data.preprocess.remove_led}: training and validation must share one label space"
            )
        if self.train.encoder_frozen_steps and self.model.mode != "fft":
            raise ValueError(
                f"train.encoder_frozen_steps ({self.train.encoder_frozen_steps}) holds a pretrained "
                f"encoder still at first: it needs model.mode fft, not {self.model.mode!r}"
            )
        return self


def train_step(
    model, params: list, opt, loss_fn, batch: dict, cfg: FinetuneConfig, device: torch.device, hold: list | None = None
) -> torch.Tensor:
    """One optimisation step on a packed batch: inputs -> forward (bf16 autocast on CUDA) -> loss on the points ->
    backward -> clip -> optimizer step (after the batch's augmentation, when `train.augment` asks for one). The
    parameters in `hold` lose their gradients before clipping, so AdamW skips them entirely (no update, no weight
    decay, no moment state). `raysvc bench train` times this same function without Ray."""
    pre = cfg.data.preprocess
    batch = {
        **batch,
        "coord": augment_coords(batch["coord"], batch["offset"], cfg.train.augment, pre.center),
    }  # no-op when off
    x = model_inputs(batch, pre.center, pre.scale, cfg.model.grid_voxels, device, cfg.model.center_events)
    with autocast(cfg.train.amp, device):
        logits = model(x["feat"], x["coord"], x["grid_coord"], x["offset"])
    loss = loss_fn(logits.float()[x["inverse"]], x["labels"])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    for p in hold or ():  # after backward: under DDP every rank has joined the gradient all-reduce already
        p.grad = None
    if cfg.train.grad_clip:
        torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
    opt.step()
    return loss.detach()


def build_model(cfg: FinetuneConfig, num_classes: int, init_state: dict | None = None) -> torch.nn.Module:
    """The segmenter of a job: backbone preset + head, the backbone loaded from `init_state` (an export's weights)
    unless the mode is scratch, frozen for lin / dec."""
    return init_backbone(ModelSpec(**cfg.model.model_dump()).build_segmenter(num_classes), cfg, init_state)


def init_backbone(model: torch.nn.Module, cfg: FinetuneConfig, init_state: dict | None) -> torch.nn.Module:
    """`model` (anything with `backbone` and `freeze_backbone`) with its encoder loaded from `init_state` unless the
    mode is scratch, and frozen for lin / dec."""
    if init_state is not None and cfg.model.mode != "scratch":
        load_backbone_weights(model, init_state, f"model.init does not match model.size {cfg.model.size!r}")
    if cfg.model.mode in ("lin", "dec"):
        model.freeze_backbone()
    return model


def validation_batches(
    cfg: FinetuneConfig, prep: Prepared, rank: int, world: int, collate=collate_packed
) -> list[dict]:
    """This rank's share of the validation events (shard i -> rank i mod world), read once and kept."""
    shards = rank_shards(prep, rank, world, 0, 0, shuffle=False)
    if not shards:
        return []
    cap = None if cfg.train.val_events is None else -(-cfg.train.val_events // world)
    out, n = [], 0
    for batch in pack_tables(stream_tables(cfg.val_data, prep, shards), cfg.val_data.batch_events, collate=collate):
        out.append(batch)
        n += len(batch["event_id"])
        if cap is not None and n >= cap:
            break
    return out


@torch.no_grad()
def evaluate(model, batches: list[dict], cfg: FinetuneConfig, device, world: int, class_names: list[str]) -> dict:
    """Metrics of the unwrapped model on this rank's validation batches, confusion all-reduced over the ranks (ranks
    hold different numbers of batches, so no DDP forward, whose buffer sync is a collective)."""
    model.eval()
    cm = ConfusionMatrix(len(class_names))
    pre = cfg.val_data.preprocess
    for batch in batches:
        x = model_inputs(batch, pre.center, pre.scale, cfg.model.grid_voxels, device, cfg.model.center_events)
        with autocast(cfg.train.amp, device):
            logits = model(x["feat"], x["coord"], x["grid_coord"], x["offset"])
        cm.update(logits.argmax(1)[x["inverse"]], x["labels"])
    if world > 1:
        cm.all_reduce_()
    model.train()
    return compute(cm.matrix, class_names)


def estimate_class_counts(cfg: FinetuneConfig, prep: Prepared, num_classes: int, max_shards: int = 2) -> list[int]:
    """Per-class point counts over the first shards of the training data (after the same preprocessing)."""
    counts = np.zeros(num_classes, np.int64)
    for rec in prep.manifest.shards[:max_shards]:
        table, _, _ = read_preprocessed(
            prep.root, rec, cfg.data.preprocess, prep.keep_ids, cfg.data.verify_checksums, prep.detector
        )
        if table.num_rows:
            sem = table.column("semantic").combine_chunks().flatten().to_numpy()
            counts += np.bincount(sem, minlength=num_classes)[:num_classes]
    return counts.tolist()


class SegmentationTask(Task):
    name = "segmentation"
    kind = "finetune"
    config = FinetuneConfig
    history_keys = ("train", "val")
    outputs: tuple[str, ...] = ()  # output adapters (inference/outputs) of what the export predicts beyond classes

    @classmethod
    def prepare(cls, cfg: FinetuneConfig, log) -> dict:
        """Both datasets (manifest + preflight of every shard), `model.init`, class weights. The prepared datasets go
        to the workers, so that the shards are preflighted once, here."""
        train, val = prepare(cfg.data), prepare(cfg.val_data)
        detector = train.detector
        if val.detector.name != detector.name:
            raise ValueError(
                f"val_data {cfg.val_data.uri} holds {val.detector.name} events, data "
                f"{cfg.data.uri} holds {detector.name} events"
            )
        init_state, licence = None, None
        if cfg.model.init and cfg.model.mode != "scratch":
            # any format raysvc reads; what a foreign checkpoint does not state is the job's
            init_state, init = read_model(
                resolve(cfg.model.init),
                needs=(),  # an encoder is all fine-tuning takes from it
                detector=detector.name,
                grid_voxels=cfg.model.grid_voxels,
                center_events=cfg.model.center_events,
            )
            licence = init.licence  # the weights' licence travels to what is fine-tuned from them
            if init.detector != detector.name:
                raise ValueError(
                    f"model.init {cfg.model.init} was trained on {init.detector} events, the data holds "
                    f"{detector.name} events"
                )
            if init.model.center_events and not cfg.model.center_events:
                cfg.model.center_events = True  # the backbone only knows centred events
            if init.model.arch != cfg.model.arch or init.model.arch != "ptv3" or init.source is not None:
                # the encoder is the export's, whatever the job file's PTv3 defaults say
                cfg.model.arch, cfg.model.size = init.model.arch, init.model.size
                cfg.model.overrides = dict(init.model.overrides)
                log(f"[raysvc] model.init is a {init.model.arch} {init.model.size} encoder ({init.method})")
            if abs(init.model.grid_voxels - cfg.model.grid_voxels) > 1e-3:
                raise ValueError(
                    f"model.grid_voxels {cfg.model.grid_voxels} differs from the grid of "
                    f"{init.model.grid_voxels} voxels that {cfg.model.init} was trained on"
                )
        # the encoder takes what the data carries (xyz + the detector's features) unless the job says otherwise
        cfg.model.overrides = with_input_channels(
            cfg.model.arch, cfg.model.size, cfg.model.overrides, detector.in_channels
        )
        names = list(detector.label_classes(cfg.data.preprocess.remove_led))
        counts = estimate_class_counts(cfg, train, len(names))
        weights = (
            class_weights(counts, cfg.train.class_weight_power).tolist()
            if cfg.train.class_weight_power
            else [1.0] * len(names)
        )
        log(
            f"[raysvc] class counts (first shards) {dict(zip(names, counts, strict=True))}; "
            f"loss weights {[round(w, 3) for w in weights]}"
        )
        inputs = {
            "train_data": train,
            "val_data": val,
            "init_state": init_state,
            "init_licence": licence,
            "class_names": names,
            "class_counts": counts,
            "class_weights": weights,
            "detector": detector.name,
        }
        return inputs | cls.detector_inputs(cfg, detector, inputs)

    @classmethod
    def detector_inputs(cls, cfg: FinetuneConfig, detector, inputs: dict) -> dict:
        """A task's own checks of the data's detector (a Detector) against the job, raising ValueError, and what it
        adds to the prepared inputs."""
        return {}

    @classmethod
    def finish(cls, cfg: FinetuneConfig, state: dict, run_loc: Location, inputs: dict, log) -> dict:
        history = state["history"]
        names = inputs["class_names"]
        save_export(run_loc, state["model"], cls.export_record(cfg, state, inputs))
        png = curves_png(cls.curve_history(history), f"{cfg.run.name}: {cls.name} {cfg.model.size} {cfg.model.mode}")
        write_bytes_atomic(run_loc.join("curves.png"), png)
        return {
            "val": history["val"][-1]["metrics"] if history["val"] else None,
            "class_counts": dict(zip(names, inputs["class_counts"], strict=True)),
            "class_weights": inputs["class_weights"],
        }

    @classmethod
    def export_record(cls, cfg: FinetuneConfig, state: dict, inputs: dict) -> ExportedModel:
        """What the export's config.json says of the model: a segmenter with the task's output adapters (a task with
        more heads adds to it)."""
        return ExportedModel(
            kind="segmenter",
            method=cls.name,
            detector=inputs["detector"],
            model=ModelSpec(**cfg.model.model_dump()),
            class_names=inputs["class_names"],
            outputs=list(cls.outputs),
            preprocess=cfg.data.preprocess,
            step=state["step"],
            licence=inputs.get("init_licence"),
        )

    @classmethod
    def outcome(cls, summary: dict) -> dict:
        val = summary.get("val") or {}
        sem = val.get("semantic", val)  # a panoptic run nests its semantic metrics
        return super().outcome(summary) | {"val_miou": sem.get("miou"), "val_iou": sem.get("iou")}

    @classmethod
    def curve_history(cls, history: dict) -> dict:
        """The history `curves.png` draws: train losses and the validation metrics of metrics.compute."""
        return history

    def __init__(self, cfg: FinetuneConfig, ctx: WorkerContext):
        import ray.train.torch

        super().__init__(cfg, ctx)
        self.class_names = ctx.inputs["class_names"]
        model = self.build(cfg, ctx).to(ctx.device)
        self.raw = model
        self.model = ray.train.torch.prepare_model(model, move_to_device=False) if ctx.world > 1 else model
        self.params = [p for p in model.parameters() if p.requires_grad]
        if cfg.model.mode == "fft":  # the pretrained encoder at lr x backbone_lr_scale with layer decay
            groups = param_groups(
                model,
                encoder_depths(model.backbone.cfg),
                cfg.train.lr,
                cfg.train.layer_decay,
                cfg.train.weight_decay,
                backbone_scale=cfg.train.backbone_lr_scale,
                prefix=self.encoder_prefix,
            )
        else:
            groups = [{"params": self.params}]
        opt = adamw(groups, cfg.train.lr, weight_decay=cfg.train.weight_decay)
        self.encoder = [p for p in model.backbone.parameters() if p.requires_grad]  # held for encoder_frozen_steps
        sched = one_cycle_scheduler(opt, cfg.train.steps, cfg.train.warmup_frac, cfg.train.final_lr_frac)
        weights = torch.tensor(ctx.inputs["class_weights"], dtype=torch.float32, device=ctx.device)
        self.loss_fn = SegLoss(weights, cfg.train.lovasz_weight, focal_gamma=cfg.train.focal_gamma)
        self.parts = {"model": model, "optimizer": opt, "scheduler": sched}
        self.eval_every = cfg.train.val_every
        self.val_batches: list[dict] | None = None

    encoder_prefix = "backbone."  # where the model's encoder parameters sit (for the fft layer decay)

    def build(self, cfg: FinetuneConfig, ctx: WorkerContext) -> torch.nn.Module:
        """The model this task trains (on the CPU; the constructor moves it)."""
        return build_model(cfg, len(ctx.inputs["class_names"]), ctx.inputs["init_state"])

    def step(self, batch: dict, step: int) -> dict:
        hold = self.encoder if step < self.cfg.train.encoder_frozen_steps else None
        loss = train_step(
            self.model, self.params, self.parts["optimizer"], self.loss_fn, batch, self.cfg, self.ctx.device, hold
        )
        self.parts["scheduler"].step()
        return {"loss": loss}

    def optimise(self, loss: torch.Tensor, step: int) -> None:
        """Backward, the encoder held for `encoder_frozen_steps`, clip, AdamW, lr schedule: the end of a step of a
        task whose loss has several parts."""
        opt = self.parts["optimizer"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if step < self.cfg.train.encoder_frozen_steps:
            for p in self.encoder:
                p.grad = None
        if self.cfg.train.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.train.grad_clip)
        opt.step()
        self.parts["scheduler"].step()

    def optimise_parts(self, losses: dict[str, torch.Tensor], step: int) -> dict:
        """`optimise` the sum of the loss's parts; the step's record: the loss and each part, detached."""
        loss = sum(losses.values())
        self.optimise(loss, step)
        return {"loss": loss.detach(), **{k: v.detach() for k, v in losses.items()}}

    def validate(self, step: int, evaluate_fn=evaluate, *args, collate=collate_packed) -> dict:
        """`evaluate_fn(model, batches, cfg, device, world, class_names, *args)` on this rank's validation batches
        (read at the first call and kept), appended to the history; its metrics."""
        ctx = self.ctx
        if self.val_batches is None:
            self.val_batches = validation_batches(self.cfg, ctx.inputs["val_data"], ctx.rank, ctx.world, collate)
        val = evaluate_fn(self.raw, self.val_batches, self.cfg, ctx.device, ctx.world, self.class_names, *args)
        ctx.history["val"].append({"step": step, "elapsed_s": time.perf_counter() - ctx.t_start, "metrics": val})
        return val

    def evaluate(self, step: int) -> None:
        val = self.validate(step)
        ctx = self.ctx
        ctx.tracker.log(
            {"val/miou": val["miou"], **{f"val/iou_{k}": v for k, v in val["iou"].items() if v is not None}}, step
        )
        if ctx.rank == 0:
            iou = " ".join(f"{k} {v:.3f}" for k, v in val["iou"].items() if v is not None)
            print(f"[raysvc] val step {step}: mIoU {val['miou'] or 0:.4f} ({iou})", flush=True)

    def report_metrics(self) -> dict:
        val = self.ctx.history["val"]
        return {"val_miou": val[-1]["metrics"]["miou"]} if val else {}
