"""What a foreign checkpoint does not say and a raysvc export must: the detector whose events it reads, the grid,
whether events are centred, the licence. A Sonata or pimm file states none of these but (sometimes) the licence, so
raysvc asks for them instead of guessing; `Answers` holds what the user told it."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from raysvc.data.contract.detectors import DEFAULT_DETECTOR, get_detector
from raysvc.data.streaming.transforms import PreprocessConfig
from raysvc.inference.record import ExportedModel, ModelSpec

# the record fields a foreign source leaves open, and the option of `raysvc weights import` that states each
OPTIONS = {
    "detector": "--detector NAME",
    "grid_voxels": "--grid-voxels X",
    "center_events": "--center-events or --no-center-events",
    "licence": "--licence TEXT",
    "class_names": "--class-names A,B,...",
}


class Answers(BaseModel):
    """How to read a model file, and what its source leaves unsaid (None: not told)."""

    model_config = ConfigDict(extra="forbid")
    source: Literal["auto", "raysvc", "sonata", "pimm"] = Field("auto", description="the format; auto: detected")
    config: dict | None = Field(
        None,
        description="the model's reference config (PointTransformerV3 kwargs or pimm registry config) for a "
        "checkpoint that carries none",
    )
    prefix: str | None = Field(None, description="read only the keys under this prefix (e.g. student.backbone.)")
    detector: str | None = None
    grid_voxels: float | None = Field(None, gt=0, description="grid sampling cell side in voxels")
    center_events: bool | None = None
    licence: str | None = None
    class_names: list[str] | None = Field(None, description="a segmenter's classes, in the order of its outputs")
    preprocess: dict = Field(default_factory=dict, description="PreprocessConfig fields unlike the detector's")
    head: Literal["lin", "dec"] | None = Field(None, description="build a segmenter with this head (fresh weights)")
    allow_missing: list[Literal["heads"]] = Field(
        default_factory=list, description="heads: model keys of the head and decoder may start without a weight"
    )


def foreign_record(
    overrides: dict,
    answers: Answers,
    source: dict,
    licence: str | None,
    record: ExportedModel | None = None,
    num_classes: int | None = None,
) -> ExportedModel:
    """The record of weights from another format: the PTv3 config `overrides` (of the `base` preset), a trained
    "dec" head of `num_classes` outputs if the source has one, and what the user answered; a field neither states is
    a placeholder named in `unstated`. A raysvc `record` that travelled with the weights (a pimm directory raysvc
    wrote) states everything itself."""
    if record is not None:
        return record.model_copy(update={"source": {**(record.source or {}), **source}})
    unstated = [k for k in ("detector", "grid_voxels", "center_events") if getattr(answers, k) is None]
    licence = licence or answers.licence
    if licence is None:
        unstated.append("licence")
    detector = get_detector(answers.detector or DEFAULT_DETECTOR)
    preprocess = PreprocessConfig(**answers.preprocess)
    head = answers.head
    class_names = answers.class_names or (list(detector.label_classes(preprocess.remove_led)) if head else None)
    if num_classes is not None:  # the source's own head: its classes are the source's, never the detector's guess
        if head not in (None, "dec"):
            raise ValueError(f"{source.get('file')}: its head is a linear layer on the decoder (dec), not {head!r}")
        head = "dec"
        class_names = answers.class_names or [f"class{i}" for i in range(num_classes)]
        if answers.class_names is None:
            unstated.append("class_names")
        elif len(class_names) != num_classes:
            raise ValueError(
                f"{source.get('file')}: its head has {num_classes} classes, --class-names names {len(class_names)}"
            )
    spec = ModelSpec(
        arch="ptv3",
        size="base",
        overrides=overrides,
        head=head,
        grid_voxels=answers.grid_voxels or 1.0,
        center_events=bool(answers.center_events),
    )
    channels = spec.backbone_config().in_channels
    if answers.detector is not None and channels != detector.in_channels:
        raise ValueError(
            f"{source.get('file')}: the model takes {channels} input channels; {detector.name} events give "
            f"{detector.in_channels} (xyz + {', '.join(detector.features)})"
        )
    return ExportedModel(
        kind="segmenter" if head else "backbone",
        method="imported",
        detector=detector.name,
        model=spec,
        class_names=class_names,
        preprocess=preprocess,
        licence=licence,
        source=source,
        unstated=unstated,
    )


def require_stated(record: ExportedModel, where: str, fields: tuple[str, ...] = tuple(OPTIONS)) -> None:
    """A record with placeholders among `fields` is an error saying which options of `raysvc weights import`
    state them."""
    open_ = [k for k in record.unstated if k in fields]
    if open_:
        wanted = ", ".join(OPTIONS[k] for k in open_)
        raise ValueError(
            f"{where} does not state {', '.join(open_)}: give {wanted} (raysvc weights import writes an "
            "export that states them)"
        )
