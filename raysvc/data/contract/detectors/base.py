"""The Detector record: geometry, per-point feature channels and their normalisation, label spaces, reference
statistics and display colours of one detector technology. Plain frozen data, so that it pickles into Ray tasks and
serialises into manifests and exported models by name."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


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
    # preprocess fields this detector's jobs set beyond the geometry (center / scale / volume come from the
    # geometry): e.g. a PMT's charge needs no energy threshold and a wider log range
    preprocess: dict = field(default_factory=dict)

    def preprocess_fields(self) -> dict:
        """The preprocess section a job on this detector's events starts from: its geometry and `preprocess`."""
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
