"""The three model formats raysvc reads, told apart and read into one shape: weights in raysvc's names + the export
record. A raysvc export directory (config.json with `kind`), a Sonata / Pointcept checkpoint file (`torch.save`),
a pimm export directory (config.json with library_name pimm, or model_config.json alone).

Foreign weights map through the reference's key names (hub/reference.py); every key of the source must land on a
model key of the right shape, and every model key must get a weight: anything else is an error listing the keys.
Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field

import pyarrow.fs as pafs
import torch
from torch import nn

from raysvc.hub.answers import Answers, foreign_record
from raysvc.hub.checkpoint import encoder_state, load_file, split_checkpoint
from raysvc.hub.pimm import (
    ENCODER_TYPE,
    MANIFEST,
    MODEL_CONFIG,
    RECORD,
    SEGMENTOR_TYPE,
    is_pimm_manifest,
    read_json,
    read_pimm,
    split_segmentor,
)
from raysvc.hub.reference import (
    KeyMismatch,
    config_from_reference,
    config_to_reference,
    reference_key,
    state_from_reference,
)
from raysvc.inference.record import ExportedModel, load_export
from raysvc.models.ptv3 import preset
from raysvc.storage import Location, exists, explained, list_files

FORMATS = ("raysvc", "sonata", "pimm")
HEAD_PREFIXES = ("head.", "decoder.")  # a segmenter's keys outside its backbone


@dataclass
class Source:
    """A model as read: weights named as the network `record` describes them, and what was not imported."""

    state: dict[str, torch.Tensor]
    record: ExportedModel
    format: str
    skipped: list[str] = field(default_factory=list)  # source keys outside --prefix, listed, never silent


def detect(loc: Location) -> str:
    """The format of `loc`: raysvc, sonata (a checkpoint file) or pimm; neither is an error naming what is there."""
    with explained(loc, "reading"):
        kind = loc.fs.get_file_info(loc.path).type
    if kind == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{loc.uri}: no such file or directory")
    if kind == pafs.FileType.File:
        return "sonata"
    if exists(loc.join(MANIFEST)):
        return "pimm" if is_pimm_manifest(read_json(loc.join(MANIFEST))) else "raysvc"
    if exists(loc.join(MODEL_CONFIG)):
        return "pimm"
    found = list_files(loc)
    raise ValueError(
        f"{loc.uri}: unknown model format: a directory without config.json (a raysvc or pimm export) or "
        f"model_config.json (pimm); it holds {found[:8] or 'no files'}"
    )


def read(loc: Location, answers: Answers | None = None) -> Source:
    """The model at `loc` in raysvc's names, with its record (`answers` fill what a foreign source leaves unsaid;
    what it states wins)."""
    answers = answers or Answers()
    fmt = detect(loc) if answers.source == "auto" else answers.source
    if fmt == "raysvc":
        state, record = load_export(loc)
        return Source(state, record, fmt)
    head, num_classes = {}, None
    if fmt == "pimm":
        got = read_pimm(loc)
        config, raw = answers.config or got.model_config, got.state
        if got.model_type == SEGMENTOR_TYPE:  # a segmenter: its backbone maps as an encoder, its seg_head as ours
            config, raw, head, num_classes = split_segmentor(got, loc.join(MODEL_CONFIG).uri)
        raw, skipped = encoder_state(raw, loc.join(got.weights).uri, answers.prefix)
        stated = {"model_type": got.model_type}
        licence, carried = got.licence, got.record
    else:
        obj = load_file(loc)
        raw, config = split_checkpoint(obj, loc.uri)
        config = answers.config or config
        if config is None:
            raise ValueError(
                f"{loc.uri}: holds no model config; give the PointTransformerV3 keyword arguments (or pimm's "
                f"{ENCODER_TYPE} registry config) as --config FILE.json"
            )
        raw, skipped = encoder_state(raw, loc.uri, answers.prefix)
        stated, licence, carried = {}, None, None
    source = {"format": fmt, "file": os.path.basename(loc.path.rstrip("/")), **stated, **_digest(loc)}
    overrides, state = _mapped(raw, config, loc.uri)
    if carried is not None:
        _same_network(carried, overrides, loc.uri)
    record = foreign_record(overrides, answers, source, licence, carried, num_classes)
    state.update(head)
    return Source(complete(state, record, loc.uri, answers), record, fmt, skipped)


def _mapped(raw: dict, config: dict, where: str) -> tuple[dict, dict]:
    """(overrides of the base preset, state in raysvc's names) of reference weights and config."""
    try:
        cfg = preset("base", **config_from_reference(config))
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{where}: the model config is not a PTv3 this raysvc builds: {e}") from e
    try:
        state = state_from_reference(raw, cfg)
    except KeyMismatch as e:
        parts = [f"keys that map to nothing {_few(e.unmapped)}"] if e.unmapped else []
        if e.missing:
            parts.append(f"keys the model needs and the file lacks {_few([reference_key(k) or k for k in e.missing])}")
        raise ValueError(f"{where}: the weights do not fit the config's PTv3: {'; '.join(parts)}") from e
    except ValueError as e:  # a tensor of the wrong shape, named by the reference mapping
        raise ValueError(f"{where}: {e}") from e
    base = preset("base").model_dump(mode="json")
    overrides = {k: v for k, v in cfg.model_dump(mode="json").items() if base[k] != v}
    return overrides, state


def _same_network(carried: ExportedModel, overrides: dict, where: str) -> None:
    """The record raysvc left in a pimm directory must describe the network of its model_config.json (compared in
    the reference's terms, the only ones model_config.json has)."""
    ours = preset("base", **config_from_reference(config_to_reference(carried.model.backbone_config())))
    if carried.model.arch != "ptv3" or ours != preset("base", **overrides):
        raise ValueError(f"{where}: {MODEL_CONFIG} and raysvc's record ({RECORD}) describe different networks")


def network(record: ExportedModel) -> nn.Module:
    """The network a record describes, freshly initialised: the encoder alone for a backbone, else the segmenter
    (or panoptic model)."""
    return record.model.build_backbone() if record.kind == "backbone" else record.build()


def complete(state: dict, record: ExportedModel, where: str, answers: Answers) -> dict[str, torch.Tensor]:
    """`state` checked key by key and shape by shape against the network of `record` (built on the meta device:
    no memory, no time). Keys of the head and decoder that the source lacks start from a seeded initialisation
    when `answers.allow_missing` has "heads" (a segmenter over an encoder-only source)."""
    with torch.device("meta"):
        expected = {k: v.shape for k, v in network(record).state_dict().items()}
    if record.kind != "backbone" and not any(k.startswith("backbone.") for k in state):
        # an encoder's weights (and a reference decoder's) inside a segmenter
        state = {k if k.startswith(HEAD_PREFIXES) else f"backbone.{k}": v for k, v in state.items()}
    extra = sorted(set(state) - set(expected))
    missing = sorted(set(expected) - set(state))
    heads = [k for k in missing if k.startswith(HEAD_PREFIXES)]
    allowed = heads if "heads" in answers.allow_missing else []
    if heads and not allowed:
        raise ValueError(
            f"{where}: holds an encoder only; the {record.model.head} head's {len(heads)} keys ({_few(heads)}) "
            "would have no weight: give --allow-missing heads to start them fresh, or no --head for a backbone export"
        )
    missing = [k for k in missing if k not in allowed]
    shapes = [
        f"{k} {tuple(state[k].shape)} (model {tuple(expected[k])})"
        for k in state
        if k in expected and state[k].shape != expected[k]
    ]
    if record.kind == "backbone" and extra and all(k.startswith("decoder.") for k in extra):
        raise ValueError(
            f"{where}: holds a decoder beside the encoder ({len(extra)} keys, {_few(extra, 3)}): give --head dec to "
            "import it as a segmenter (its linear head, which the source lacks, then needs --allow-missing heads)"
        )
    if extra or missing or shapes:
        parts = [
            (f"keys the model lacks {_few(extra)}", extra),
            (f"model keys without a weight {_few(missing)}", missing),
            (f"wrong shapes {_few(shapes)}", shapes),
        ]
        raise ValueError(
            f"{where}: the weights do not fit the network its config describes: "
            + "; ".join(text for text, keys in parts if keys)
        )
    if allowed:
        torch.manual_seed(0)
        fresh = network(record).state_dict()
        state = {**{k: fresh[k] for k in allowed}, **state}
    return state


def _digest(loc: Location) -> dict:
    """sha256 of a local checkpoint file (read in blocks: a large file never sits in memory for it)."""
    if loc.is_s3 or not os.path.isfile(loc.path):
        return {}
    h = hashlib.sha256()
    with open(loc.path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return {"sha256": h.hexdigest()}


def _few(keys: list[str], n: int = 8) -> str:
    if not keys:
        return "none"
    return "[" + ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "") + "]"
