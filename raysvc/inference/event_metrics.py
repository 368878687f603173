"""Event-level metrics of water Cherenkov heads: the ring-count confusion matrix and the PID figures people quote, the
electron efficiency at a fixed muon or pi0 rejection.

Ring classes: 1R, 2R, >=3R (an event without a ring has no ring class). PID classes of a single-particle event:
electron, muon, pi0. The efficiency at rejection R against background B: the threshold on the electron score that
keeps at most a fraction 1 - R of B's events above it (ties count as above), and the fraction of electron events
above that threshold.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa

RING_CLASSES = ("1R", "2R", ">=3R")
PID_CLASSES = ("electron", "muon", "pi0")


def ring_class(rings: np.ndarray) -> np.ndarray:
    """Number of rings -> ring class (0: 1R, 1: 2R, 2: >=3R), -1 for an event without rings."""
    r = np.asarray(rings, np.int64)
    return np.where(r <= 0, -1, np.minimum(r, 3) - 1)


def ring_confusion(true: np.ndarray, pred: np.ndarray) -> list[list[int]]:
    """3 x 3 counts, rows the true ring class, columns the predicted; events without a ring class are left out."""
    true, pred = np.asarray(true, np.int64), np.asarray(pred, np.int64)
    keep = true >= 0
    cm = np.zeros((3, 3), np.int64)
    np.add.at(cm, (true[keep], pred[keep]), 1)
    return cm.tolist()


def efficiency_at_rejection(signal: np.ndarray, background: np.ndarray, rejection: float) -> dict:
    """Electron efficiency at `rejection` of the background, from the two samples' electron scores; None where a
    sample is empty. `achievable` is False when the background sample is too small to measure that rejection."""
    s, b = np.asarray(signal, np.float64), np.asarray(background, np.float64)
    if not len(s) or not len(b):
        return {"efficiency": None, "threshold": None, "signal": len(s), "background": len(b), "achievable": False}
    allowed = math.floor((1.0 - rejection) * len(b) + 1e-9)  # background events that may pass
    order = np.sort(b)[::-1]
    # pass = score > threshold: the threshold sits at the (allowed + 1)-th highest background score
    threshold = float(order[allowed]) if allowed < len(b) else -math.inf
    return {
        "efficiency": float(np.mean(s > threshold)),
        "threshold": threshold,
        "signal": len(s),
        "background": len(b),
        "achievable": len(b) * (1.0 - rejection) >= 1.0,
    }


def pid_figures(pid_true: np.ndarray, e_score: np.ndarray) -> dict:
    """The two figures of the talk: electron efficiency at 99.9 % muon rejection and at 95 % pi0 rejection, from
    single-particle events (pid_true: 0 electron, 1 muon, 2 pi0, -1 not a single-particle event)."""
    t, p = np.asarray(pid_true, np.int64), np.asarray(e_score, np.float64)
    mu = efficiency_at_rejection(p[t == 0], p[t == 1], 0.999)
    pi0 = efficiency_at_rejection(p[t == 0], p[t == 2], 0.95)
    return {
        "e_eff_at_mu_rej_999": mu["efficiency"],
        "e_eff_at_pi0_rej_95": pi0["efficiency"],
        "events": {name: int((t == i).sum()) for i, name in enumerate(PID_CLASSES)},
        "detail": {"mu_rej_999": mu, "pi0_rej_95": pi0},
    }


def event_labels(table: pa.Table, pid_names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(ring class (B,), PID class (B,)) of each event of a water Cherenkov table; -1 where it has none (no rings;
    not one primary particle of type electron, muon or pi0). `pid_names`: the detector's PID classes (the `pid` of
    `particles`)."""
    if "rings" not in table.column_names:
        raise ValueError("ring and PID labels need the `rings` column (water Cherenkov events)")
    rings = table.column("rings").to_numpy(zero_copy_only=False)
    rings = np.where(np.isnan(rings.astype(np.float64)), 0, rings).astype(np.int64)
    ours = {pid_names.index(n): i for i, n in enumerate(PID_CLASSES)}
    pid = np.full(table.num_rows, -1, np.int64)
    for r, parts in enumerate(table.column("particles").to_pylist()):
        primaries = [p["pid"] for p in parts or () if p["primary"] == 1]
        if len(primaries) == 1 and primaries[0] in ours:
            pid[r] = ours[primaries[0]]
    return ring_class(rings), pid


def event_scores(true_ring, pred_ring, true_pid, e_score) -> dict:
    """The event heads' figures over scored events: `ring_count_confusion` (rows true 1R / 2R / >=3R),
    `ring_classes`, `ring_accuracy` (None with no ringed event) and `pid` (`pid_figures`)."""
    confusion = ring_confusion(true_ring, pred_ring)
    scored = int(np.sum(confusion))
    return {
        "ring_count_confusion": confusion,
        "ring_classes": list(RING_CLASSES),
        "ring_accuracy": float(np.trace(np.array(confusion)) / scored) if scored else None,
        "pid": pid_figures(true_pid, e_score),
    }
