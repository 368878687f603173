"""Event display of a cylindrical detector (water Cherenkov): the tank unrolled flat, the way these events are
looked at: the barrel cut along phi = +-pi and laid out as a rectangle (phi R across, z up), the top cap a disc
above it and the bottom cap a disc below, seen from inside the tank. Hits are coloured by charge and by the
particle (ring) that gave them most of their light."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from raysvc.data.contract.detectors import Detector  # noqa: E402
from raysvc.data.tools.display import save_figure  # noqa: E402


def unroll(xyz: np.ndarray, detector: Detector) -> tuple[np.ndarray, np.ndarray]:
    """((N, 2) flat positions in the detector's units, (N,) part: 0 barrel, 1 top cap, -1 bottom cap) of points on
    the surface of `detector`'s cylinder. A point belongs to the cap whose plane is nearer than the barrel."""
    radius, half_height = detector.cylinder
    rel = xyz.astype(np.float64) - detector.center
    r = np.hypot(rel[:, 0], rel[:, 1])
    on_cap = (half_height - np.abs(rel[:, 2])) < (radius - r)
    part = np.where(on_cap, np.sign(rel[:, 2]).astype(int), 0)
    phi = np.arctan2(rel[:, 1], rel[:, 0])
    flat = np.column_stack([radius * phi, rel[:, 2]])
    # caps seen from inside: the top cap's +y points away from the barrel, the bottom cap's towards it
    top, bottom = part == 1, part == -1
    flat[top] = np.column_stack([rel[top, 0], half_height + radius + rel[top, 1]])
    flat[bottom] = np.column_stack([rel[bottom, 0], -half_height - radius - rel[bottom, 1]])
    return flat, part


def _outline(ax, detector: Detector, scale: float) -> None:
    radius, half_height = (v * scale for v in detector.cylinder)
    w = np.pi * radius
    ax.plot([-w, w, w, -w, -w], [-half_height, -half_height, half_height, half_height, -half_height], c="0.6", lw=0.8)
    t = np.linspace(0, 2 * np.pi, 200)
    for cy in (half_height + radius, -half_height - radius):
        ax.plot(radius * np.cos(t), cy + radius * np.sin(t), c="0.6", lw=0.8)


def show_tank_event(ev: dict, detector: Detector, event_id: int, out: str) -> str:
    """Two unrolled views of one event: by charge, and by owning particle (grey: dark noise); the event's ring count
    in the title where it has one. The water Cherenkov detector's display (`Detector.display`)."""
    rings = ev.get("rings")
    to_m = detector.unit_mm / 1000
    flat, _ = unroll(ev["coord"], detector)
    flat = flat * to_m
    fig, axes = plt.subplots(1, 2, figsize=(14, 7.5))
    ax = axes[0]
    _outline(ax, detector, to_m)
    order = np.argsort(ev["energy"])  # bright hits on top
    sc = ax.scatter(
        flat[order, 0], flat[order, 1], s=3, c=np.log10(np.maximum(ev["energy"][order], 0.1)), cmap="viridis"
    )
    fig.colorbar(sc, ax=ax, shrink=0.7, label=f"log10 charge [{detector.feature_units[0]}]")
    ax.set_title(f"event {event_id}: {len(flat)} hit PMTs, by charge")
    ax = axes[1]
    _outline(ax, detector, to_m)
    owner = ev["particle"]
    noise = owner < 0
    ax.scatter(flat[noise, 0], flat[noise, 1], s=2, c="0.8", label=f"noise ({noise.sum()})")
    pid_names = detector.labels["pid"].classes
    for n, p in enumerate(np.unique(owner[~noise])):
        m = owner == p
        kind = pid_names[ev["pid"][m][0]] if ev["pid"][m][0] >= 0 else "?"
        ax.scatter(flat[m, 0], flat[m, 1], s=3, color=plt.cm.tab10(n % 10), label=f"particle {p}: {kind} ({m.sum()})")
    ax.legend(markerscale=4, fontsize=7, loc="upper right")
    ax.set_title(f"by particle (ring){'' if rings is None else f': {rings} ring(s)'}")
    for ax in axes:
        ax.set_aspect("equal")
        ax.set_xlabel("phi R [m] (caps: x [m])")
        ax.set_ylabel("z [m] (caps: y [m], offset)")
    return save_figure(fig, out)
