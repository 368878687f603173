"""Panda pretraining (`raysvc pretrain`, method `panda`): Sonata-style self-distillation of a PTv3 encoder.

A step: views of this rank's events (made by the CPU read tasks: `data.views.views_table`) -> grid masks on the
global views -> teacher on the unmasked globals, student on the masked globals and the locals -> the three Panda
losses against Sinkhorn targets -> backward -> clip -> AdamW -> EMA update of the teacher. Schedules (mask size /
ratio, teacher temperature, momentum, weight decay, lr) are functions of the step, so a resumed run continues them
exactly. Collapse monitors every `monitor_every` steps; the online linear probe (rank 0) at step 0 (the random
initialisation: the baseline) and every `probe.every` steps. The export is the student's backbone. Defaults are
Panda-Base's (docs/methods.md, "Panda"); the tiny job scales sizes down for CPUs.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import pyarrow as pa
import torch
from pydantic import Field, model_validator

from raysvc.data.contract.detectors import get_detector
from raysvc.data.streaming.collate import collate_packed
from raysvc.data.streaming.config import DataConfig
from raysvc.data.streaming.pipeline import stream_tables
from raysvc.data.streaming.views import ViewConfig, collate_view_table, views_table
from raysvc.inference.featurize import model_inputs
from raysvc.inference.record import ModelSpec
from raysvc.models.archs import with_input_channels
from raysvc.models.panda import (
    Encoded,
    PandaConfig,
    PandaStudent,
    collapse_monitors,
    cosine,
    ema_update,
    grid_mask,
    make_teacher,
    panda_losses,
    teacher_forward,
    warm,
)
from raysvc.models.ptv3 import preset
from raysvc.storage import Location, write_bytes_atomic
from raysvc.train.config import BackboneSection, JobConfig, LoopSection, RunSection
from raysvc.train.optim import adamw, param_groups
from raysvc.train.plots import pretrain_png
from raysvc.train.probe import ProbeConfig, run_probe
from raysvc.train.schedule import one_cycle_scheduler
from raysvc.train.tasks.base import Task, WorkerContext
from raysvc.train.tasks.pretraining import export_backbone, prepare_pretraining, probe_figures, training_plan
from raysvc.train.worker import autocast, seed_everything


class PretrainTrain(LoopSection):
    batch_events: int = Field(48, gt=0, description="global batch of events (each gives 2 global + 6 local views)")
    lr: float = Field(0.0026, gt=0)
    layer_decay: float = Field(0.9, gt=0, le=1, description="lr x decay^(depth from the top) per backbone block")
    weight_decay: tuple[float, float] = Field((0.04, 0.2), description="cosine from the first to the second")
    monitor_every: int = Field(10, gt=0, description="collapse monitors (prototype usage, feature std) every N steps")


class PretrainConfig(JobConfig):
    """A pretraining job: unlabelled data, labelled held-out data for the probe, backbone, views, method, scaling."""

    task: Literal["panda"] = "panda"
    probe_data: DataConfig | None = Field(None, description="labelled held-out events for the online linear probe")
    model: BackboneSection = Field(default_factory=lambda: BackboneSection(size="base"))
    views: ViewConfig = Field(default_factory=ViewConfig)
    panda: PandaConfig = Field(default_factory=PandaConfig)
    train: PretrainTrain = Field(default_factory=PretrainTrain)
    probe: ProbeConfig = Field(default_factory=ProbeConfig)
    run: RunSection = Field(default_factory=lambda: RunSection(name="pretrain-panda"))

    @model_validator(mode="after")
    def _check(self) -> PretrainConfig:
        if self.views.global_views < 2 and self.panda.roll_mask_weight > 0:
            raise ValueError("panda.roll_mask_weight needs views.global_views >= 2")
        if self.views.local_views == 0 and self.panda.unmask_weight > 0:
            raise ValueError("panda.unmask_weight needs views.local_views >= 1")
        return self

    @property
    def grid_voxels(self) -> float:
        """The view grid in voxels: fine-tuning and the probe sample at the same resolution."""
        return self.views.grid * self.data.preprocess.scale


def _to(view: dict | None, device: torch.device) -> dict | None:
    return None if view is None else {k: v.to(device, non_blocking=True) for k, v in view.items()}


def probe_tables(
    tables: Iterable[pa.Table],
    train_events: int,
    val_events: int,
    source: str,
    batch_events: int = 4,
) -> tuple[list[pa.Table], list[pa.Table]]:
    """(probe-train chunks, probe-val chunks) of at most `batch_events` events: the first `train_events` preprocessed
    events of `tables`, then the next `val_events`, in order (the same events for every probe and every run)."""
    need, got = train_events + val_events, []
    for table in tables:
        got.append(table)
        if sum(t.num_rows for t in got) >= need:
            break
    events = pa.concat_tables(got) if got else None
    if events is None or events.num_rows < need:
        raise ValueError(
            f"{source}: the probe needs {need} events after the cuts, found {0 if events is None else events.num_rows}"
        )

    def cut(start: int, n: int) -> list[pa.Table]:
        return [events.slice(a, min(batch_events, start + n - a)) for a in range(start, start + n, batch_events)]

    return cut(0, train_events), cut(train_events, val_events)


def probe_batches(
    tables: Iterable[pa.Table], train_events: int, val_events: int, source: str
) -> tuple[list[dict], list[dict]]:
    """`probe_tables`' chunks, packed."""
    train, val = probe_tables(tables, train_events, val_events, source)
    return [collate_packed(t) for t in train], [collate_packed(t) for t in val]


def step_values(cfg: PretrainConfig, step: int) -> dict:
    """The step-dependent values of the recipe at `step` (the lr has its own scheduler)."""
    p, total = cfg.panda, cfg.train.steps
    return {
        "mask_size": warm(step, total, *p.mask_size, p.mask_warmup_frac),
        "mask_ratio": warm(step, total, *p.mask_ratio, p.mask_warmup_frac),
        "teacher_temp": warm(step, total, *p.teacher_temp, p.teacher_temp_warmup_frac),
        "momentum": cosine(step, total, *p.momentum),
        "weight_decay": cosine(step, total, *cfg.train.weight_decay),
    }


@dataclass
class StepOut:
    losses: dict  # "loss" (the one backpropagated) and its parts
    student: dict  # PandaStudent's outputs: {"global" / "local": (Encoded, prototype similarities)}
    teacher_enc: Encoded
    teacher_sims: dict
    mask: torch.Tensor  # (points of the global views,) bool: masked for the student
    values: dict  # step_values used (the mask ratio there is the scheduled one, not the drawn one)


def panda_forward(ddp: torch.nn.Module, teacher: PandaStudent, batch: dict, cfg: PretrainConfig, values: dict, device):
    """Forward half of a Panda step on a batch of views (`collate_views`): grid masks on the global views -> teacher
    on the unmasked globals, student (`ddp`: DDP-wrapped or the student itself) on the masked globals and the
    locals -> the three losses. Returns (losses, student outputs, teacher encoding, teacher sims, mask)."""
    p = cfg.panda
    g_host = batch["global"]
    # drawn where the loader left the views (the host): on a device, its unique cells would be read back
    mask = grid_mask(g_host["coord"], g_host["offset"], values["mask_size"], values["mask_ratio"]).to(device)
    g_view, l_view = _to(g_host, device), _to(batch["local"], device)
    g_view["geometry"] = {}  # the teacher and the masked student share the global views' grids
    masked = dict(g_view)
    if p.mask_jitter:
        noise = (torch.randn_like(g_view["coord"]) * p.mask_jitter).clamp(-2 * p.mask_jitter, 2 * p.mask_jitter)
        masked["coord"] = g_view["coord"] + noise * mask[:, None]
    with autocast(cfg.train.amp, device):
        t_enc, t_sims = teacher_forward(teacher, g_view, cfg.views.global_views)
        s_out = ddp(masked, mask, l_view)
        losses = panda_losses(
            s_out, t_enc, t_sims, p, values["teacher_temp"], cfg.views.global_views, cfg.views.local_views
        )
    return losses, s_out, t_enc, t_sims, mask


def set_weight_decay(opt, weight_decay: float) -> None:
    for g in opt.param_groups:
        g["weight_decay"] = weight_decay if g["decay"] else 0.0


def apply_step(student, teacher, opt, sched, params: list, grad_clip: float | None, momentum: float) -> None:
    """After the backward pass(es): clip -> AdamW -> lr scheduler -> EMA update of the teacher."""
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()
    sched.step()
    ema_update(teacher, student, momentum)


def pretrain_step(
    student: PandaStudent,
    ddp: torch.nn.Module,
    teacher: PandaStudent,
    opt,
    sched,
    params: list,
    batch: dict,
    cfg: PretrainConfig,
    step: int,
    device: torch.device,
) -> StepOut:
    """One Panda step on a batch of views: `panda_forward` -> backward -> `apply_step`. The loop and
    `raysvc bench gpu` both run it."""
    v = step_values(cfg, step)
    set_weight_decay(opt, v["weight_decay"])
    opt.zero_grad(set_to_none=True)
    losses, s_out, t_enc, t_sims, mask = panda_forward(ddp, teacher, batch, cfg, v, device)
    losses["loss"].backward()
    apply_step(student, teacher, opt, sched, params, cfg.train.grad_clip, v["momentum"])
    return StepOut(losses, s_out, t_enc, t_sims, mask, v)


def student_backbone(state: dict) -> dict:
    """The student's backbone weights (PTv3 names) from a checkpoint's state: what a pretraining run exports."""
    return {k.removeprefix("backbone."): v for k, v in state["student"].items() if k.startswith("backbone.")}


def backbone_spec(cfg: PretrainConfig) -> ModelSpec:
    """The exported backbone's model: the job's PTv3 size and overrides on its grid, for centred events (as the
    views are)."""
    return ModelSpec(
        size=cfg.model.size, overrides=cfg.model.overrides, grid_voxels=cfg.grid_voxels, center_events=True
    )


def probe_summary(probes: list[dict], class_names: list[str]) -> dict | None:
    """summary.json's "probe" of a run's probe history: the last probe against the random initialisation's."""
    if not probes:
        return None
    last = probes[-1]
    base = probes[0] if probes[0]["step"] == 0 else None  # the random initialisation, when probed
    keys = ("iou", "f1", "mf1", "accuracy")
    probe = {
        "pretrained_miou": last["miou"],
        "pretrained": {k: last[k] for k in keys},
        "random_miou": None,
        "gain": None,
        "random": None,
        "curve": [[p["step"], p["miou"]] for p in probes],
        "classes": class_names,
    }
    if base is not None:
        probe.update(random_miou=base["miou"], gain=last["miou"] - base["miou"], random={k: base[k] for k in keys})
    return probe


def probe_report(run_loc: Location, png: str, probes: list[dict], class_names: list[str], title: str) -> dict | None:
    """probe_summary of a backbone's probes; their curve written to `png` in the run, where there are any."""
    if probes:
        write_bytes_atomic(run_loc.join(png), pretrain_png({"probe": probes}, title, probe_only=True))
    return probe_summary(probes, class_names)


def load_probe_sets(cfg: PretrainConfig, prep) -> tuple[list[dict], list[dict]]:
    """The probe's (train, val) packed batches from `cfg.probe_data` (prepared as `prep`)."""
    tables = stream_tables(cfg.probe_data, prep, prep.manifest.shards)
    return probe_batches(tables, cfg.probe.train_events, cfg.probe.val_events, cfg.probe_data.uri)


def probe_backbone(
    backbone, cfg: PretrainConfig, sets, device, class_names: list[str], step: int, tag: str = ""
) -> dict:
    """The online linear probe of `backbone`'s frozen features on `sets`: its history record, printed."""
    t0 = time.perf_counter()
    pre = cfg.probe_data.preprocess
    inputs = lambda b: model_inputs(b, pre.center, pre.scale, cfg.grid_voxels, device, True)  # noqa: E731
    m = run_probe(backbone, *sets, inputs, device, cfg.probe, class_names, seed=cfg.train.seed)
    f1 = " ".join(f"{k} {v:.2f}" for k, v in m["f1"].items() if v is not None)
    print(
        f"[raysvc] probe{tag} step {step}: mIoU {m['miou']:.4f} mF1 {m['mf1']:.4f} ({f1}) "
        f"[{time.perf_counter() - t0:.0f} s]",
        flush=True,
    )
    return {"step": step, **{k: m[k] for k in ("miou", "mf1", "iou", "f1", "accuracy")}}


class PandaTask(Task):
    name = "panda"
    kind = "pretrain"
    config = PretrainConfig
    history_keys = ("train", "monitor", "probe")

    @classmethod
    def outcome(cls, summary: dict) -> dict:
        if "probe" not in summary:
            return super().outcome(summary)
        probe = summary.get("probe") or {}
        figures = probe_figures(probe, ("pretrained_miou", "random_miou"))
        return super().outcome(summary) | figures | {"monitor": summary.get("last_monitor")}

    @classmethod
    def prepare(cls, cfg: PretrainConfig, log) -> dict:
        inputs = prepare_pretraining(cfg)
        channels = get_detector(inputs["detector"]).in_channels
        cfg.model.overrides = with_input_channels("ptv3", cfg.model.size, cfg.model.overrides, channels)
        events = inputs["train_data"].manifest.events
        log(f"[raysvc] pretraining {cfg.model.size} Panda on {cfg.data.uri} ({events} events), {training_plan(cfg)}")
        return inputs

    @classmethod
    def finish(cls, cfg: PretrainConfig, state: dict, run_loc: Location, inputs: dict, log) -> dict:
        history = state["history"]
        export_backbone(run_loc, student_backbone(state), backbone_spec(cfg), cls.name, cfg, inputs, state["step"])
        title = f"{cfg.run.name}: linear probe"
        probe = probe_report(run_loc, "probe.png", history["probe"], inputs["class_names"], title)
        write_bytes_atomic(run_loc.join("curves.png"), pretrain_png(history, f"{cfg.run.name}: {cfg.model.size} Panda"))
        return {"probe": probe, "last_monitor": history["monitor"][-1] if history["monitor"] else None}

    def __init__(self, cfg: PretrainConfig, ctx: WorkerContext):
        super().__init__(cfg, ctx)
        torch.manual_seed(cfg.train.seed)  # the same initial student on every rank (DDP broadcasts it anyway)
        bcfg = preset(cfg.model.size, **cfg.model.overrides)
        self.student = PandaStudent(bcfg, cfg.panda, self.stems()).to(ctx.device)
        self.teacher = make_teacher(self.student, bcfg).to(ctx.device)
        # with a stem per detector, a step leaves the other detectors' stems without gradients: DDP must expect that
        ddp_kwargs = {"find_unused_parameters": True} if self.student.stems else None
        self.ddp = self.student
        if ctx.world > 1:
            import ray.train.torch  # here, not above: one process (raysvc bench gpu) runs without Ray

            self.ddp = ray.train.torch.prepare_model(
                self.student, move_to_device=False, parallel_strategy_kwargs=ddp_kwargs
            )
        groups = param_groups(self.student, bcfg.depths, cfg.train.lr, cfg.train.layer_decay, cfg.train.weight_decay[0])
        self.params = [p for g in groups for p in g["params"]]
        opt = adamw(groups, cfg.train.lr)
        sched = one_cycle_scheduler(opt, cfg.train.steps, cfg.train.warmup_frac, cfg.train.final_lr_frac)
        seed_everything(cfg.train.seed * 1000 + ctx.rank)
        self.parts = {"student": self.student, "teacher": self.teacher, "optimizer": opt, "scheduler": sched}
        self.eval_every = cfg.probe.every
        self.out: StepOut | None = None
        self.probe_sets = None

    def stems(self) -> dict[str, int] | None:
        """{detector: input channels} of a model with one input stem per detector; None: one stem."""
        return None

    def feed(self, epoch: int):
        return views_table, {"cfg": self.cfg.views, "seed": self.cfg.train.seed, "epoch": epoch}

    def collate(self, table):
        return collate_view_table(table)

    def start(self, step: int) -> None:
        if step == 0 and not self.ctx.history["probe"]:
            self.evaluate(0)  # the randomly initialised backbone: the probe's baseline

    def step(self, batch: dict, step: int) -> dict:
        p = self.parts
        self.out = pretrain_step(
            self.student,
            self.ddp,
            self.teacher,
            p["optimizer"],
            p["scheduler"],
            self.params,
            batch,
            self.cfg,
            step,
            self.ctx.device,
        )
        return self.out.losses

    def after_step(self, step: int) -> None:
        if not (step % self.cfg.train.monitor_every == 0 or step == self.cfg.train.steps):
            return
        out = self.out
        key, view = ("mask", "global") if "global" in out.student else ("unmask", "local")
        enc, sims = out.student[view]
        teacher_mon = collapse_monitors(out.teacher_sims[key], out.teacher_enc.feat)
        mon = {
            "step": step,
            **collapse_monitors(sims.detach(), enc.feat.detach()),
            **{f"teacher_{k}": v for k, v in teacher_mon.items()},
            **out.values,
            "mask_ratio": float(out.mask.float().mean()),
        }
        self.ctx.history["monitor"].append(mon)
        self.ctx.tracker.log({f"monitor/{k}": v for k, v in mon.items() if k != "step"}, step)

    def progress(self, rec: dict) -> str:
        mon = self.ctx.history["monitor"][-1] if self.ctx.history["monitor"] else {}
        return (
            f"loss {rec['loss']:.4f} (mask {rec.get('mask_loss', 0):.3f} roll {rec.get('roll_mask_loss', 0):.3f} "
            f"unmask {rec.get('unmask_loss', 0):.3f}) protos used {mon.get('proto_used_frac', 0):.2f} "
            f"perplexity {mon.get('proto_perplexity', 0):.0f} feat std {mon.get('feat_std', 0):.3f}"
        )

    def evaluate(self, step: int) -> None:
        """The online linear probe (rank 0 only) on the held-out labelled events."""
        cfg, ctx = self.cfg, self.ctx
        if ctx.rank != 0 or cfg.probe_data is None:
            return
        if self.probe_sets is None:
            self.probe_sets = load_probe_sets(cfg, ctx.inputs["probe_data"])
        rec = probe_backbone(self.student.backbone, cfg, self.probe_sets, ctx.device, ctx.inputs["class_names"], step)
        ctx.history["probe"].append(rec)
        ctx.tracker.log({"probe/miou": rec["miou"], "probe/mf1": rec["mf1"]}, step)

    def report_metrics(self) -> dict:
        probes = self.ctx.history["probe"]
        return {"probe_miou": probes[-1]["miou"]} if probes else {}
