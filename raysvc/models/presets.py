"""Model sizes by name. Each architecture keeps a PRESETS table (size -> the config fields in which that size differs
from the config's defaults); a config is built from one entry with the caller's overrides on top."""

from __future__ import annotations

from typing import TypeVar

from pydantic import BaseModel

Config = TypeVar("Config", bound=BaseModel)


def build_preset(config: type[Config], presets: dict[str, dict], name: str, overrides: dict) -> Config:
    """`config` from the `name` entry of `presets` with `overrides` on top; an unknown size lists the known ones."""
    if name not in presets:
        raise ValueError(f"unknown model size {name!r}; choose one of {sorted(presets)}")
    return config(**{**presets[name], **overrides})
