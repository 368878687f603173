"""One-cycle learning-rate schedule: linear warmup to the peak, then cosine down to `final_frac` of it."""

from __future__ import annotations

import math

import torch


def one_cycle(step: int, total: int, warmup_frac: float, final_frac: float) -> float:
    """Multiplier of the peak lr at `step` (0-based) of `total`."""
    warm = int(total * warmup_frac)
    if step < warm:
        return (step + 1) / warm
    t = (step - warm) / max(total - warm, 1)
    return final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def one_cycle_scheduler(opt: torch.optim.Optimizer, total: int, warmup_frac: float, final_frac: float):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: one_cycle(s, total, warmup_frac, final_frac))
