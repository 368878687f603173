"""The Detector record: geometry, per-point feature channels and their normalisation, label spaces, reference
statistics, display and event generator of one detector technology. Plain frozen data, so that it pickles into Ray
tasks and serialises into manifests and exported models by name."""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field

import numpy as np

# The preprocess fields a detector must state beyond its geometry (center / scale / volume follow from that); a job's
# `preprocess` leaves them unset (None) to take the dataset's detector's values (data/streaming/transforms.py).
DETECTOR_CUTS = ("energy_threshold", "min_points", "log_emax")


def load_ref(ref: str):
    """The object a "module:attribute" reference names, imported on first use: the contract names its generators and
    displays this way, so it never imports the layers above it (and a detector's generator only loads where events
    are generated)."""
    module, _, attr = ref.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ImportError(f"cannot load {ref!r}: {e}") from e


@dataclass(frozen=True)
class EventGenerator:
    """A detector's synthetic-event generator (`raysvc data generate --detector NAME`), as "module:attribute"
    references (see `load_ref`)."""

    config: str  # its settings: a pydantic model class, every field with a default (`--set` / `--config` change them)
    draw: str  # (settings, seed, index) -> event `index` of that seed, one event-table row (schema.table_from_events)


@dataclass(frozen=True)
class LabelSpace:
    """One per-point label column and the names of its classes (index = class id; -1 = no label)."""

    column: str
    classes: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass(frozen=True)
class Detector:
    name: str
    description: str
    extent: float  # coordinates lie in [0, extent) on every axis, in `unit_mm` units
    unit_mm: float
    features: tuple[str, ...]  # per-point input channels after xyz, in model order
    labels: dict[str, LabelSpace]  # by task name: "semantic", "pid", ...
    stuff_class: int | None = None  # semantic class that is "stuff" (no instances), e.g. LArTPC's LED
    reference: dict = field(default_factory=dict)  # published statistics `raysvc data inspect` compares against
    class_colors: tuple[str, ...] = ()  # display colour per semantic class
    feature_units: tuple[str, ...] = ()  # unit of each feature channel, for docs and displays
    # A cylindrical detector inside the cube: (radius, half-height) about the cube's centre, z the axis, in the
    # coordinate units; points must lie within it (plus `surface_margin`, since sensors sit on its surface).
    cylinder: tuple[float, float] | None = None
    surface_margin: float = 0.0
    coord_scale: float | None = None  # normalisation scale, when not the cube's half-diagonal
    # the cuts of DETECTOR_CUTS in this detector's units: e.g. a PMT's charge needs no energy threshold and a wider
    # log range than a LArTPC voxel's energy
    preprocess: dict = field(default_factory=dict)
    generator: EventGenerator | None = None  # its synthetic events, if it has a generator
    # its event display for `raysvc data show`, "module:function" called as (event arrays, detector, event id, out
    # path) -> out path; None: the 3D scatter by class and x-z projection by energy (data/tools/display.py)
    display: str | None = None

    def __post_init__(self) -> None:
        missing = [k for k in DETECTOR_CUTS if k not in self.preprocess]
        other = sorted(set(self.preprocess) - set(DETECTOR_CUTS))
        if missing or other:
            raise ValueError(
                f"detector {self.name!r}: preprocess must give exactly {list(DETECTOR_CUTS)} (missing {missing}, "
                f"unknown {other})"
            )
        if "semantic" not in self.labels:
            raise ValueError(f"detector {self.name!r}: labels need a 'semantic' label space")

    def preprocess_fields(self) -> dict:
        """The values a job's `preprocess` takes on this detector's events where it leaves a field unset: the
        coordinate frame of its geometry and its cuts."""
        return {"center": self.center, "scale": self.scale, "volume": self.extent, **self.preprocess}

    @property
    def semantic(self) -> LabelSpace:
        return self.labels["semantic"]

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.semantic.classes

    def label_classes(self, remove_stuff: bool = False) -> tuple[str, ...]:
        """The semantic classes a model learns: all of them, or all but the stuff class when preprocessing removes it
        (`preprocess.remove_led`; the labels above it then move down by one, see data/streaming/transforms.py)."""
        if not remove_stuff:
            return self.class_names
        if self.stuff_class is None:
            raise ValueError(f"detector {self.name!r} has no stuff class to remove")
        return tuple(c for i, c in enumerate(self.class_names) if i != self.stuff_class)

    @property
    def in_channels(self) -> int:
        """Model input channels: xyz + the feature channels."""
        return 3 + len(self.features)

    @property
    def center(self) -> float:
        """Coordinate centre of the normalisation (the volume's centre)."""
        return self.extent / 2

    @property
    def scale(self) -> float:
        """Coordinate scale of the normalisation: `coord_scale`, else the volume's half-diagonal maps to 1 (the unit
        sphere)."""
        return self.coord_scale if self.coord_scale is not None else self.extent * math.sqrt(3) / 2

    @property
    def length_unit(self) -> str:
        """The unit of `coord` (and of particle vertices): cm, mm or a voxel pitch."""
        return {10.0: "cm", 1.0: "mm", 1000.0: "m"}.get(self.unit_mm, f"voxel ({self.unit_mm:g} mm)")

    @property
    def units(self) -> dict[str, str]:
        """The unit of every physical column of this detector's events, as each dataset manifest states it."""
        length = self.length_unit
        return {
            "coord": length,
            **dict(zip(self.features, self.feature_units, strict=True)),
            "particles.mass": "MeV/c^2",
            "particles.momentum": "MeV/c",
            "particles.vertex": length,
            "particles.direction": "unit vector",
        }

    @property
    def has_time(self) -> bool:
        """Whether points carry a time channel (the `time` column) besides their amplitude."""
        return "time" in self.features

    def inside(self, xyz: np.ndarray, extent: float | None = None) -> np.ndarray:
        """(N,) bool: points inside the detector volume ([0, extent) per axis, and within the cylinder of a
        cylindrical detector)."""
        hi = self.extent if extent is None else extent
        ok = ((xyz >= 0) & (xyz < hi)).all(axis=1)
        if self.cylinder is not None:
            radius, half_height = self.cylinder
            rel = xyz - self.center
            ok &= np.hypot(rel[:, 0], rel[:, 1]) <= radius + self.surface_margin
            ok &= np.abs(rel[:, 2]) <= half_height + self.surface_margin
        return ok
