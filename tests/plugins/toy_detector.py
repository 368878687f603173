"""A detector that raysvc knows nothing of: a 100-unit cube, one feature channel (energy), three semantic classes
(blob, line, noise) and its own generator. Importing this module registers it, which is what
RAYSVC_PLUGINS=tests.plugins.toy_detector does in every raysvc process (the repository root on PYTHONPATH)."""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from raysvc.data.contract.detectors import Detector, EventGenerator, LabelSpace, register_detector

SIDE = 100.0

TOY = register_detector(
    Detector(
        name="toy",
        description="toy cube of the plug-in tests: a blob, a line and noise per event",
        extent=SIDE,
        unit_mm=10.0,
        features=("energy",),
        feature_units=("MeV",),
        labels={"semantic": LabelSpace("semantic", ("blob", "line", "noise"))},
        stuff_class=2,
        reference={"name": "toy", "class_fractions": dict.fromkeys(("blob", "line", "noise"), round(1 / 3, 4))},
        class_colors=("#d62728", "#1f77b4", "#7f7f7f"),
        preprocess={"energy_threshold": 0.0, "min_points": 8, "log_emax": 10.0},
        generator=EventGenerator(config=f"{__name__}:ToyConfig", draw=f"{__name__}:draw"),
    )
)


class ToyConfig(BaseModel):
    """The toy generator's settings."""

    model_config = ConfigDict(extra="forbid")
    points: int = Field(60, ge=3, description="points per class and event")
    blob_sigma: float = Field(3.0, gt=0, description="the blob's spread, in the cube's units")


def draw(cfg: ToyConfig, seed: int, index: int) -> dict:
    """Event `index` of `seed`: a Gaussian blob (bright), a straight line (medium) and uniform noise (faint); each
    class its own particle, one interaction."""
    rng = np.random.default_rng([seed, index])
    n = cfg.points
    centre = rng.uniform(20, 80, 3)
    blob = centre + rng.normal(0, cfg.blob_sigma, (n, 3))
    a, b = rng.uniform(5, 95, (2, 3))
    line = a + rng.uniform(0, 1, (n, 1)) * (b - a)
    noise = rng.uniform(0, SIDE, (n, 3))
    coord = np.clip(np.concatenate([blob, line, noise]), 0, SIDE - 1e-3).astype(np.float32)
    energy = np.concatenate([rng.uniform(2, 8, n), rng.uniform(0.5, 2, n), rng.uniform(0.01, 0.2, n)])
    semantic = np.repeat(np.arange(3), n)
    return {
        "event_id": np.int64(index),
        "coord": coord,
        "energy": energy.astype(np.float32),
        "semantic": semantic.astype(np.int8),
        "pid": np.full(3 * n, -1, np.int8),
        "particle": np.where(semantic < 2, semantic, -1).astype(np.int32),
        "interaction": np.where(semantic < 2, 0, -1).astype(np.int32),
        "fragment": np.where(semantic < 2, semantic, -1).astype(np.int32),
    }
