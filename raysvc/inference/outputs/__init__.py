"""The registry of output adapters (`base.Output`), by name. A plug-in registers its own with `register_output`; an
export names the outputs it carries in its record."""

from __future__ import annotations

from raysvc.inference.outputs.base import Output
from raysvc.plugins import Registry

OUTPUTS = Registry(
    "output",
    {
        "instances": "raysvc.inference.outputs.instances:InstancesOutput",
        "event_heads": "raysvc.inference.outputs.event_heads:EventHeadsOutput",
    },
)


def register_output(cls: type[Output]) -> type[Output]:
    """Register an Output class under its `name` (usable as a class decorator)."""
    OUTPUTS.register(cls.name, cls)
    return cls


def get_output(name: str) -> type[Output]:
    """The Output class registered as `name`; unknown: an error listing the known ones."""
    return OUTPUTS.get(name)


def all_outputs() -> list[type[Output]]:
    """Every registered output (plug-ins included): what the endpoint's OpenAPI schema describes."""
    return [OUTPUTS.get(n) for n in OUTPUTS.names()]


__all__ = ["OUTPUTS", "Output", "all_outputs", "get_output", "register_output"]
