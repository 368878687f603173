"""Water Cherenkov, a Super-K-like tank in the WAND layout: a vertical cylinder of radius 16.9 m and half-height
18.1 m lined with about 10.8k inward-facing PMTs. One point per hit PMT: its position (cm, the tank's centre at the
cube's centre), its charge in photo-electrons (the `energy` column) and its time in ns (the `time` column).

Per-hit labels: the particle whose ring gave the PMT most of its charge (`particle`), that particle's category
(`semantic`, with dark-noise hits as the stuff class `noise`; `pid` the same category, -1 for noise) and every
particle that gave it light (`contributors`). Event labels: the particles' truth and the number of rings (`rings`).
"""

from __future__ import annotations

from raysvc.data.contract.detectors.base import Detector, EventGenerator, LabelSpace
from raysvc.data.contract.detectors.registry import register_detector

RADIUS_CM, HALF_HEIGHT_CM = 1690.0, 1810.0
EXTENT_CM = 3700.0  # the cube that holds the tank, 37 m a side

# Categories of a hit's particle; a pi0 never owns a hit (its photons do), so it is a class of the event's particles
# (`pid`) only.
_SEMANTIC = ("gamma", "electron", "muon", "pion", "noise")

WCH = Detector(
    name="wch",
    description="water Cherenkov tank, Super-K-like (WAND layout): hit PMTs",
    extent=EXTENT_CM,
    unit_mm=10.0,
    features=("energy", "time"),
    feature_units=("PE", "ns"),
    labels={
        "semantic": LabelSpace("semantic", _SEMANTIC),
        "pid": LabelSpace("pid", ("gamma", "electron", "muon", "pion", "pi0")),
    },
    stuff_class=4,  # dark-noise hits: no particle
    reference={
        "name": "WAND",
        "pmts": 10764,
        "radius_m": RADIUS_CM / 100,
        "half_height_m": HALF_HEIGHT_CM / 100,
        "kinetic_energy_mev": [1, 2000],
        "species": ["mu-", "pi+", "e-", "pi-", "pi0"],
    },
    class_colors=("#9467bd", "#d62728", "#1f77b4", "#ff7f0e", "#bbbbbb"),
    cylinder=(RADIUS_CM, HALF_HEIGHT_CM),
    surface_margin=100.0,  # PMT centres sit up to tens of cm off the nominal walls
    coord_scale=HALF_HEIGHT_CM,  # the tank's half-height maps to 1, as the published WAND pipeline does
    preprocess={"energy_threshold": 0.0, "min_points": 16, "log_emax": 50.0},  # every hit PMT kept; up to ~50 PE
    generator=EventGenerator(
        config="raysvc.data.sources.wch_generator:WChGeneratorConfig",
        draw="raysvc.data.sources.wch_generator:generate_wch_record",
    ),
    display="raysvc.data.tools.display_tank:show_tank_event",  # the tank's surface unrolled
)
register_detector(WCH)
