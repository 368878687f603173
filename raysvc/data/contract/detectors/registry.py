"""The detector registry: name -> Detector. Every process fills it the same way, so that a dataset or model naming a
detector reads the same in the CLI, its subprocesses, Ray's read tasks and Train workers, and a Serve replica:
raysvc's own detectors when the package is imported (`load_detectors`), those of other packages and plug-ins
(`raysvc.detectors` entry points, RAYSVC_PLUGINS: raysvc/plugins.py) the first time a name is not known or the
whole list is asked for, never during the import (a plug-in may import any part of raysvc)."""

from __future__ import annotations

import importlib
import pkgutil
from importlib.metadata import entry_points

from raysvc.data.contract.detectors.base import Detector
from raysvc.plugins import ENV as PLUGINS_ENV
from raysvc.plugins import load_plugins

DETECTORS: dict[str, Detector] = {}
DEFAULT_DETECTOR = "lartpc"  # what manifests and exports written before they named a detector hold

# Installed packages register detectors under this entry-point group, naming a Detector value ("pkg.mod:TOY") or a
# module that calls register_detector when imported.
ENTRY_POINT_GROUP = "raysvc.detectors"
_BUILTIN = "raysvc.data.contract.detectors"


def register_detector(detector: Detector) -> Detector:
    """Make `detector` known by its name (returns it, so a module can write `X = register_detector(Detector(...))`).
    Registering the same record again is a no-op; another record under a taken name is an error."""
    if not isinstance(detector, Detector):
        raise TypeError(f"register_detector takes a Detector, got {type(detector).__name__}")
    known = DETECTORS.get(detector.name)
    if known is not None and known != detector:
        raise ValueError(f"another detector is registered as {detector.name!r} already")
    DETECTORS[detector.name] = detector
    return detector


def get_detector(name: str | None) -> Detector:
    """The registered Detector called `name` (None: the default, LArTPC); an unknown name is an error listing the
    known ones."""
    name = name or DEFAULT_DETECTOR
    if name not in DETECTORS:
        load_external()
    try:
        return DETECTORS[name]
    except KeyError:
        raise ValueError(
            f"unknown detector {name!r}; known: {sorted(DETECTORS)} (a detector of another package: install it, or "
            f"name its module in {PLUGINS_ENV})"
        ) from None


def detector_names() -> list[str]:
    """Every registered detector's name, plug-ins included."""
    load_external()
    return sorted(DETECTORS)


def load_detectors() -> None:
    """Register raysvc's own detectors: each module of this package registers its record when imported."""
    for mod in pkgutil.iter_modules(importlib.import_module(_BUILTIN).__path__):
        if mod.name not in ("base", "registry"):
            importlib.import_module(f"{_BUILTIN}.{mod.name}")


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
