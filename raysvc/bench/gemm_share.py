"""Where a CPU training step's time goes: the share spent in matrix multiplies, and how fast those multiplies run
against the same shapes multiplied alone (`raysvc bench train --profile`).

A step whose multiplies take most of its time, each at close to what the same multiply reaches alone on this core,
is bound by arithmetic: fewer launches or syncs cannot make it much faster on the CPU; only less arithmetic can.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

GEMMS = ("aten::mm", "aten::addmm", "aten::bmm")


def _mnk(name: str, shapes: list) -> tuple[int, int, int] | None:
    """(m, n, k) of a profiled multiply from its input shapes; None when the shapes are not the plain 2-D case."""
    try:
        if name == "aten::addmm":
            (m, k), (_, n) = shapes[1], shapes[2]
        elif name == "aten::mm":
            (m, k), (_, n) = shapes[0], shapes[1]
        else:
            (b, m, k), (_, _, n) = shapes[0], shapes[1]
            m *= b
    except (TypeError, ValueError):
        return None
    return m, n, k


def _alone_s(m: int, n: int, k: int, reps: int = 5) -> float:
    """Seconds of one (m x k) @ (k x n) float32 multiply alone, best of `reps` after one warm-up."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return best


def gemm_share(step: Callable[[int], object], first: int, steps: int = 2, top: int = 8) -> dict:
    """Profile `steps` calls of `step(i)` from i = `first`: total self time, the multiplies' share of it, their
    GFLOP/s, and the GFLOP/s of the `top` costliest shapes multiplied alone (the same core, the same library)."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for i in range(first, first + steps):
            step(i)
    events = prof.key_averages(group_by_input_shape=True)
    total_us = sum(e.self_cpu_time_total for e in events)
    shapes: list[tuple[float, int, tuple[int, int, int]]] = []
    gemm_us, flops = 0.0, 0.0
    for e in events:
        if e.key not in GEMMS:
            continue
        gemm_us += e.self_cpu_time_total
        mnk = _mnk(e.key, e.input_shapes)
        if mnk is not None:
            m, n, k = mnk
            flops += 2.0 * m * n * k * e.count
            shapes.append((e.self_cpu_time_total, e.count, mnk))
    shapes.sort(reverse=True)
    in_step_us = sum(us for us, _, _ in shapes[:top])
    alone_s = sum(count * _alone_s(*mnk) for _, count, mnk in shapes[:top])
    top_flops = sum(2.0 * m * n * k * count for _, count, (m, n, k) in shapes[:top])
    return {
        # under the profiler: its cost per op inflates the many small ops, not the few long multiplies
        "step_s": total_us / 1e6 / steps,
        "gemm_s_per_step": gemm_us / 1e6 / steps,
        "gemm_share": gemm_us / max(total_us, 1.0),
        "gemm_gflops": flops / max(gemm_us, 1.0) / 1e3,
        # the costliest shapes: in the step vs alone (1.0: they run in the step as fast as they can on this core)
        "top_gemm_gflops_in_step": top_flops / max(in_step_us, 1.0) / 1e3,
        "top_gemm_gflops_alone": top_flops / max(alone_s, 1e-9) / 1e9,
        "top_gemm_shapes": [[m, n, k, count] for _, count, (m, n, k) in shapes[:top]],
    }
