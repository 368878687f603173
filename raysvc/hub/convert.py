"""`raysvc weights import | export`: a model of any format written as a raysvc export, and a raysvc export written
in pimm's layout. Both write a new directory whole or not at all (hub/publish.py)."""

from __future__ import annotations

import os

from safetensors.torch import save_file

from raysvc.hub.answers import Answers, require_stated
from raysvc.hub.formats import Source, read
from raysvc.hub.pimm import ENCODER_TYPE, HEAD_KEYS, SEGMENTOR_TYPE, segmentor_config, write_pimm
from raysvc.hub.publish import check_free, staged
from raysvc.hub.reference import config_to_reference, state_to_reference
from raysvc.inference.record import EVENT_HEADS, ExportedModel
from raysvc.storage import Location, exists


def import_model(src: Location, out: Location, answers: Answers) -> Source:
    """Read `src` (any format), check that every field of its record is stated (by the source or `answers`) and
    that `answers` do not contradict the source, and write it to `out` as a raysvc export."""
    check_free(out)  # before reading a large file, not after
    got = read(src, answers)
    _contradictions(got, answers, src.uri)
    require_stated(got.record, src.uri)
    if got.format == "raysvc" and exists(src.join(EVENT_HEADS)):
        raise ValueError(f"{src.uri}: already a raysvc export (with event heads): use it as it is")
    with staged(out) as folder:
        save_file(
            {k: v.detach().contiguous() for k, v in got.state.items()},
            os.path.join(folder, got.record.weights_name),
            metadata={"format": "pt"},
        )
        with open(os.path.join(folder, "config.json"), "wb") as f:
            f.write(got.record.to_json())
    return got


def _contradictions(got: Source, answers: Answers, where: str) -> None:
    """An option that gives a value the source states otherwise is an error: the source is not overridden."""
    rec = got.record
    stated = {
        "detector": rec.detector,
        "grid_voxels": rec.model.grid_voxels,
        "center_events": rec.model.center_events,
        "licence": rec.licence,
    }
    for key, value in stated.items():
        told = getattr(answers, key)
        if (
            key not in rec.unstated
            and told is not None
            and told != value
            and not (key == "licence" and str(value).lower() == str(told).lower())
        ):
            raise ValueError(f"{where} states {key} {value!r}; the option says {told!r}")


def export_pimm(src: Location, out: Location, encoder_only: bool = False) -> ExportedModel:
    """A raysvc export (or any format raysvc reads) written in pimm's layout, config and weights in the reference's
    names, raysvc's record beside them: a backbone as pimm's PT-v3m2; a "dec" segmenter as a DefaultSegmentorV2
    (PT-v3m2 with its decoder + a linear seg_head). What pimm has no counterpart for (a "lin" head, panoptic
    decoders, event heads) is an error unless `encoder_only`, which writes the encoder alone as a backbone."""
    check_free(out)
    got = read(src)
    record, state = got.record, got.state
    if record.model.arch != "ptv3":
        raise ValueError(f"{src.uri}: a {record.model.arch} model; pimm's layout is written for PTv3 ({ENCODER_TYPE})")
    plain = record.kind == "segmenter" and record.model.head == "dec" and not record.outputs
    plain = plain and not exists(src.join(EVENT_HEADS))
    if record.kind != "backbone" and (encoder_only or not plain):
        if not encoder_only:
            raise ValueError(
                f"{src.uri}: a {record.kind} with a {record.model.head} head and outputs {record.outputs or []}: "
                f"pimm's layout holds an encoder ({ENCODER_TYPE}) or a {SEGMENTOR_TYPE} (a 'dec' head, nothing "
                "more); give --encoder-only to export the encoder as a backbone"
            )
        state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
        spec = record.model.model_copy(update={"head": None})
        update = {"kind": "backbone", "model": spec, "class_names": None, "outputs": None, "heads": {}}
        record = record.model_copy(update={**update, "instances": None, "postprocess": None})
    config, weights = _reference_layout(record, state)
    # no machine paths travel: the record names where it came from by its last path part only
    init = record.model.init
    if init:
        record = record.model_copy(update={"model": record.model.model_copy(update={"init": _last_part(init)})})
    with staged(out) as folder:
        write_pimm(folder, weights, config, record)
    return record


def _reference_layout(record: ExportedModel, state: dict) -> tuple[dict, dict]:
    """(model_config.json, weights in the reference's names) of a backbone or a "dec" segmenter."""
    cfg = record.model.backbone_config()
    if record.kind == "backbone":
        return config_to_reference(cfg), state_to_reference(state, cfg)
    inner = {k.removeprefix("backbone."): v for k, v in state.items() if not k.startswith("head.")}
    weights = {f"backbone.{k}": v for k, v in state_to_reference(inner, cfg).items()}
    weights.update({ref: state[ours] for ref, ours in HEAD_KEYS.items()})
    config = segmentor_config(config_to_reference(cfg, decoder=True), record.num_classes, cfg.dec_channels[0])
    return config, weights


def _last_part(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[-1]
