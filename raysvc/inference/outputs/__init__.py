"""The registry of output adapters (`base.Output`): name -> "module:Class" (imported when first asked for). A
plug-in registers its own with `register_output`; an export names the outputs it carries in its record."""

from __future__ import annotations

import importlib

from raysvc.inference.outputs.base import Output
from raysvc.plugins import load_plugins

OUTPUTS: dict[str, str | type[Output]] = {
    "instances": "raysvc.inference.outputs.instances:InstancesOutput",
    "event_heads": "raysvc.inference.outputs.event_heads:EventHeadsOutput",
}


def register_output(cls: type[Output]) -> type[Output]:
    """Register an Output class under its `name` (usable as a class decorator)."""
    known = OUTPUTS.get(cls.name)
    if known is not None and known is not cls and known != f"{cls.__module__}:{cls.__qualname__}":
        raise ValueError(f"output {cls.name!r} is registered already ({known})")
    OUTPUTS[cls.name] = cls
    return cls


def get_output(name: str) -> type[Output]:
    """The Output class registered as `name`; unknown: an error listing the known ones."""
    if name not in OUTPUTS:
        load_plugins()
    if name not in OUTPUTS:
        raise ValueError(f"unknown output {name!r}; known: {sorted(OUTPUTS)} (a plug-in's: is it in RAYSVC_PLUGINS?)")
    entry = OUTPUTS[name]
    if isinstance(entry, str):
        module, cls = entry.split(":")
        entry = OUTPUTS[name] = getattr(importlib.import_module(module), cls)
    return entry


def all_outputs() -> list[type[Output]]:
    """Every registered output (plug-ins included): what the endpoint's OpenAPI schema describes."""
    load_plugins()
    return [get_output(n) for n in sorted(OUTPUTS)]


__all__ = ["OUTPUTS", "Output", "all_outputs", "get_output", "register_output"]
