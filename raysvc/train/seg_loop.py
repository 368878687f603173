"""The per-worker segmentation training loop that `ray.train.torch.TorchTrainer` runs (Train V2 API).

Reads top to bottom: build the model (optionally from an exported backbone), wrap it in DDP, restore the last
checkpoint if the run has one, then step: a batch from this rank's deterministic stream (Ray tasks read its
shards) -> forward (bf16 autocast on CUDA) -> class-weighted CE (+ Lovasz) -> backward -> clip -> AdamW ->
one-cycle lr. Validation every `val_every` steps (confusion matrices all-reduced), checkpoints every
`checkpoint_every` steps.

Determinism (resume == uninterrupted run): every rank loops over its own fixed shards in a seeded order per
epoch (read and preprocessed by Ray tasks a few shards ahead: `pipeline.stream_tables`), and a checkpoint stores
each rank's (epoch, batches consumed) and its torch / numpy / Python RNG states. Ranks run the same number of
steps, so uneven data per rank can never leave one waiting in a collective.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path

import torch

from raysvc.data.pipeline import Prepared, pack_tables, rank_shards, stream_tables
from raysvc.data.schema import CLASS_NAMES
from raysvc.models.heads import SegModel
from raysvc.models.ptv3 import preset
from raysvc.ops.grid import grid_sample
from raysvc.ops.packed import offset_to_batch, segment_mean
from raysvc.train import heap
from raysvc.train.augment import augment_coords
from raysvc.train.job_config import FinetuneConfig
from raysvc.train.losses import SegLoss
from raysvc.train.metrics import ConfusionMatrix, compute
from raysvc.train.optim import param_groups
from raysvc.train.schedule import one_cycle_scheduler
from raysvc.train.tracking import Tracker
from raysvc.train.worker import (
    RankStream,
    autocast,
    load_checkpoint_state,
    restore,
    save,
    worker_setup,
)


def model_inputs(batch: dict, center: float, scale: float, grid_voxels: float, device: torch.device,
                 center_events: bool = False) -> dict:  # fmt: skip
    """Packed batch -> model inputs on `device`: grid sampling at `grid_voxels` (a cell takes the mean coordinate and
    the summed energy feature of its points), integer grid coordinates, and `inverse` from points to cells. With
    `center_events`, each event's coordinates are shifted to its mean (as Panda's views are: a backbone pretrained
    on them expects it)."""
    voxel = torch.round(batch["coord"].double() * scale + center)  # undo the normalisation: exact voxel indices
    gs = grid_sample(voxel, batch["offset"], grid_voxels, feat=batch["energy"].double())
    coord = (gs.coord - center) / scale
    if center_events:
        cell_batch = offset_to_batch(gs.offset)
        coord = coord - segment_mean(coord, cell_batch, len(gs.offset))[cell_batch]
    coord = coord.float()
    feat = torch.cat([coord, gs.feat_sum.float()], 1)
    return {"feat": feat.to(device), "coord": coord.to(device),
            "grid_coord": gs.grid_coord.to(device), "offset": gs.offset.to(device), "inverse": gs.inverse.to(device),
            "labels": batch["semantic"].to(device)}  # fmt: skip


def train_step(model, params: list, opt, loss_fn, batch: dict, cfg: FinetuneConfig, device: torch.device,
               hold: list | None = None) -> torch.Tensor:  # fmt: skip
    """One optimisation step on a packed batch: inputs -> forward (bf16 autocast on CUDA) -> loss on the points ->
    backward -> clip -> optimizer step (after the batch's augmentation, when `train.augment` asks for one). The
    parameters in `hold` lose their gradients before clipping, so AdamW skips them entirely (no update, no weight
    decay, no moment state). `raysvc bench train` times this same function without Ray."""
    pre = cfg.data.preprocess
    batch = {**batch, "coord": augment_coords(batch["coord"], batch["offset"], cfg.train.augment)}  # no-op when off
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


def build_model(cfg: FinetuneConfig, init_state: dict | None = None) -> SegModel:
    model = SegModel(preset(cfg.model.size, **cfg.model.overrides), len(CLASS_NAMES), cfg.model.head)
    if init_state is not None and cfg.model.mode != "scratch":
        skip = ("head.", "decoder.")
        backbone = {k.removeprefix("backbone."): v for k, v in init_state.items() if not k.startswith(skip)}
        missing, unexpected = model.backbone.load_state_dict(backbone, strict=False)
        if missing or unexpected:
            raise ValueError(f"model.init does not match model.size {cfg.model.size!r}: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")  # fmt: skip
    if cfg.model.mode in ("lin", "dec"):
        model.freeze_backbone()
    return model


def validation_batches(cfg: FinetuneConfig, prep: Prepared, rank: int, world: int) -> list[dict]:
    """This rank's share of the validation events (shard i -> rank i mod world), read once and kept."""
    shards = rank_shards(prep, rank, world, 0, 0, shuffle=False)
    if not shards:
        return []
    cap = None if cfg.train.val_events is None else -(-cfg.train.val_events // world)
    out, n = [], 0
    for batch in pack_tables(stream_tables(cfg.val_data, prep, shards), cfg.val_data.batch_events):
        out.append(batch)
        n += len(batch["event_id"])
        if cap is not None and n >= cap:
            break
    return out


@torch.no_grad()
def evaluate(model, batches: list[dict], cfg: FinetuneConfig, device, world: int) -> dict:
    """Metrics of the unwrapped model on this rank's validation batches, confusion all-reduced over the ranks (ranks
    hold different numbers of batches, so no DDP forward, whose buffer sync is a collective)."""
    model.eval()
    cm = ConfusionMatrix(len(CLASS_NAMES))
    pre = cfg.val_data.preprocess
    for batch in batches:
        x = model_inputs(batch, pre.center, pre.scale, cfg.model.grid_voxels, device, cfg.model.center_events)
        with autocast(cfg.train.amp, device):
            logits = model(x["feat"], x["coord"], x["grid_coord"], x["offset"])
        cm.update(logits.argmax(1)[x["inverse"]], x["labels"])
    if world > 1:
        cm.all_reduce_()
    model.train()
    return compute(cm.matrix, CLASS_NAMES)


def seg_train_loop(config: dict) -> None:
    import ray.train.torch

    cfg = FinetuneConfig.model_validate(config["job"])
    rank, world, device = worker_setup(cfg.train.seed, cfg.scaling)

    init_state = config.get("init_state")
    model = build_model(cfg, init_state).to(device)
    raw = model
    if world > 1:
        model = ray.train.torch.prepare_model(model, move_to_device=False)
    params = [p for p in raw.parameters() if p.requires_grad]
    if cfg.model.mode == "fft":  # docs/methods.md, "Fine-tuning": the pretrained encoder at lr x 0.05 with layer decay
        groups = param_groups(raw, raw.backbone.cfg.depths, cfg.train.lr, cfg.train.layer_decay,
                              cfg.train.weight_decay, backbone_scale=cfg.train.backbone_lr_scale)  # fmt: skip
    else:
        groups = [{"params": params}]
    opt = torch.optim.AdamW(groups, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    encoder = [p for p in raw.backbone.parameters() if p.requires_grad]  # held still for encoder_frozen_steps
    sched = one_cycle_scheduler(opt, cfg.train.steps, cfg.train.warmup_frac, cfg.train.final_lr_frac)
    loss_fn = SegLoss(torch.tensor(config["class_weights"], dtype=torch.float32, device=device),
                      cfg.train.lovasz_weight)  # fmt: skip

    parts = {"model": raw, "optimizer": opt, "scheduler": sched}
    step, history, (epoch, consumed), resumed_counts = restore(load_checkpoint_state(), parts, rank, world,
                                                               {"train": [], "val": []})  # fmt: skip

    per_rank = cfg.train.batch_events // world

    def make_batches(shards: list, epoch: int, counts: Counter):
        return pack_tables(stream_tables(cfg.data, config["train_data"], shards, counts), per_rank, drop_last=True)

    rank_stream = RankStream(config["train_data"], rank, world, cfg.train.seed, make_batches, epoch, consumed)
    rank_stream.counts.update(resumed_counts)
    stream = iter(rank_stream)
    val_batches: list[dict] | None = None
    fault = config.get("fault") or {}  # tests of fault tolerance: raise once at this step (a marker file remembers)
    t_start = t_last = time.perf_counter()  # elapsed_s counts from here: this process's steps, not Ray's startup
    ev_since = 0
    last_val: dict | None = history["val"][-1]["metrics"] if history["val"] else None

    local_dir = None if cfg.run.storage.startswith("s3://") else os.path.abspath(cfg.run.storage.removeprefix("file://"))
    tracker = Tracker(cfg.run.wandb_project, cfg.run.name, cfg.run.wandb_mode, config["job"], rank, local_dir,
                      group=cfg.run.wandb_group)
    if step >= cfg.train.steps:  # re-run of a finished run: hand its last state back
        _report(parts, step, history, last_val, rank, world, rank_stream)
    while step < cfg.train.steps:
        batch = next(stream)
        hold = encoder if step < cfg.train.encoder_frozen_steps else None
        loss = train_step(model, params, opt, loss_fn, batch, cfg, device, hold)
        sched.step()
        if cfg.train.trim_heap and device.type == "cpu":
            heap.trim()
        step += 1
        ev_since += len(batch["event_id"])
        if fault and step == fault["step"] and rank == 0 and not os.path.exists(fault["marker"]):
            Path(fault["marker"]).write_text(str(step))
            raise RuntimeError(f"injected fault at step {step}")
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            dt = time.perf_counter() - t_last
            rec = heap.with_private_mb({"step": step, "loss": float(loss), "lr": max(sched.get_last_lr()),
                                        "events_per_s": ev_since * world / dt})  # fmt: skip
            history["train"].append(rec)
            tracker.log({f"train/{k}": v for k, v in rec.items() if k != "step"}, step)
            if rank == 0:
                print(f"[raysvc] step {step}/{cfg.train.steps} loss {rec['loss']:.4f} lr {rec['lr']:.2e} "
                      f"{rec['events_per_s']:.1f} ev/s{heap.memory_note(rec)}", flush=True)  # fmt: skip
            t_last, ev_since = time.perf_counter(), 0
        if step % cfg.train.val_every == 0 or step == cfg.train.steps:
            if val_batches is None:
                val_batches = validation_batches(cfg, config["val_data"], rank, world)
            last_val = evaluate(raw, val_batches, cfg, device, world)
            history["val"].append({"step": step, "elapsed_s": time.perf_counter() - t_start, "metrics": last_val})
            tracker.log({"val/miou": last_val["miou"], **{f"val/iou_{k}": v for k, v in last_val["iou"].items()
                                                          if v is not None}}, step)  # fmt: skip
            if rank == 0:
                iou = " ".join(f"{k} {v:.3f}" for k, v in last_val["iou"].items() if v is not None)
                print(f"[raysvc] val step {step}: mIoU {last_val['miou'] or 0:.4f} ({iou})", flush=True)
        if step % cfg.train.checkpoint_every == 0 or step == cfg.train.steps:
            _report(parts, step, history, last_val, rank, world, rank_stream)
    tracker.finish()


def _report(parts: dict, step: int, history: dict, last_val: dict | None, rank: int, world: int,
            stream: RankStream) -> None:  # fmt: skip
    metrics = {"step": step, "loss": history["train"][-1]["loss"] if history["train"] else None}
    if last_val is not None:
        metrics["val_miou"] = last_val["miou"]
    save(parts, step, history, rank, world, stream, metrics)
