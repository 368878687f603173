"""The exported-model record: weights (safetensors) + `config.json`, written and read here only.

An export is a directory (file:// or s3://) holding `model.safetensors` (a segmenter: backbone + head) or
`backbone.safetensors` (a pretrained encoder), and `config.json`, the `ExportedModel` record: what rebuilds the
network (`ModelSpec`), the detector and class names it speaks, the preprocessing it was trained under, and the
producing method and step, and for weights brought in from elsewhere (raysvc.hub) their licence and source.
`raysvc predict` / `evaluate`, the Serve endpoint, the probe and fine-tuning's `model.init` all read it through
`load_export` (or raysvc.hub, which reads the other formats into this record). No optimizer state, no secrets.
Records written before the format was versioned (no `format_version`) are read as version 1. Version 2 added
`licence` and `source`, and came with the PTv3 `base` preset taking the reference's linear stem: a version-1 record
of a `base` PTv3 is read with the convolutional stem it was trained with (`overrides.stem: conv`).
"""

from __future__ import annotations

import json
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from raysvc.data.contract.detectors import DEFAULT_DETECTOR, get_detector
from raysvc.data.streaming.transforms import PreprocessConfig
from raysvc.models.archs import ARCHS, check_size
from raysvc.storage import Location, exists, read_bytes, write_bytes_atomic

FORMAT_VERSION = 2  # the newest this reads and what it writes
WEIGHTS = {"segmenter": "model.safetensors", "backbone": "backbone.safetensors", "panoptic": "model.safetensors"}


class ModelSpec(BaseModel):
    """What rebuilds the network: the architecture, its preset + overrides, the head (None: a backbone alone) and
    the model's input grid."""

    model_config = ConfigDict(extra="forbid")
    arch: str = Field("ptv3", description=f"the backbone: one of {sorted(ARCHS)}")
    size: str = Field("tiny", description="the architecture's preset (models/archs.py)")
    overrides: dict = Field(default_factory=dict, description="the preset's config fields that this model replaces")
    head: Literal["lin", "dec"] | None = None
    grid_voxels: float = Field(1.0, gt=0, description="grid sampling cell side in voxels")
    center_events: bool = Field(False, description="each event's coordinates shifted to its mean")
    mode: str | None = Field(None, description="how it was fine-tuned (lin / dec / fft / scratch); informational")
    init: str | None = Field(None, description="the export it was initialised from; informational")

    @model_validator(mode="after")
    def _check_size(self) -> ModelSpec:
        check_size(self.arch, self.size)
        return self

    def backbone_config(self):
        """The encoder's config (PTv3Config, PolarMAEConfig, ...)."""
        return ARCHS[self.arch].config(self.size, **self.overrides)

    def build_backbone(self) -> nn.Module:
        """The encoder alone, freshly initialised (what a backbone export's weights load into, unprefixed)."""
        return ARCHS[self.arch].segmenter(self.backbone_config(), 1, "lin").backbone

    def build_segmenter(self, num_classes: int) -> nn.Module:
        """The segmentation network (backbone + head) this spec describes, freshly initialised: the one place a
        segmenter is constructed, for training and for loading an export alike."""
        if self.head is None:
            raise ValueError("a backbone export has no segmentation head; fine-tune it first")
        return ARCHS[self.arch].segmenter(self.backbone_config(), num_classes, self.head)


class ExportedModel(BaseModel):
    """config.json of an export (versioned)."""

    model_config = ConfigDict(extra="forbid")
    format_version: int = FORMAT_VERSION
    kind: Literal["segmenter", "backbone", "panoptic"]
    method: str = Field(description="the task or method that produced it (segmentation, panda, ...)")
    detector: str = DEFAULT_DETECTOR
    model: ModelSpec
    class_names: list[str] | None = Field(None, description="a segmenter's output classes, in order")
    instances: dict[str, dict] | None = Field(
        None, description="a panoptic model's instance tasks: name -> {classes, decoder (MaskDecoderConfig)}"
    )
    postprocess: dict | None = Field(None, description="a panoptic model's PostprocessConfig")
    outputs: list[str] | None = Field(
        None, description="the output adapters (inference/outputs) of what it predicts beyond a class per point"
    )
    heads: dict[str, dict] = Field(default_factory=dict, description="an output's own settings, by output name")
    preprocess: PreprocessConfig
    step: int = 0
    licence: str | None = Field(None, description="the weights' licence as their source states it (imported weights)")
    source: dict | None = Field(
        None, description="where imported weights came from: format, file name, model type, sha256 (no paths)"
    )
    unstated: list[str] = Field(
        default_factory=list,
        description="fields that a foreign source did not state and that hold placeholders until `raysvc weights "
        "import` is told them; a record with any is never written and never predicts",
    )

    @model_validator(mode="before")
    @classmethod
    def _unversioned(cls, data):
        """Read the records of exports made before the format was versioned (they had neither key)."""
        if not isinstance(data, dict) or "format_version" in data or "method" in data:
            return data
        data = dict(data)
        backbone = data.get("kind") == "panda-backbone"
        data.update(
            format_version=1,
            kind="backbone" if backbone else "segmenter",
            method="panda" if backbone else "segmentation",
        )
        data.pop("num_classes", None)
        data.setdefault("preprocess", {})  # the defaults every export made before had: LArTPC's, resolved below
        return data

    @model_validator(mode="before")
    @classmethod
    def _conv_stem_base(cls, data):
        """A version-1 `base` PTv3 was built with the 3x3x3 conv stem, which the preset no longer has."""
        if not isinstance(data, dict) or data.get("format_version", 1) >= 2 or not isinstance(data.get("model"), dict):
            return data
        model = data["model"]
        overrides = model.get("overrides") or {}
        if model.get("arch", "ptv3") == "ptv3" and model.get("size", "tiny") == "base" and "stem" not in overrides:
            data = {**data, "model": {**model, "overrides": {**overrides, "stem": "conv"}}}
        return data

    @model_validator(mode="after")
    def _check(self) -> ExportedModel:
        if self.format_version > FORMAT_VERSION:
            raise ValueError(
                f"format_version {self.format_version} is newer than this raysvc reads "
                f"({FORMAT_VERSION}): upgrade raysvc"
            )
        # the preprocessing is stated in full: a field a job left to the detector is recorded with the detector's
        # value, so predict, evaluate and the endpoint prepare events as training did, whatever the defaults become
        self.preprocess = self.preprocess.resolved(get_detector(self.detector))
        if self.kind in ("segmenter", "panoptic") and (not self.class_names or self.model.head is None):
            raise ValueError(f"a {self.kind} record needs class_names and model.head")
        if self.kind == "panoptic" and not self.instances:
            raise ValueError("a panoptic record needs its instance tasks (instances)")
        return self

    def to_json(self) -> bytes:
        """config.json's bytes; the fields a version-1 record lacks are left out when unset, so that such a record
        reads as before."""
        unset = {k for k in ("licence", "source") if getattr(self, k) is None} | {"unstated"}
        return self.model_dump_json(indent=2, exclude=unset).encode()

    @property
    def num_classes(self) -> int:
        return len(self.class_names or ())

    @property
    def weights_name(self) -> str:
        return WEIGHTS[self.kind]

    def build(self) -> nn.Module:
        """The network this record describes (weights not loaded): a segmenter, or a panoptic model around one."""
        seg = self.model.build_segmenter(self.num_classes)
        if self.kind != "panoptic":
            return seg
        from raysvc.models.mask_decoder import MaskDecoderConfig
        from raysvc.models.panoptic import PanopticModel

        tasks = {t: len(v["classes"]) for t, v in self.instances.items()}
        return PanopticModel(seg, tasks, {t: MaskDecoderConfig(**v["decoder"]) for t, v in self.instances.items()})


def save_export(loc: Location, state: dict[str, torch.Tensor], record: ExportedModel) -> None:
    """Write the weights, then config.json (readers go by config.json, so they never see half an export)."""
    if record.unstated:
        raise ValueError(f"the model's source does not state {record.unstated}: an export states everything")
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    write_bytes_atomic(loc.join(record.weights_name), st_save(tensors, metadata={"format": "pt"}))
    write_bytes_atomic(loc.join("config.json"), record.to_json())


def load_record(loc: Location) -> ExportedModel:
    """The record of an export; errors name the directory."""
    if not exists(loc.join("config.json")):
        raise FileNotFoundError(f"{loc.uri}: no config.json: not an exported model directory")
    return load_record_json(read_bytes(loc.join("config.json")), loc.join("config.json").uri)


def load_record_json(data: bytes, where: str) -> ExportedModel:
    """A record from its JSON bytes; errors name `where`."""
    try:
        return ExportedModel.model_validate(json.loads(data))
    except ValidationError as e:
        errors = "; ".join(f"{'.'.join(str(x) for x in err['loc']) or '(top)'}: {err['msg']}" for err in e.errors())
        raise ValueError(f"{where}: not a valid export record: {errors}") from e
    except ValueError as e:  # not JSON
        raise ValueError(f"{where}: not a valid export record: {e}") from e


def output_names(record: ExportedModel, loc: Location) -> list[str]:
    """The outputs an export carries: its record's `outputs`; for an export written before records named them, a
    panoptic model's instances and the event heads found beside a segmenter."""
    if record.outputs is not None:
        return list(record.outputs)
    legacy = ["instances"] if record.kind == "panoptic" else []
    return legacy + (["event_heads"] if exists(loc.join(EVENT_HEADS)) else [])


def load_export(loc: Location) -> tuple[dict[str, torch.Tensor], ExportedModel]:
    """(state dict, record) of an export."""
    record = load_record(loc)
    weights = loc.join(record.weights_name)
    if not exists(weights):
        raise FileNotFoundError(
            f"{loc.uri}: config.json describes a {record.kind}, but {record.weights_name} is missing"
        )
    return st_load(read_bytes(weights)), record


EVENT_HEADS = "event_heads.safetensors"  # beside a `rings` segmenter: its ring-count and PID heads


def load_event_heads(loc: Location) -> dict[str, torch.Tensor] | None:
    """The event heads' weights an export keeps beside its segmenter, or None when it has none."""
    path = loc.join(EVENT_HEADS)
    return st_load(read_bytes(path)) if exists(path) else None


def load_backbone_weights(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """An export's encoder weights into `model.backbone` (a segmenter's `backbone.` prefix stripped, its head and
    decoder left out); weights that do not fit are an error starting with `what`."""
    weights = {k.removeprefix("backbone."): v for k, v in state.items() if not k.startswith(("head.", "decoder."))}
    missing, unexpected = model.backbone.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(f"{what}: missing {missing[:5]}, unexpected {unexpected[:5]}")


def export_seeded_segmenter(
    loc: Location, seed: int, size: str = "tiny", detector: str = DEFAULT_DETECTOR, event_heads: bool = False
) -> None:
    """A freshly initialised (seeded) segmenter of `detector`'s events exported as a fine-tuning run exports one
    (with `event_heads`, as a `rings` run does: ring-count and PID heads beside it): what the serving benchmark and
    tests load when latency, not accuracy, is the question."""
    torch.manual_seed(seed)
    det = get_detector(detector)
    record = ExportedModel(
        kind="segmenter",
        method="segmentation",
        detector=det.name,
        model=ModelSpec(size=size, head="dec", mode="scratch", overrides={"in_channels": det.in_channels}),
        class_names=list(det.class_names),
        outputs=["event_heads"] if event_heads else [],
        preprocess=PreprocessConfig(),  # the detector's
    )
    model = record.build()
    save_export(loc, model.state_dict(), record)
    if event_heads:
        from raysvc.models.event_heads import EventHeads

        heads = {k: v.contiguous() for k, v in EventHeads(model).state_dict().items() if not k.startswith("seg.")}
        write_bytes_atomic(loc.join(EVENT_HEADS), st_save(heads))
