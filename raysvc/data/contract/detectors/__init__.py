"""Detector descriptions: what a dataset's points mean, named by the `detector` column, every manifest and every
exported model. A detector is one module here that registers its `Detector` record (its geometry, features, cuts,
labels, generator and display); nothing else in the tree names a detector's constants. Detectors defined outside
raysvc register through the `raysvc.detectors` entry points or the RAYSVC_PLUGINS variable (registry.py)."""

from __future__ import annotations

from raysvc.data.contract.detectors.base import DETECTOR_CUTS, Detector, EventGenerator, LabelSpace, load_ref
from raysvc.data.contract.detectors.lartpc import LARTPC  # the default detector (DEFAULT_DETECTOR)
from raysvc.data.contract.detectors.registry import (
    DEFAULT_DETECTOR,
    DETECTORS,
    ENTRY_POINT_GROUP,
    PLUGINS_ENV,
    detector_names,
    get_detector,
    load_detectors,
    register_detector,
)

load_detectors()

__all__ = [
    "DEFAULT_DETECTOR",
    "DETECTORS",
    "DETECTOR_CUTS",
    "ENTRY_POINT_GROUP",
    "LARTPC",
    "PLUGINS_ENV",
    "Detector",
    "detector_names",
    "EventGenerator",
    "LabelSpace",
    "get_detector",
    "load_ref",
    "register_detector",
]
