"""The detector registry: name -> Detector. Every process fills it the same way, so that a dataset or model naming a
detector reads the same in the CLI, its subprocesses, Ray's read tasks and Train workers, and a Serve replica:
raysvc's own detectors when the package is imported (`load_detectors`), those of other packages and plug-ins
(`raysvc.detectors` entry points, RAYSVC_PLUGINS: raysvc/plugins.py) the first time a name is not known or the
whole list is asked for, never during the import (a plug-in may import any part of raysvc). It is a
`plugins.Registry` like the tasks' and the outputs', holding Detector records rather than classes."""

from __future__ import annotations

import importlib
import pkgutil
from importlib.metadata import entry_points

from raysvc.data.contract.detectors.base import Detector
from raysvc.plugins import ENV as PLUGINS_ENV
from raysvc.plugins import Registry, load_plugins

DEFAULT_DETECTOR = "lartpc"  # what manifests and exports written before they named a detector hold

# Installed packages register detectors under this entry-point group, naming a Detector value ("pkg.mod:TOY") or a
# module that calls register_detector when imported.
ENTRY_POINT_GROUP = "raysvc.detectors"
_BUILTIN = "raysvc.data.contract.detectors"


def load_external() -> None:
    """Register the detectors of the `raysvc.detectors` entry points (a Detector value, or a module that registers
    its own), then import the plug-ins (RAYSVC_PLUGINS)."""
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
        except Exception as e:
            raise ImportError(f"entry point {ep.name} = {ep.value!r} ({ENTRY_POINT_GROUP}): {e}") from e
        if isinstance(obj, Detector):
            register_detector(obj)
    load_plugins()


REGISTRY = Registry(
    "detector",
    {},
    load=load_external,
    hint=f"a detector of another package: install it, or name its module in {PLUGINS_ENV}",
)
DETECTORS: dict[str, Detector] = REGISTRY.entries  # the records registered so far, by name


def register_detector(detector: Detector) -> Detector:
    """Make `detector` known by its name (returns it, so a module can write `X = register_detector(Detector(...))`).
    Registering the same record again is a no-op; another record under a taken name is an error."""
    if not isinstance(detector, Detector):
        raise TypeError(f"register_detector takes a Detector, got {type(detector).__name__}")
    REGISTRY.register(detector.name, detector)
    return detector


def get_detector(name: str | None) -> Detector:
    """The registered Detector called `name` (None: the default, LArTPC); an unknown name is an error listing the
    known ones."""
    return REGISTRY.get(name or DEFAULT_DETECTOR)


def detector_names() -> list[str]:
    """Every registered detector's name, plug-ins included."""
    return REGISTRY.names()


def load_detectors() -> None:
    """Register raysvc's own detectors: each module of this package registers its record when imported."""
    for mod in pkgutil.iter_modules(importlib.import_module(_BUILTIN).__path__):
        if mod.name not in ("base", "registry"):
            importlib.import_module(f"{_BUILTIN}.{mod.name}")
