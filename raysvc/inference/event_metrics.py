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
