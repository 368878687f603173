"""PoLAr-MAE pretraining (`raysvc pretrain`, method `polarmae`): masked point modelling on C-NMS tokens.

A step: a packed batch of this rank's events -> (optional) per-event rotation -> C-NMS tokens (centres, balls of up
to `max_points` points, at most `max_tokens` per event) -> a random `mask_ratio` of each event's tokens hidden ->
encoder on the visible tokens, decoder on visible + mask tokens -> Chamfer loss on the masked groups' points +
energy-infill loss -> backward -> clip -> AdamW -> one-cycle lr. The mask of step s on rank r is drawn from a
generator seeded by (seed, r, s), so a resumed run masks exactly as an uninterrupted one.

The online token probe (rank 0, `train/token_probe.py`) runs at step 0 (the random initialisation: the baseline)
and every `probe.every` steps on held-out labelled events. The export is the encoder (`backbone.safetensors`, a
`backbone` record with `model.arch = polarmae`), which `raysvc finetune --set model.init=DIR` takes.
Defaults are the paper's (docs/methods.md, "PoLAr-MAE"); the tiny job scales sizes down for CPUs.
"""

from __future__ import annotations

import time
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from raysvc.data.streaming.config import DataConfig
from raysvc.data.streaming.pipeline import stream_tables
from raysvc.inference.record import ModelSpec
from raysvc.models.polarmae import PRESETS, PolarMAE, PolarMAEConfig, preset, token_targets, tokenize
from raysvc.storage import Location, write_bytes_atomic
from raysvc.train.augment import AugmentConfig, augment_coords
from raysvc.train.config import JobConfig, LoopSection, RunSection
from raysvc.train.optim import adamw, encoder_depths, param_groups
from raysvc.train.plots import mae_png
from raysvc.train.schedule import one_cycle_scheduler
from raysvc.train.tasks.base import Task, WorkerContext
from raysvc.train.tasks.panda import probe_batches
from raysvc.train.tasks.pretraining import export_backbone, prepare_pretraining, probe_figures, training_plan
from raysvc.train.token_probe import TokenProbeConfig, fit_and_score, scored_classes
from raysvc.train.worker import autocast


class MAEModelSection(BaseModel):
    """The PoLAr-MAE network: a named preset and the fields that replace the preset's. Tokenizer lengths are given in
    voxels here and converted to the model's normalised coordinates with the data's scale."""

    model_config = ConfigDict(extra="forbid")
    size: str = Field("base", description=f"preset: one of {sorted(PRESETS)}")
    overrides: dict = Field(default_factory=dict, description="PolarMAEConfig fields that replace the preset's")
    radius_voxels: float = Field(5.0, gt=0, description="C-NMS / ball-query radius in voxels (paper: 5)")
    overlap: float = Field(0.72, gt=0, description="C-NMS overlap factor (paper's code: 0.72)")
    max_points: int = Field(32, ge=1, description="points per group")
    max_tokens: int = Field(512, ge=1, description="tokens per event (the first in C-NMS order are kept)")
    mask_ratio: float = Field(0.6, ge=0, lt=1)

    @field_validator("size")
    @classmethod
    def _size(cls, size: str) -> str:
        if size not in PRESETS:
            raise ValueError(f"one of {sorted(PRESETS)}, got {size!r}")
        return size

    @field_validator("overrides")
    @classmethod
    def _overrides(cls, overrides: dict) -> dict:
        tokenizer = {"radius", "overlap", "max_points", "max_tokens", "mask_ratio"} & set(overrides)
        if tokenizer:
            raise ValueError(f"set {sorted(tokenizer)} as model.<field> (radius as model.radius_voxels)")
        unknown = set(overrides) - set(PolarMAEConfig.model_fields)
        if unknown:
            raise ValueError(f"{sorted(unknown)} are not PolarMAEConfig fields")
        return overrides

    def network(self, scale: float) -> PolarMAEConfig:
        """The model's config for data whose coordinates are voxels / `scale`."""
        return preset(
            self.size,
            **self.overrides,
            radius=self.radius_voxels / scale,
            overlap=self.overlap,
            max_points=self.max_points,
            max_tokens=self.max_tokens,
            mask_ratio=self.mask_ratio,
        )


class MAETrain(LoopSection):
    batch_events: int = Field(32, gt=0, description="global batch of events")
    lr: float = Field(5e-4, gt=0)
    weight_decay: float = Field(0.05, ge=0, description="AdamW, on matrices only")
    augment: AugmentConfig = Field(
        default_factory=lambda: AugmentConfig(rotate_p=1.0),
        description="per-event rotations of the training events (the paper's only augmentation)",
    )


class PolarMAEJob(JobConfig):
    """A PoLAr-MAE pretraining job: unlabelled data, labelled held-out data for the token probe, model, loop."""

    task: Literal["polarmae"] = "polarmae"
    probe_data: DataConfig | None = Field(None, description="labelled held-out events for the online token probe")
    model: MAEModelSection = Field(default_factory=MAEModelSection)
    train: MAETrain = Field(default_factory=MAETrain)
    probe: TokenProbeConfig = Field(default_factory=TokenProbeConfig)
    run: RunSection = Field(default_factory=lambda: RunSection(name="pretrain-polarmae"))

    @property
    def network(self) -> PolarMAEConfig:
        return self.model.network(self.data.preprocess.scale)


def batch_tokens(batch: dict, cfg: PolarMAEConfig, device: torch.device, augment: AugmentConfig | None = None):
    """Tokens of a packed batch (coordinates as the data gives them, rotated per event when `augment` says so)."""
    coord = batch["coord"] if augment is None else augment_coords(batch["coord"], batch["offset"], augment)
    return tokenize(coord.float(), batch["energy"].float(), batch["offset"], cfg).to(device)


def mae_step(model, params: list, opt, sched, batch: dict, cfg: PolarMAEJob, step: int, rank: int, device) -> tuple:
    """One PoLAr-MAE optimisation step on a packed batch: tokens (rotated when `train.augment` asks) -> the mask of
    (seed, rank, step) -> forward (bf16 autocast on CUDA with `train.amp`) -> backward -> clip -> AdamW -> lr
    schedule. Returns (the model's outputs, the tokens). `raysvc bench gpu` times this same function."""
    tokens = batch_tokens(batch, cfg.network, device, cfg.train.augment)
    seed = np.random.SeedSequence([cfg.train.seed, rank, step]).generate_state(1)[0]
    gen = torch.Generator().manual_seed(int(seed))  # the mask of (seed, rank, step): the same after a resume
    with autocast(cfg.train.amp, device):
        out = model(tokens, gen)
    opt.zero_grad(set_to_none=True)
    out["loss"].backward()
    if cfg.train.grad_clip:
        torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
    opt.step()
    sched.step()
    return out, tokens


@torch.no_grad()
def token_features(model: PolarMAE, batches: list[dict], cfg: PolarMAEConfig, num_classes: int, device):
    """(features (T, width) float32, targets (T, classes) bool) of every token of `batches`, encoder frozen."""
    was = model.training
    model.eval()
    feats, targets = [], []
    for batch in batches:
        tokens = batch_tokens(batch, cfg, device)
        feats.append(model.encoder.encode(tokens).float().cpu().numpy())
        targets.append(token_targets(tokens.groups, tokens.sizes, batch["semantic"].to(device), num_classes).cpu())
    model.train(was)
    return np.concatenate(feats), torch.cat(targets).numpy()


class PolarMAETask(Task):
    name = "polarmae"
    kind = "pretrain"
    config = PolarMAEJob
    history_keys = ("train", "probe")

    @classmethod
    def outcome(cls, summary: dict) -> dict:
        """The token probe's figures."""
        probe = summary.get("probe") or {}
        if "token_mean_f1" not in probe:
            return super().outcome(summary)
        figures = probe_figures(probe, ("token_mean_f1", "random_token_mean_f1", "token_f1"))
        return super().outcome(summary) | figures | {"tokens": summary.get("tokens")}

    @classmethod
    def prepare(cls, cfg: PolarMAEJob, log) -> dict:
        inputs = prepare_pretraining(cfg)
        train, probe = inputs["train_data"], inputs["probe_data"]
        net = cfg.network
        log(
            f"[raysvc] pretraining {cfg.model.size} PoLAr-MAE on {cfg.data.uri} ({train.manifest.events} events), "
            f"{training_plan(cfg)}; tokens: "
            f"C-NMS r = {cfg.model.radius_voxels} voxels, overlap {net.overlap}, <= {net.max_points} points, "
            f"<= {net.max_tokens} per event, {net.mask_ratio:.0%} masked"
        )
        scored = scored_classes(cfg.probe, probe.detector) if probe is not None else list(cfg.probe.classes or [])
        return {**inputs, "scored_classes": scored}

    @classmethod
    def finish(cls, cfg: PolarMAEJob, state: dict, run_loc: Location, inputs: dict, log) -> dict:
        history = state["history"]
        encoder = {k.removeprefix("encoder."): v for k, v in state["model"].items() if k.startswith("encoder.")}
        spec = ModelSpec(arch="polarmae", size=cfg.model.size, overrides=_network_overrides(cfg))
        export_backbone(run_loc, encoder, spec, cls.name, cfg, inputs, state["step"])
        probes = history["probe"]
        probe = None
        if probes:
            last, base = probes[-1], (probes[0] if probes[0]["step"] == 0 else None)
            probe = {
                "token_f1": last["token_f1"],
                "token_mean_f1": last["token_mean_f1"],
                "curve": [[p["step"], p["token_mean_f1"]] for p in probes],
                "classes": inputs["scored_classes"],
                "random_token_f1": base["token_f1"] if base else None,
                "random_token_mean_f1": base["token_mean_f1"] if base else None,
                "gain": (last["token_mean_f1"] - base["token_mean_f1"])
                if base and None not in (last["token_mean_f1"], base["token_mean_f1"])
                else None,
            }
        write_bytes_atomic(run_loc.join("curves.png"), mae_png(history, f"{cfg.run.name}: {cfg.model.size} PoLAr-MAE"))
        train = history["train"]
        # log records hold window means: events over the context = mean per step x steps in the window
        windows = np.diff([0] + [r["step"] for r in train])
        truncated = sum(r["truncated_events"] * w for r, w in zip(train, windows, strict=True))
        return {
            "probe": probe,
            "tokens": {
                "per_event_mean": float(np.mean([r["tokens_per_event"] for r in train])) if train else None,
                "truncated_events": int(round(truncated)),
                "max_tokens": cfg.network.max_tokens,
            },
        }

    def __init__(self, cfg: PolarMAEJob, ctx: WorkerContext):
        import ray.train.torch

        super().__init__(cfg, ctx)
        torch.manual_seed(cfg.train.seed)  # the same initial model on every rank (DDP broadcasts it anyway)
        self.net = cfg.network
        self.model = PolarMAE(self.net).to(ctx.device)
        self.ddp = ray.train.torch.prepare_model(self.model, move_to_device=False) if ctx.world > 1 else self.model
        # weight decay on matrices only; no layer-wise decay in pretraining (decay 1.0: one lr everywhere)
        depths = encoder_depths(self.net)
        groups = param_groups(self.model, depths, cfg.train.lr, 1.0, cfg.train.weight_decay, prefix="encoder.")
        opt = adamw(groups, cfg.train.lr)
        sched = one_cycle_scheduler(opt, cfg.train.steps, cfg.train.warmup_frac, cfg.train.final_lr_frac)
        self.params = list(self.model.parameters())
        self.parts = {"model": self.model, "optimizer": opt, "scheduler": sched}
        self.eval_every = cfg.probe.every
        self.probe_sets = None

    def step(self, batch: dict, step: int) -> dict:
        opt, sched = self.parts["optimizer"], self.parts["scheduler"]
        out, tokens = mae_step(self.ddp, self.params, opt, sched, batch, self.cfg, step, self.ctx.rank, self.ctx.device)
        n_events = len(batch["offset"])
        return {
            "loss": out["loss"].detach(),
            "chamfer_loss": out["chamfer_loss"].detach(),
            "energy_loss": out["energy_loss"].detach(),
            "tokens_per_event": len(tokens) / max(n_events, 1),
            "masked_frac": float(out["masked_frac"]),
            "truncated_events": float(tokens.truncated),  # events of this batch over max_tokens
        }

    def progress(self, rec: dict) -> str:
        trunc = rec.get("truncated_events", 0)
        note = f", {trunc:.2f} events/step over {self.net.max_tokens} tokens" if trunc else ""
        return (
            f"loss {rec['loss']:.4f} (chamfer {rec['chamfer_loss']:.4f} energy {rec['energy_loss']:.4f}) "
            f"{rec['tokens_per_event']:.0f} tokens/event{note} lr {rec['lr']:.2e}"
        )

    def start(self, step: int) -> None:
        if step == 0 and not self.ctx.history["probe"]:
            self.evaluate(0)  # the randomly initialised encoder: the probe's baseline

    def evaluate(self, step: int) -> None:
        """The online token probe (rank 0 only) on the held-out labelled events."""
        cfg, ctx = self.cfg, self.ctx
        if ctx.rank != 0 or cfg.probe_data is None:
            return
        names = ctx.inputs["class_names"]
        if self.probe_sets is None:
            prep = ctx.inputs["probe_data"]
            tables = stream_tables(cfg.probe_data, prep, prep.manifest.shards)
            self.probe_sets = probe_batches(tables, cfg.probe.train_events, cfg.probe.val_events, cfg.probe_data.uri)
        t0 = time.perf_counter()
        train = token_features(self.model, self.probe_sets[0], self.net, len(names), ctx.device)
        val = token_features(self.model, self.probe_sets[1], self.net, len(names), ctx.device)
        m = fit_and_score(train, val, cfg.probe, names, ctx.inputs["scored_classes"], seed=cfg.train.seed)
        rec = {"step": step, "token_f1": m["f1"], "token_mean_f1": m["mean_f1"], "tokens": m["tokens"]}
        ctx.history["probe"].append(rec)
        ctx.tracker.log({"probe/token_mean_f1": m["mean_f1"]}, step)
        f1 = " ".join(f"{k} {v:.2f}" for k, v in m["f1"].items() if v is not None)
        print(
            f"[raysvc] token probe step {step}: mean F1 {m['mean_f1']:.4f} ({f1}) [{time.perf_counter() - t0:.0f} s]",
            flush=True,
        )

    def report_metrics(self) -> dict:
        probes = self.ctx.history["probe"]
        return {"token_mean_f1": probes[-1]["token_mean_f1"]} if probes else {}


def _network_overrides(cfg: PolarMAEJob) -> dict:
    """Every field of the network that differs from its preset, so the export rebuilds it exactly."""
    full, base = cfg.network.model_dump(), preset(cfg.model.size).model_dump()
    return {k: v for k, v in full.items() if v != base[k]}
