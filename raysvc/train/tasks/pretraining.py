"""What every self-supervised method does on the driver: prepare its training data and its labelled probe data
(same detector), say how it trains, export its encoder as a `backbone` record that fine-tuning's `model.init` takes,
and pick its probe's figures for the printed outcome."""

from __future__ import annotations

import torch

from raysvc.data.streaming.prepared import prepare
from raysvc.inference.record import ExportedModel, ModelSpec, save_export
from raysvc.storage import Location
from raysvc.train.config import JobConfig


def prepare_pretraining(cfg: JobConfig) -> dict:
    """The workers' inputs: "train_data", "probe_data" (None without `cfg.probe_data`), "detector", "class_names"
    (the probe data's); probe events of another detector than the training events are an error naming both."""
    train = prepare(cfg.data)
    probe = prepare(cfg.probe_data) if cfg.probe_data is not None else None
    detector = train.detector
    if probe is not None and probe.detector.name != detector.name:
        raise ValueError(
            f"probe_data {cfg.probe_data.uri} holds {probe.detector.name} events, data "
            f"{cfg.data.uri} holds {detector.name} events"
        )
    names = list(probe.detector.label_classes(cfg.probe_data.preprocess.remove_led)) if probe is not None else []
    return {"train_data": train, "probe_data": probe, "detector": detector.name, "class_names": names}


def training_plan(cfg: JobConfig) -> str:
    """How a pretraining runs, for its start line: steps, events per step, workers."""
    return f"{cfg.train.steps} steps x {cfg.train.batch_events} events, {cfg.scaling.workers} worker(s)"


def probe_figures(probe: dict, keys: tuple[str, ...], prefix: str = "probe_") -> dict:
    """Figures of a finished run's probe record (summary.json's `probe`) as its outcome prints them: each key with
    `prefix`, None where the record lacks it."""
    return {prefix + k: probe.get(k) for k in keys}


def export_backbone(
    run_loc: Location,
    weights: dict[str, torch.Tensor],
    spec: ModelSpec,
    method: str,
    cfg: JobConfig,
    inputs: dict,
    step: int,
) -> None:
    """`backbone.safetensors` + its record in the run directory."""
    record = ExportedModel(
        kind="backbone",
        method=method,
        detector=inputs["detector"],
        model=spec,
        preprocess=cfg.data.preprocess,
        step=step,
    )
    save_export(run_loc, weights, record)
