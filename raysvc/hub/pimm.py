"""pimm's export directory (what `pimm.export.save_pretrained` writes and `load_model` reads), read and written here.

    config.json        manifest: library_name "pimm", format_version 1, model_type, weights, model_config
    model_config.json  the registry config, `type` first-class: the PTv3 encoder is "PT-v3m2"; a segmenter is
                       "DefaultSegmentorV2" around a PT-v3m2 with its decoder (`backbone.*`) and a linear `seg_head`
    model.safetensors  the weights (or pytorch_model.bin, a torch.save of the state dict)
    README.md          optional model card; its front matter may state the licence (`license: mit`)

A directory raysvc writes also holds `raysvc_record.json`, the export record (preprocessing, detector, licence), which
pimm ignores and raysvc reads back, so that raysvc -> pimm -> raysvc loses nothing. No machine paths are written.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from safetensors.torch import save_file

from raysvc.hub.checkpoint import load_file, split_checkpoint
from raysvc.inference.record import ExportedModel, load_record_json
from raysvc.storage import Location, exists, read_bytes

MANIFEST = "config.json"
MODEL_CONFIG = "model_config.json"
RECORD = "raysvc_record.json"
CARD = "README.md"
PIMM_FORMAT_VERSION = 1  # the manifest version pimm writes and this reads
ENCODER_TYPE = "PT-v3m2"
SEGMENTOR_TYPE = "DefaultSegmentorV2"  # backbone (PT-v3m2 with decoder) + seg_head Linear: raysvc's "dec" segmenter
# seg_head of a DefaultSegmentorV2 <-> the linear layer of raysvc's "dec" head
HEAD_KEYS = {"seg_head.weight": "head.weight", "seg_head.bias": "head.bias"}


def is_pimm_manifest(manifest: object) -> bool:
    return isinstance(manifest, dict) and manifest.get("library_name") == "pimm"


@dataclass
class PimmDir:
    """What a pimm export directory holds, in pimm's own names."""

    state: dict[str, torch.Tensor]
    model_config: dict  # the encoder's registry config (`type` PT-v3m2)
    model_type: str
    weights: str  # the weights file's name
    licence: str | None  # from the model card's front matter, if it states one
    record: ExportedModel | None  # raysvc's record, in a directory raysvc wrote


def read_json(loc: Location) -> object:
    try:
        return json.loads(read_bytes(loc))
    except ValueError as e:
        raise ValueError(f"{loc.uri}: not valid JSON: {e}") from e


def read_pimm(loc: Location) -> PimmDir:
    """The contents of a pimm export directory; a missing or malformed part is an error naming the file."""
    manifest = read_json(loc.join(MANIFEST)) if exists(loc.join(MANIFEST)) else {}
    if manifest and not is_pimm_manifest(manifest):
        raise ValueError(f"{loc.join(MANIFEST).uri}: library_name is {manifest.get('library_name')!r}, not 'pimm'")
    version = manifest.get("format_version", PIMM_FORMAT_VERSION)
    if not isinstance(version, int) or version > PIMM_FORMAT_VERSION:
        raise ValueError(
            f"{loc.join(MANIFEST).uri}: format_version {version!r}; this raysvc reads pimm's version "
            f"{PIMM_FORMAT_VERSION}"
        )
    config_loc = loc.join(manifest.get("model_config", MODEL_CONFIG))
    if not exists(config_loc):
        raise FileNotFoundError(f"{config_loc.uri}: missing: a pimm export names its model there")
    model_config = read_json(config_loc)
    if not isinstance(model_config, dict) or not isinstance(model_config.get("type"), str):
        raise ValueError(f"{config_loc.uri}: expected a JSON object with the registry 'type' (e.g. {ENCODER_TYPE!r})")
    weights = manifest.get("weights") or next(
        (n for n in ("model.safetensors", "pytorch_model.bin") if exists(loc.join(n))), None
    )
    if weights is None or not exists(loc.join(weights)):
        raise FileNotFoundError(f"{loc.uri}: no weights ({weights or 'model.safetensors or pytorch_model.bin'})")
    state = _read_weights(loc.join(weights))
    record = None
    if exists(loc.join(RECORD)):
        record = load_record_json(read_bytes(loc.join(RECORD)), loc.join(RECORD).uri)
    return PimmDir(
        state=state,
        model_config=model_config,
        model_type=model_config["type"],
        weights=weights,
        licence=_card_licence(loc.join(CARD)),
        record=record,
    )


def _read_weights(loc: Location) -> dict[str, torch.Tensor]:
    state, _ = split_checkpoint(load_file(loc), loc.uri)  # pytorch_model.bin may be a whole training checkpoint
    return state


def _card_licence(loc: Location) -> str | None:
    """The `license:` of a model card's YAML front matter (the Hugging Face convention pimm's cards follow)."""
    if not exists(loc):
        return None
    lines = read_bytes(loc).decode(errors="replace").splitlines()
    if not lines or lines[0].strip() != "---":
        return None
    for line in lines[1:]:
        if line.strip() == "---":
            return None
        key, _, value = line.partition(":")
        if key.strip() == "license" and value.strip():
            return value.strip().strip("'\"")
    return None


def split_segmentor(got: PimmDir, where: str) -> tuple[dict, dict, dict[str, torch.Tensor], int]:
    """(the PT-v3m2 config, its weights in the reference's names, the linear head in raysvc's names, the class
    count) of a DefaultSegmentorV2; any other head (an MLP head) or key is left for the caller to report."""
    cfg = got.model_config
    backbone = cfg.get("backbone")
    if not isinstance(backbone, dict) or backbone.get("type") != ENCODER_TYPE:
        raise ValueError(f"{where}: a {SEGMENTOR_TYPE} whose backbone is not {ENCODER_TYPE}: {backbone!r:.200}")
    if cfg.get("mlp_head"):
        raise ValueError(f"{where}: a {SEGMENTOR_TYPE} with an MLP head; raysvc maps the linear seg_head only")
    head = {ours: got.state[k] for k, ours in HEAD_KEYS.items() if k in got.state}
    rest = {k: v for k, v in got.state.items() if k not in HEAD_KEYS}
    return backbone, rest, head, int(cfg.get("num_classes", 0))


def segmentor_config(backbone: dict, num_classes: int, out_channels: int) -> dict:
    """model_config.json of a DefaultSegmentorV2 over the PT-v3m2 config `backbone`."""
    return {
        "type": SEGMENTOR_TYPE,
        "num_classes": num_classes,
        "backbone_out_channels": out_channels,
        "backbone": backbone,
    }


def write_pimm(
    folder: str, state: dict[str, torch.Tensor], model_config: dict, record: ExportedModel | None = None
) -> None:
    """pimm's layout in the local directory `folder` (a staging folder: publishing it is the caller's): weights as
    model.safetensors, the registry config, the manifest, raysvc's record and, with a licence, a model card."""
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, os.path.join(folder, "model.safetensors"))
    _write(folder, MODEL_CONFIG, json.dumps(model_config, indent=2) + "\n")
    manifest = {
        "library_name": "pimm",
        "format_version": PIMM_FORMAT_VERSION,
        "model_type": model_config.get("type"),
        "weights": "model.safetensors",
        "model_config": MODEL_CONFIG,
    }
    if record is not None:
        _write(folder, RECORD, record.to_json().decode() + "\n")
        if record.licence:
            card = f"---\nlicense: {record.licence}\nlibrary_name: pimm\n---\n\n{_card_text(record)}"
            _write(folder, CARD, card)
    _write(folder, MANIFEST, json.dumps(manifest, indent=2) + "\n")  # last: readers go by the manifest


def _card_text(record: ExportedModel) -> str:
    what = f"A PTv3 encoder ({ENCODER_TYPE})" if record.kind == "backbone" else f"A segmenter ({SEGMENTOR_TYPE})"
    return (
        f"{what} exported by raysvc for {record.detector} events.\n\n"
        f"Preprocessing (grid {record.model.grid_voxels} voxels, events centred: {record.model.center_events}) "
        f"is recorded in {RECORD}.\n"
    )


def _write(folder: str, name: str, text: str) -> None:
    with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
        f.write(text)
