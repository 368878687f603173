"""Detector descriptions: what a dataset's points mean, named by the `detector` column, every manifest and every
exported model. Adding a detector is one module here (a `Detector` value) plus its reader and generator; nothing
else in the tree names a detector's constants."""

from __future__ import annotations

from raysvc.data.contract.detectors.base import Detector, LabelSpace
from raysvc.data.contract.detectors.lartpc import LARTPC
from raysvc.data.contract.detectors.wch import WCH

DETECTORS: dict[str, Detector] = {d.name: d for d in (LARTPC, WCH)}
DEFAULT_DETECTOR = LARTPC.name


def get_detector(name: str | None) -> Detector:
    """The registered Detector called `name` (None: the default, LArTPC); an unknown name is an error listing the
    known ones."""
    name = name or DEFAULT_DETECTOR
    try:
        return DETECTORS[name]
    except KeyError:
        raise ValueError(f"unknown detector {name!r}; known: {sorted(DETECTORS)}") from None


__all__ = ["DEFAULT_DETECTOR", "DETECTORS", "LARTPC", "WCH", "Detector", "LabelSpace", "get_detector"]
