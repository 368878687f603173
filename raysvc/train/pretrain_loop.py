"""The per-worker Panda pretraining loop that `ray.train.torch.TorchTrainer` runs (Train V2 API).

Reads top to bottom: student (DDP) + EMA teacher, AdamW with layer-wise lr decay, restore the last checkpoint if the
run has one, then step: views of this rank's events (made by the CPU read tasks: `data.views.table_views`) ->
grid masks on the global views -> teacher on the unmasked globals, student on the masked globals and the locals ->
the three Panda losses against Sinkhorn targets -> backward -> clip -> AdamW -> EMA update of the teacher.
Schedules (mask size / ratio, teacher temperature, momentum, weight decay, lr) are functions of the step, so a
resumed run continues them exactly. Collapse monitors every `monitor_every` steps; the online linear probe (rank 0)
at step 0 (the random initialisation: the baseline) and every `probe.every` steps.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import pyarrow as pa
import torch

from raysvc.data.pipeline import pack_tables, stream_tables
from raysvc.data.views import collate_views, table_views
from raysvc.models.panda import (
    Encoded,
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
from raysvc.train import heap
from raysvc.train.optim import param_groups
from raysvc.train.pretrain_config import PretrainConfig
from raysvc.train.probe import run_probe
from raysvc.train.schedule import one_cycle_scheduler
from raysvc.train.seg_loop import model_inputs
from raysvc.train.tracking import Tracker
from raysvc.train.worker import (
    RankStream,
    autocast,
    load_checkpoint_state,
    restore,
    save,
    seed_everything,
    worker_setup,
)


def _to(view: dict | None, device: torch.device) -> dict | None:
    return None if view is None else {k: v.to(device, non_blocking=True) for k, v in view.items()}


def probe_batches(tables: Iterable[pa.Table], train_events: int, val_events: int, source: str,
                  ) -> tuple[list[dict], list[dict]]:  # fmt: skip
    """(probe-train batches, probe-val batches): the first `train_events` preprocessed events of `tables`, then the
    next `val_events`, in order (the same events for every probe and every run)."""
    need, got = train_events + val_events, []
    for table in tables:
        got.append(table)
        if sum(t.num_rows for t in got) >= need:
            break
    events = pa.concat_tables(got) if got else None
    if events is None or events.num_rows < need:
        raise ValueError(f"{source}: the probe needs {need} events after the cuts, found "
                         f"{0 if events is None else events.num_rows}")  # fmt: skip
    return (list(pack_tables([events.slice(0, train_events)], 4)),
            list(pack_tables([events.slice(train_events, val_events)], 4)))  # fmt: skip


def step_values(cfg: PretrainConfig, step: int) -> dict:
    """The step-dependent values of the recipe at `step` (the lr has its own scheduler)."""
    p, total = cfg.panda, cfg.train.steps
    return {"mask_size": warm(step, total, *p.mask_size, p.mask_warmup_frac),
            "mask_ratio": warm(step, total, *p.mask_ratio, p.mask_warmup_frac),
            "teacher_temp": warm(step, total, *p.teacher_temp, p.teacher_temp_warmup_frac),
            "momentum": cosine(step, total, *p.momentum), "weight_decay": cosine(step, total, *cfg.train.weight_decay)}


@dataclass
class StepOut:
    losses: dict  # "loss" (the one backpropagated) and its parts
    student: dict  # PandaStudent's outputs: {"global" / "local": (Encoded, prototype similarities)}
    teacher_enc: Encoded
    teacher_sims: dict
    mask: torch.Tensor  # (points of the global views,) bool: masked for the student
    values: dict  # step_values used (the mask ratio there is the scheduled one, not the drawn one)


def pretrain_step(student: PandaStudent, ddp: torch.nn.Module, teacher: PandaStudent, opt, sched, params: list,
                  batch: dict, cfg: PretrainConfig, step: int, device: torch.device) -> StepOut:  # fmt: skip
    """One Panda step on a batch of views (`collate_views`): grid masks on the global views -> teacher on the
    unmasked globals, student (`ddp`: DDP-wrapped or the student itself) on the masked globals and the locals ->
    the three losses -> backward -> clip -> AdamW -> lr scheduler -> EMA update of the teacher. The loop and
    `raysvc bench gpu` both run it."""
    p, v = cfg.panda, step_values(cfg, step)
    for g in opt.param_groups:
        g["weight_decay"] = v["weight_decay"] if g["decay"] else 0.0
    g_view, l_view = _to(batch["global"], device), _to(batch["local"], device)
    mask = grid_mask(g_view["coord"], g_view["offset"], v["mask_size"], v["mask_ratio"]).to(device)
    masked = dict(g_view)
    if p.mask_jitter:
        noise = (torch.randn_like(g_view["coord"]) * p.mask_jitter).clamp(-2 * p.mask_jitter, 2 * p.mask_jitter)
        masked["coord"] = g_view["coord"] + noise * mask[:, None]
    with autocast(cfg.train.amp, device):
        t_enc, t_sims = teacher_forward(teacher, g_view)
        s_out = ddp(masked, mask, l_view)
        losses = panda_losses(s_out, t_enc, t_sims, p, v["teacher_temp"], cfg.views.global_views,
                              cfg.views.local_views)  # fmt: skip
    opt.zero_grad(set_to_none=True)
    losses["loss"].backward()
    if cfg.train.grad_clip:
        torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
    opt.step()
    sched.step()
    ema_update(teacher, student, v["momentum"])
    return StepOut(losses, s_out, t_enc, t_sims, mask, v)


def pretrain_loop(config: dict) -> None:
    import ray.train.torch

    cfg = PretrainConfig.model_validate(config["job"])
    rank, world, device = worker_setup(cfg.train.seed, cfg.scaling)
    torch.manual_seed(cfg.train.seed)  # the same initial student on every rank (DDP broadcasts it anyway)

    bcfg = preset(cfg.model.size, **cfg.model.overrides)
    student = PandaStudent(bcfg, cfg.panda).to(device)
    teacher = make_teacher(student, bcfg).to(device)
    ddp = ray.train.torch.prepare_model(student, move_to_device=False) if world > 1 else student
    groups = param_groups(student, bcfg.depths, cfg.train.lr, cfg.train.layer_decay, cfg.train.weight_decay[0])
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, lr=cfg.train.lr)
    total = cfg.train.steps
    sched = one_cycle_scheduler(opt, total, cfg.train.warmup_frac, cfg.train.final_lr_frac)
    seed_everything(cfg.train.seed * 1000 + rank)

    parts = {"student": student, "teacher": teacher, "optimizer": opt, "scheduler": sched}
    step, history, (epoch, consumed), resumed_counts = restore(load_checkpoint_state(), parts, rank, world,
                                                               {"train": [], "monitor": [], "probe": []})  # fmt: skip
    per_rank = cfg.train.batch_events // world

    def make_batches(shards: list, ep: int, counts: Counter):
        kwargs = {"cfg": cfg.views, "seed": cfg.train.seed, "epoch": ep}
        pending: list = []
        for events in stream_tables(cfg.data, config["train_data"], shards, counts, transform=table_views,
                                    transform_kwargs=kwargs):  # fmt: skip
            pending.extend(events)
            while len(pending) >= per_rank:
                yield collate_views(pending[:per_rank])
                pending = pending[per_rank:]

    rank_stream = RankStream(config["train_data"], rank, world, cfg.train.seed, make_batches, epoch, consumed)
    rank_stream.counts.update(resumed_counts)
    stream = iter(rank_stream)

    probe_sets = None
    pre = cfg.probe_data.preprocess if cfg.probe_data else None

    def probe(at: int) -> None:
        nonlocal probe_sets
        if rank != 0 or cfg.probe_data is None:
            return
        if probe_sets is None:
            prep = config["probe_data"]
            probe_sets = probe_batches(stream_tables(cfg.probe_data, prep, prep.manifest.shards),
                                       cfg.probe.train_events, cfg.probe.val_events, cfg.probe_data.uri)  # fmt: skip
        t0 = time.perf_counter()
        inputs = lambda b: model_inputs(b, pre.center, pre.scale, cfg.grid_voxels, device, True)  # noqa: E731
        m = run_probe(student.backbone, *probe_sets, inputs, device, cfg.probe, seed=cfg.train.seed)
        history["probe"].append({"step": at, "miou": m["miou"], "mf1": m["mf1"], "iou": m["iou"], "f1": m["f1"],
                                 "accuracy": m["accuracy"]})  # fmt: skip
        tracker.log({"probe/miou": m["miou"], "probe/mf1": m["mf1"]}, at)
        f1 = " ".join(f"{k} {v:.2f}" for k, v in m["f1"].items() if v is not None)
        print(f"[raysvc] probe step {at}: mIoU {m['miou']:.4f} mF1 {m['mf1']:.4f} ({f1}) "
              f"[{time.perf_counter() - t0:.0f} s]", flush=True)  # fmt: skip

    local_dir = None if cfg.run.storage.startswith("s3://") else os.path.abspath(cfg.run.storage.removeprefix("file://"))
    tracker = Tracker(cfg.run.wandb_project, cfg.run.name, cfg.run.wandb_mode, config["job"], rank, local_dir,
                      group=cfg.run.wandb_group)
    fault = config.get("fault") or {}
    if step == 0 and not history["probe"]:
        probe(0)  # the randomly initialised backbone: the probe's baseline
    if step >= total:
        _report(parts, step, history, rank, world, rank_stream)
    t_last, ev_since, sums = time.perf_counter(), 0, Counter()
    while step < total:
        out = pretrain_step(student, ddp, teacher, opt, sched, params, next(stream), cfg, step, device)
        losses, s_out, t_enc, t_sims = out.losses, out.student, out.teacher_enc, out.teacher_sims
        if cfg.train.trim_heap and device.type == "cpu":
            heap.trim()
        step += 1
        ev_since += per_rank
        for k, v in losses.items():
            sums[k] += float(v.detach() if torch.is_tensor(v) else v)
        sums["n"] += 1
        if fault and step == fault["step"] and rank == 0 and not os.path.exists(fault["marker"]):
            open(fault["marker"], "w").write(str(step))
            raise RuntimeError(f"injected fault at step {step}")
        if step % cfg.train.monitor_every == 0 or step == total:
            key, view = ("mask", "global") if "global" in s_out else ("unmask", "local")
            enc, sims = s_out[view]
            teacher_mon = collapse_monitors(t_sims[key], t_enc.feat)
            mon = {"step": step, **collapse_monitors(sims.detach(), enc.feat.detach()),
                   **{f"teacher_{k}": v for k, v in teacher_mon.items()}, **out.values,
                   "mask_ratio": float(out.mask.float().mean())}  # fmt: skip
            history["monitor"].append(mon)
            tracker.log({f"monitor/{k}": v for k, v in mon.items() if k != "step"}, step)
        if step % cfg.train.log_every == 0 or step == total:
            dt = time.perf_counter() - t_last
            means = {k: v / sums["n"] for k, v in sums.items() if k != "n"}
            rec = heap.with_private_mb({"step": step, **means, "lr": max(sched.get_last_lr()),
                                        "events_per_s": ev_since * world / dt})  # fmt: skip
            history["train"].append(rec)
            tracker.log({f"train/{k}": v for k, v in rec.items() if k != "step"}, step)
            if rank == 0:
                mon = history["monitor"][-1] if history["monitor"] else {}
                print(f"[raysvc] step {step}/{total} loss {rec['loss']:.4f} (mask {rec.get('mask_loss', 0):.3f} "
                      f"roll {rec.get('roll_mask_loss', 0):.3f} unmask {rec.get('unmask_loss', 0):.3f}) "
                      f"protos used {mon.get('proto_used_frac', 0):.2f} perplexity {mon.get('proto_perplexity', 0):.0f}"
                      f" feat std {mon.get('feat_std', 0):.3f} {rec['events_per_s']:.2f} ev/s"
                      f"{heap.memory_note(rec)}", flush=True)  # fmt: skip
            t_last, ev_since, sums = time.perf_counter(), 0, Counter()
        if step % cfg.probe.every == 0 or step == total:
            probe(step)
        if step % cfg.train.checkpoint_every == 0 or step == total:
            _report(parts, step, history, rank, world, rank_stream)
    tracker.finish()


def _report(parts: dict, step: int, history: dict, rank: int, world: int, stream: RankStream) -> None:
    metrics = {"step": step, "loss": history["train"][-1]["loss"] if history["train"] else None}
    if history["probe"]:
        metrics["probe_miou"] = history["probe"][-1]["miou"]
    save(parts, step, history, rank, world, stream, metrics)
