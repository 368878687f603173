"""Torch checkpoint files as Sonata and Pointcept write them, read without running their code.

Sonata publishes `torch.save({"config": PointTransformerV3 kwargs, "state_dict": bare keys})`; Pointcept and pimm
training checkpoints hold `{"state_dict": ...}` or `{"model": ...}` with DDP (`module.`) and torch.compile
(`_orig_mod.`) prefixes and, for pretraining runs, the encoder under `backbone.` or `student.backbone.`; a plain
state dict is a file of tensors alone. Everything is read with `torch.load(weights_only=True)`: a file that needs
arbitrary code to unpickle is refused, not run.
"""

from __future__ import annotations

import io
import pickle
import re
import zipfile

import torch
from safetensors.torch import load as st_load
from safetensors.torch import load_file as st_load_file

from raysvc.storage import Location, read_bytes

# stripped from every key (DDP, torch.compile), as the references' own loaders do
WRAPPERS = ("module.", "_orig_mod.")
# where training checkpoints keep the encoder, outermost first
ENCODER_PREFIXES = ("student.backbone.", "backbone.")


def load_file(loc: Location) -> object:
    """The unpickled object of a torch.save file (tensors memory-mapped where the file is local, so a large
    checkpoint is not read into memory twice), or the tensors of a .safetensors file; an unreadable file is an
    error naming it and why."""
    if loc.path.endswith(".safetensors"):
        return load_safetensors(loc)
    try:
        if loc.is_s3:
            return torch.load(io.BytesIO(read_bytes(loc)), map_location="cpu", weights_only=True)
        try:
            return torch.load(loc.path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):  # the legacy (non-zip) format cannot be mapped: read it whole
                raise
            return torch.load(loc.path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        if found:
            raise ValueError(
                f"{loc.uri}: not a checkpoint: it needs arbitrary code to unpickle ({found.group(1)}), which raysvc "
                "refuses"
            ) from e
        raise ValueError(f"{loc.uri}: not a readable torch checkpoint (truncated or another format)") from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ValueError(f"{loc.uri}: not a readable torch checkpoint (truncated or another format): {first}") from e


def load_safetensors(loc: Location) -> dict[str, torch.Tensor]:
    try:
        return st_load(read_bytes(loc)) if loc.is_s3 else st_load_file(loc.path)
    except Exception as e:  # safetensors raises its own error type for a truncated or foreign file
        raise ValueError(f"{loc.uri}: not a readable safetensors file (truncated or another format): {e}") from e


def split_checkpoint(obj: object, where: str) -> tuple[dict[str, torch.Tensor], dict | None]:
    """(state dict, the config it carries or None) of an unpickled checkpoint; anything else is an error naming
    `where` and what it holds."""
    if not isinstance(obj, dict):
        raise ValueError(
            f"{where}: not a checkpoint: it holds a {type(obj).__name__}, expected a dict of tensors or "
            "{'config': ..., 'state_dict': ...}"
        )
    config = obj.get("config")
    state = obj
    if isinstance(obj.get("state_dict"), dict):
        state = obj["state_dict"]
    elif isinstance(obj.get("model"), dict):  # pimm / Pointcept training checkpoints
        state = obj["model"].get("state_dict", obj["model"])
    if config is not None and not isinstance(config, dict):
        raise ValueError(f"{where}: 'config' is a {type(config).__name__}, expected the model's keyword arguments")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad or not state:
        found = ", ".join(f"{k!r} ({type(state[k]).__name__})" for k in bad[:8]) if bad else "nothing"
        raise ValueError(f"{where}: not a checkpoint: expected a dict of tensors, found {found}")
    return {_unwrapped(k): v for k, v in state.items()}, config


def _unwrapped(key: str) -> str:
    for prefix in WRAPPERS:
        key = key.removeprefix(prefix)
    return key


def encoder_state(
    state: dict[str, torch.Tensor], where: str, prefix: str | None = None
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(the encoder's weights with `prefix` taken off, the keys left outside it). Without `prefix`, a prefix that
    every key carries (`student.backbone.`, `backbone.`) is taken off; one that only some keys carry is an error
    asking for `prefix`, so that the others (heads, a teacher) are never dropped unannounced."""
    if prefix is not None:
        inside = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        if not inside:
            raise ValueError(f"{where}: no key starts with {prefix!r} (keys start {_heads(state)})")
        return inside, sorted(k for k in state if not k.startswith(prefix))
    for candidate in ENCODER_PREFIXES:
        under = [k for k in state if k.startswith(candidate)]
        if under and len(under) == len(state):
            return {k.removeprefix(candidate): v for k, v in state.items()}, []
        if under:
            others = sorted(k for k in state if not k.startswith(candidate))
            raise ValueError(
                f"{where}: {len(under)} keys under {candidate!r} and {len(others)} others ({', '.join(others[:6])}"
                f"{', ...' if len(others) > 6 else ''}); give --prefix {candidate} to read the encoder alone "
                "(the others are then listed as skipped)"
            )
    return dict(state), []


def _heads(state: dict) -> str:
    """The distinct first two name parts of a state dict's keys, for messages."""
    heads = sorted({".".join(k.split(".")[:2]) for k in state})
    return ", ".join(heads[:8]) + (", ..." if len(heads) > 8 else "")
