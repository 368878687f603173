"""LArTPC in the PILArNet-M layout: a 768^3-voxel cube of 3 mm voxels, one point per voxel with deposited energy
(MeV), five semantic classes and five particle types. Reference statistics are the published whole-dataset ones
(see docs/data.md)."""

from __future__ import annotations

from raysvc.data.contract.detectors.base import Detector, EventGenerator, LabelSpace
from raysvc.data.contract.detectors.registry import register_detector

# Whole-dataset point counts per semantic class of PILArNet-M (shower, track, michel, delta, led).
_PILARNET_CLASS_COUNTS = (1926651899, 2038240940, 34083197, 92015482, 1145363125)
_SEMANTIC = ("shower", "track", "michel", "delta", "led")

LARTPC = Detector(
    name="lartpc",
    description="liquid-argon TPC, PILArNet-M voxel cube",
    extent=768.0,
    unit_mm=3.0,
    features=("energy",),
    feature_units=("MeV (voxel value)",),
    labels={
        "semantic": LabelSpace("semantic", _SEMANTIC),
        "pid": LabelSpace("pid", ("photon", "electron", "muon", "pion", "proton")),
    },
    stuff_class=4,  # low-energy depositions
    reference={
        "name": "PILArNet-M",
        "class_fractions": dict(
            zip(_SEMANTIC, (round(c / sum(_PILARNET_CLASS_COUNTS), 4) for c in _PILARNET_CLASS_COUNTS), strict=True)
        ),
        "points_per_event": "2k-30k after cuts",
        "interactions_per_event": {"mean": 4, "std": 3},
        "particles_per_event": {"mean": 11, "std": 8},
    },
    class_colors=("#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#7f7f7f"),
    # Panda's cuts (docs/methods.md, "Data"): E > 0.13 MeV, at least 1024 points, log energy up to 20 MeV
    preprocess={"energy_threshold": 0.13, "min_points": 1024, "log_emax": 20.0},
    generator=EventGenerator(
        config="raysvc.data.sources.lartpc_generator:GeneratorConfig",
        draw="raysvc.data.sources.lartpc_generator:generate_event",
    ),
)
register_detector(LARTPC)
