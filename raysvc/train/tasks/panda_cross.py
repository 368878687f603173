"""Cross-experiment Panda pretraining (`raysvc pretrain`, method `panda-cross`): one PTv3 trunk pretrained on the
events of several detectors (a LArTPC and a water Cherenkov tank) in one Ray Train job.

Each detector is a source: its own data (streamed and checkpointed like any job's data), its own views (grid,
rotations) and its own lengths in the Panda recipe (mask size, jitter, match radius), and its own input stem in front
of the shared trunk (models/stems.py: a LArTPC voxel has 4 input channels, a PMT hit 5). Everything after the stems
(trunk, mask token, heads, prototypes) is shared. `weights` say how much of the data each detector is, in one of two
ways (`batching`):
- `by_detector`: each step is one detector's batch; the detector of step n is drawn with the weights' probabilities
  from a generator seeded by (seed, n), so every rank agrees and a resumed run draws the same sequence.
- `mixed`: each step holds every detector: a rank's events are split by the weights (largest remainders), each
  detector's part goes forward and backward through its own stem, and one optimizer step follows their summed
  losses (weighted by their share of the events).
The export is one plain single-detector backbone per detector (`<run>/<detector>/backbone.safetensors`, the shared
trunk with that detector's stem), which fine-tuning's `model.init` takes like any Panda export. The online linear
probe runs on each detector that has `probe_data`.
"""

from __future__ import annotations

from collections import Counter
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from raysvc.data.contract.detectors import get_detector
from raysvc.data.streaming.config import DataConfig
from raysvc.data.streaming.views import ViewConfig, collate_view_table, views_table
from raysvc.models.panda import PandaConfig
from raysvc.models.stems import split_stem, use_stem
from raysvc.storage import Location, write_bytes_atomic
from raysvc.train.config import BackboneSection, JobConfig, RunSection
from raysvc.train.plots import pretrain_png
from raysvc.train.probe import ProbeConfig
from raysvc.train.tasks.base import Task, WorkerContext
from raysvc.train.tasks.panda import (
    PandaTask,
    PretrainConfig,
    PretrainTrain,
    StepOut,
    apply_step,
    backbone_spec,
    load_probe_sets,
    panda_forward,
    probe_backbone,
    probe_report,
    set_weight_decay,
    step_values,
    student_backbone,
)
from raysvc.train.tasks.pretraining import export_backbone, prepare_pretraining, training_plan
from raysvc.train.worker import RankStream

# The Panda fields that are lengths in a detector's normalised units, so each source sets its own; the rest of the
# recipe (heads, prototypes, temperatures, loss weights, momentum) is one for the shared model.
PER_DETECTOR_PANDA = ("mask_size", "mask_ratio", "mask_jitter", "match_radius")


class SourceSection(BaseModel):
    """One detector's part of the job; its key in `sources` is the detector's name."""

    model_config = ConfigDict(extra="forbid")
    weight: float = Field(gt=0, description="share of the training events (normalised over the sources)")
    data: DataConfig
    probe_data: DataConfig | None = Field(None, description="labelled held-out events for this detector's probe")
    views: ViewConfig = Field(default_factory=ViewConfig)
    panda: dict = Field(default_factory=dict, description=f"this detector's {', '.join(PER_DETECTOR_PANDA)}")

    @model_validator(mode="after")
    def _check(self) -> SourceSection:
        other = sorted(set(self.panda) - set(PER_DETECTOR_PANDA))
        if other:
            raise ValueError(
                f"panda: {other} are shared by every detector (set them in the job's panda section); a source "
                f"sets only {list(PER_DETECTOR_PANDA)}"
            )
        return self


class CrossPretrainConfig(JobConfig):
    """A cross-experiment pretraining job: the sources (one per detector), the shared backbone and recipe."""

    task: Literal["panda-cross"] = "panda-cross"
    data: DataConfig | None = Field(None, description="unused: each source has its own data")
    sources: dict[str, SourceSection] = Field(min_length=1, description="detector name -> its data, views, weight")
    batching: Literal["by_detector", "mixed"] = Field(
        "by_detector", description="each step one detector (drawn by weight), or every detector in every step"
    )
    model: BackboneSection = Field(default_factory=lambda: BackboneSection(size="base"))
    panda: PandaConfig = Field(default_factory=PandaConfig)
    train: PretrainTrain = Field(default_factory=PretrainTrain)
    probe: ProbeConfig = Field(default_factory=ProbeConfig)
    run: RunSection = Field(default_factory=lambda: RunSection(name="pretrain-panda-cross"))

    @field_validator("sources")
    @classmethod
    def _known(cls, v: dict[str, SourceSection]) -> dict[str, SourceSection]:
        for name in v:
            get_detector(name)  # an unknown detector name fails here, listing the known ones
        return v

    @model_validator(mode="after")
    def _check_sources(self) -> CrossPretrainConfig:
        per_rank = self.train.batch_events // self.scaling.workers
        if self.batching == "mixed" and per_rank < len(self.sources):
            raise ValueError(
                f"batching mixed puts every detector in every step: train.batch_events / scaling.workers "
                f"({per_rank}) must be at least the number of sources ({len(self.sources)})"
            )
        for name in self.sources:
            self.source_config(name)  # each detector's single-detector job must be valid too
        return self

    @property
    def weights(self) -> dict[str, float]:
        total = sum(s.weight for s in self.sources.values())
        return {k: s.weight / total for k, s in self.sources.items()}

    def source_config(self, name: str) -> PretrainConfig:
        """Detector `name`'s part as a single-detector Panda job: its data, probe data, views and lengths, with the
        shared model, recipe, loop and run (what `panda_forward`, the probe and the export take)."""
        src = self.sources[name]
        in_channels = get_detector(name).in_channels
        return PretrainConfig(
            data=src.data,
            probe_data=src.probe_data,
            model=self.model.model_copy(update={"overrides": {**self.model.overrides, "in_channels": in_channels}}),
            views=src.views,
            panda=PandaConfig.model_validate({**self.panda.model_dump(), **src.panda}),
            train=self.train,
            probe=self.probe,
            scaling=self.scaling,
            run=self.run,
        )


def split_events(n: int, weights: dict[str, float]) -> dict[str, int]:
    """`n` events split over the sources by weight, largest remainders first (ties in the sources' order); every
    source gets at least one (the config checks n >= sources)."""
    names = list(weights)
    exact = np.array([weights[k] * n for k in names])
    got = np.maximum(np.floor(exact).astype(int), 1)
    while got.sum() > n:  # the minimum of one pushed the total over: take from the largest
        got[int(np.argmax(got))] -= 1
    for i in np.argsort(-(exact - np.floor(exact)), kind="stable")[: n - int(got.sum())]:
        got[i] += 1
    return dict(zip(names, got.tolist(), strict=True))


def step_detector(seed: int, n: int, weights: dict[str, float]) -> str:
    """The detector of step `n` under by-detector batching: the same on every rank, on a resume, in every run."""
    names = list(weights)
    rng = np.random.default_rng([seed, n])
    return names[int(rng.choice(len(names), p=[weights[k] for k in names]))]


class MixtureStream:
    """This rank's stream over several detectors' data: one `RankStream` per source, and per step either one
    source's batch (by_detector) or every source's part (mixed). Yields [(detector, batch), ...]. Its position is
    (steps drawn, then each source's (epoch, shard, row)); its counts are all the sources' together."""

    def __init__(self, streams: dict[str, RankStream], weights: dict[str, float], batching: str, seed: int, position):
        self.streams, self.weights, self.batching, self.seed = streams, weights, batching, seed
        self.counts: Counter = Counter()
        for s in streams.values():
            s.counts = self.counts
        self.n = 0
        if len(position) == 1 + 3 * len(streams):
            self.n = int(position[0])
            for i, s in enumerate(streams.values()):
                s.epoch, s.shard, s.row = (int(x) for x in position[1 + 3 * i : 4 + 3 * i])
        elif tuple(position) != (0, 0, 0):
            raise ValueError(f"a checkpointed position {tuple(position)} does not fit {len(streams)} sources")

    def __iter__(self):
        its = {k: iter(s) for k, s in self.streams.items()}
        try:
            while True:
                if self.batching == "mixed":
                    parts = [(k, next(its[k])) for k in self.streams]
                else:
                    name = step_detector(self.seed, self.n, self.weights)
                    parts = [(name, next(its[name]))]
                self.n += 1
                yield parts
        finally:
            for it in its.values():
                it.close()

    def position(self) -> tuple[int, ...]:
        return (self.n, *(x for s in self.streams.values() for x in s.position()))


class CrossPandaTask(PandaTask):
    name = "panda-cross"
    kind = "pretrain"
    config = CrossPretrainConfig

    @classmethod
    def outcome(cls, summary: dict) -> dict:
        """One backbone and probe per detector."""
        out = Task.outcome(summary) | {"exports": summary["exports"], "batching": summary.get("batching")}
        for name, p in (summary.get("probe") or {}).items():
            if p:
                out |= {
                    f"probe_{name}_pretrained_miou": p["pretrained_miou"],
                    f"probe_{name}_random_miou": p["random_miou"],
                }
        return out

    @classmethod
    def prepare(cls, cfg: CrossPretrainConfig, log) -> dict:
        inputs: dict = {"train_data": {}, "probe_data": {}, "class_names": {}}
        for name in cfg.sources:
            # source_config shares this source's DataConfigs, so their preprocess is resolved here for the workers too
            got = prepare_pretraining(cfg.source_config(name))
            if got["detector"] != name:
                raise ValueError(
                    f"sources.{name}.data {cfg.sources[name].data.uri} holds {got['detector']} events, not {name}"
                )
            for key in inputs:
                inputs[key][name] = got[key]
        shares = ", ".join(
            f"{k} {w:.2f} ({inputs['train_data'][k].manifest.events} events)" for k, w in cfg.weights.items()
        )
        log(
            f"[raysvc] cross-experiment pretraining of a {cfg.model.size} Panda on {shares}, batching "
            f"{cfg.batching}, {training_plan(cfg)}"
        )
        return inputs

    @classmethod
    def finish(cls, cfg: CrossPretrainConfig, state: dict, run_loc: Location, inputs: dict, log) -> dict:
        history = state["history"]
        backbone = student_backbone(state)
        probes, exports = {}, {}
        for name in cfg.sources:
            src = cfg.source_config(name)
            loc = run_loc.join(name)
            spec = backbone_spec(src)
            export_backbone(loc, split_stem(backbone, name), spec, cls.name, src, {"detector": name}, state["step"])
            exports[name] = loc.uri
            mine = [p for p in history["probe"] if p["detector"] == name]
            title = f"{cfg.run.name}: linear probe on {name}"
            probes[name] = probe_report(run_loc, f"probe-{name}.png", mine, inputs["class_names"][name], title)
        write_bytes_atomic(run_loc.join("curves.png"), pretrain_png(history, f"{cfg.run.name}: {cfg.model.size} Panda"))
        steps = Counter(d for rec in history["monitor"] for d in rec.get("detectors", []))
        log(f"[raysvc] exported one backbone per detector: {', '.join(exports.values())}")
        return {
            "probe": probes,
            "exports": exports,
            "weights": cfg.weights,
            "batching": cfg.batching,
            "last_monitor": history["monitor"][-1] if history["monitor"] else None,
            "monitored_detectors": dict(steps),
        }

    def __init__(self, cfg: CrossPretrainConfig, ctx: WorkerContext):
        self.sources = {name: cfg.source_config(name) for name in cfg.sources}
        super().__init__(cfg, ctx)
        self.detectors: list[str] = []
        self.probe_sets = {}
        self.split = split_events(ctx.per_rank, cfg.weights) if cfg.batching == "mixed" else None

    def stems(self) -> dict[str, int]:
        return {name: get_detector(name).in_channels for name in self.sources}

    def stream(self, position: tuple) -> MixtureStream:
        cfg, ctx = self.cfg, self.ctx
        streams = {}
        for name, src in self.sources.items():
            per_rank = self.split[name] if self.split else ctx.per_rank
            vcfg = src.views

            def feed(epoch: int, vcfg=vcfg):
                return views_table, {"cfg": vcfg, "seed": cfg.train.seed, "epoch": epoch}

            streams[name] = RankStream(
                src.data,
                ctx.inputs["train_data"][name],
                ctx.rank,
                ctx.world,
                cfg.train.seed,
                per_rank,
                collate_view_table,
                feed,
            )
        return MixtureStream(streams, cfg.weights, cfg.batching, cfg.train.seed, position)

    def step(self, batch: list[tuple[str, dict]], step: int) -> dict:
        """One optimizer step over this step's parts: each detector's views through its stem, the losses weighted
        by the part's share of the rank's events and backpropagated one part at a time (so only one part's
        activations are alive at once)."""
        opt, sched = self.parts["optimizer"], self.parts["scheduler"]
        shared = step_values(next(iter(self.sources.values())), step)  # momentum and weight decay: one for all
        set_weight_decay(opt, shared["weight_decay"])
        opt.zero_grad(set_to_none=True)
        losses: Counter = Counter()
        for name, views in batch:
            src = self.sources[name]
            v = step_values(src, step)
            use_stem(name, self.student, self.teacher)
            share = (self.split[name] if self.split else self.ctx.per_rank) / self.ctx.per_rank  # of the rank's events
            part, s_out, t_enc, t_sims, mask = panda_forward(self.ddp, self.teacher, views, src, v, self.ctx.device)
            (part["loss"] * share).backward()
            for k, val in part.items():
                losses[k] += float(val.detach() if torch.is_tensor(val) else val) * share
            # by detector, a window's steps are not all this detector's: its mean loss is loss_sum / steps
            losses[f"{name}/loss_sum"] = float(part["loss"].detach())
            losses[f"{name}/steps"] = 1.0
            self.out = StepOut(part, s_out, t_enc, t_sims, mask, v)
        apply_step(self.student, self.teacher, opt, sched, self.params, self.cfg.train.grad_clip, shared["momentum"])
        self.detectors = [name for name, _ in batch]
        return dict(losses)

    def after_step(self, step: int) -> None:
        before = len(self.ctx.history["monitor"])
        super().after_step(step)
        if len(self.ctx.history["monitor"]) > before:  # the monitors are of the step's last part
            self.ctx.history["monitor"][-1]["detectors"] = list(self.detectors)
            self.ctx.history["monitor"][-1]["detector"] = self.detectors[-1]

    def progress(self, rec: dict) -> str:
        parts = " ".join(
            f"{k} {rec[f'{k}/loss_sum'] / rec[f'{k}/steps']:.3f}" for k in self.sources if rec.get(f"{k}/steps")
        )
        return f"{super().progress(rec)} | {parts}"

    def evaluate(self, step: int) -> None:
        """The online linear probe of each detector with probe data (rank 0), through that detector's stem."""
        ctx = self.ctx
        if ctx.rank != 0:
            return
        for name, src in self.sources.items():
            if src.probe_data is None:
                continue
            if name not in self.probe_sets:
                self.probe_sets[name] = load_probe_sets(src, ctx.inputs["probe_data"][name])
            use_stem(name, self.student)
            classes = ctx.inputs["class_names"][name]
            rec = probe_backbone(
                self.student.backbone, src, self.probe_sets[name], ctx.device, classes, step, f" {name}"
            )
            ctx.history["probe"].append({"detector": name, **rec})
            ctx.tracker.log({f"probe/{name}/miou": rec["miou"]}, step)

    def report_metrics(self) -> dict:
        out = {}
        for p in self.ctx.history["probe"]:
            out[f"probe_miou_{p['detector']}"] = p["miou"]
        return out
