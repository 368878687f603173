"""Typed configs from YAML with dotted `--set key=value` overrides; errors name the offending field."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A config that does not validate; the message lists each bad field by its dotted path."""


def parse_overrides(sets: list[str] | None) -> dict:
    """['a.b=1', 'c=x'] -> {'a': {'b': 1}, 'c': 'x'}; values parsed as YAML scalars / lists."""
    out: dict = {}
    for item in sets or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {p!r} is set both as a value and as a section")
        node[parts[-1]] = yaml.safe_load(raw) if raw != "" else ""
    return out


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(model: type[M], path: str | Path | None = None, sets: list[str] | None = None) -> M:
    """Validate defaults <- YAML file (optional) <- overrides against `model`; mappings merge key by key."""
    data: dict = {}
    if path:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"{path}: cannot read config ({e})") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    # Start from the model's defaults so that an override of one nested key (kinetic_mev.muon.high) keeps its siblings.
    defaults = model.model_construct().model_dump(warnings=False)
    data = deep_merge(deep_merge(defaults, data), parse_overrides(sets))
    try:
        return model.model_validate(data)
    except ValidationError as e:
        lines = [f"  {'.'.join(str(x) for x in err['loc']) or '(top)'}: {err['msg']}" for err in e.errors()]
        raise ConfigError(f"invalid {model.__name__}{f' in {path}' if path else ''}:\n" + "\n".join(lines)) from e
