"""`raysvc bench ops`: tokenisation, serialization and sparse-conv speed on generated events, with baselines from the
same run.

- Grouping at PoLAr-MAE's settings (r = 5 voxels, overlap 0.73, 32 points per group): C-NMS + ball query against
  FPS + ball query and FPS + kNN, where FPS draws as many centres per event as C-NMS kept (same token budget).
  Coverage (missed / duplicated ratios) is reported beside the speed, since that is what C-NMS buys.
- PoLAr-MAE's tokenizer end to end (grouping -> patches -> the tiny mini-PointNet), events/s for the same three
  groupings, as the paper compares them.
- Serialization: z and Hilbert encoding in Mpoints/s on one thread (numba kernels), with the whole-array torch
  encoders as the baseline.
- Sparse conv: submanifold 3x3x3 forward + backward, ours (gather-GEMM) against spconv's CPU build, both on one
  thread (spconv is only exact there), on the same voxelised events and weights; the largest output difference is
  reported so the baseline is known to compute the same thing.
Each timing is the best of `repeats` after a warm-up that also compiles the numba kernels.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

from raysvc.ops import cnms, coverage
from raysvc.ops.neighbors import ball_query, fps, knn
from raysvc.ops.serialization import _encode_torch, encode
from raysvc.ops.sparse_conv import SubMConv3d, kernel_map


def _best(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up (numba compile / caches)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def generated_events(events: int, seed: int, min_points: int = 1024, energy_cut: float = 0.13) -> list[np.ndarray]:
    """Voxel coordinates of generated events after the Panda energy cut, keeping events with >= min_points points."""
    from raysvc.data.sources.lartpc_generator import GeneratorConfig, generate_event

    cfg, out, i = GeneratorConfig(), [], 0
    while len(out) < events:
        ev = generate_event(cfg, seed, i)
        i += 1
        pts = ev["coord"][ev["energy"] > energy_cut]
        if len(pts) >= min_points:
            out.append(pts.astype(np.float64))
    return out


def _packed(evs: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    coord = torch.from_numpy(np.concatenate(evs))
    return coord, torch.cumsum(torch.tensor([len(e) for e in evs]), 0)


GROUPINGS = ("cnms_ball", "fps_ball", "fps_knn")  # C-NMS + ball query, and the FPS baselines at its token budget


def _rates(seconds: dict[str, float], events: int, what: str) -> dict:
    """`<grouping><what>_events_per_s` of each grouping from its best time over `events` events, then how many times
    faster C-NMS is than each FPS baseline (`cnms_vs_fps_ball`, `cnms_vs_fps_knn`)."""
    rates = {f"{g}{what}_events_per_s": events / seconds[g] for g in GROUPINGS}
    return rates | {f"cnms_vs_{g}": seconds[g] / seconds["cnms_ball"] for g in GROUPINGS[1:]}


def bench_grouping(evs: list[np.ndarray], radius: float, overlap: float, max_points: int, repeats: int) -> dict:
    coord, offset = _packed(evs)
    res = cnms(coord, offset, radius, overlap, max_points)
    counts = torch.diff(res.center_offset, prepend=torch.zeros(1, dtype=torch.long))
    centres, c_off = fps(coord, offset, counts)

    def cnms_ball():
        cnms(coord, offset, radius, overlap, max_points)

    def fps_ball():
        idx, off = fps(coord, offset, counts)
        ball_query(coord[idx], off, coord, offset, radius, max_points)

    def fps_knn():
        idx, off = fps(coord, offset, counts)
        knn(coord[idx], off, coord, offset, max_points)

    t = {name: _best(fn, repeats) for name, fn in zip(GROUPINGS, (cnms_ball, fps_ball, fps_knn), strict=True)}
    cov = {
        "cnms_ball": coverage(len(coord), res.groups),
        "fps_ball": coverage(len(coord), ball_query(coord[centres], c_off, coord, offset, radius, max_points)),
        "fps_knn": coverage(len(coord), knn(coord[centres], c_off, coord, offset, max_points)[0]),
    }
    return _rates(t, len(evs), "") | {"groups_per_event": float(counts.float().mean()), "coverage": cov}


def bench_tokenizer(evs: list[np.ndarray], radius: float, overlap: float, max_points: int, repeats: int) -> dict:
    """PoLAr-MAE's tokenizer end to end, events/s: grouping -> patches -> the tiny mini-PointNet's forward (one token
    per group), for C-NMS + ball query and, at the same number of centres, FPS + ball query and FPS + kNN."""
    from raysvc.models.polarmae import MiniPointNet, group_patches, preset

    coord, offset = _packed(evs)
    coord = coord.float()
    energy = torch.rand(len(coord), 1, generator=torch.Generator().manual_seed(0))
    cfg = preset("tiny")
    embed = MiniPointNet(cfg.in_channels, *cfg.pointnet_channels, cfg.width).eval()
    res = cnms(coord, offset, radius, overlap, max_points)
    counts = torch.diff(res.center_offset, prepend=torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def tokens(group: str) -> None:
        if group == "cnms_ball":
            r = cnms(coord, offset, radius, overlap, max_points)
            centre, groups = r.centers, r.groups
        else:
            centre, off = fps(coord, offset, counts)
            if group == "fps_ball":
                groups = ball_query(coord[centre], off, coord, offset, radius, max_points)
            else:
                groups = knn(coord[centre], off, coord, offset, max_points)[0]
        embed(group_patches(coord, energy, centre, groups, radius)[2])

    t = {g: _best(lambda g=g: tokens(g), repeats) for g in GROUPINGS}
    embed = f"tiny mini-PointNet ({cfg.pointnet_channels[0]}, {cfg.pointnet_channels[1]}) -> {cfg.width}"
    return _rates(t, len(evs), "_tokens") | {"embed": embed}


def bench_serialization(evs: list[np.ndarray], min_points: int, repeats: int) -> dict:
    grid = torch.from_numpy(np.concatenate(evs).astype(np.int64))
    reps = max(1, -(-min_points // len(grid)))
    grid = grid.repeat(reps, 1)[:min_points] if reps > 1 else grid
    n = len(grid)
    out = {"points": n}
    for order in ("z", "hilbert"):
        ours = _best(lambda order=order: encode(grid, depth=16, order=order), repeats)
        base = _best(lambda order=order: _encode_torch(grid, 16, order), repeats)
        key = order.split("-")[0]
        out[f"{key}_mpts_per_s"] = n / ours / 1e6
        out[f"{key}_torch_mpts_per_s"] = n / base / 1e6
        out[f"{key}_vs_torch"] = base / ours
    return out


def bench_sparse_conv(evs: list[np.ndarray], channels: int, repeats: int) -> dict:
    from raysvc.ops import spconv_backend

    grids = [torch.from_numpy(e.astype(np.int64)) for e in evs]
    grid = torch.cat(grids)
    batch = torch.repeat_interleave(torch.arange(len(grids)), torch.tensor([len(g) for g in grids]))
    gen = torch.Generator().manual_seed(0)
    feat = torch.randn(len(grid), channels, generator=gen)
    conv = SubMConv3d(channels, channels)
    upstream = torch.randn(len(grid), channels, generator=gen)

    def ours(with_map: bool = True):
        x = feat.clone().requires_grad_(True)
        nbr = kernel_map(grid, batch) if with_map else nbr_fixed
        (conv(x, nbr) * upstream).sum().backward()

    nbr_fixed = kernel_map(grid, batch)
    out = {"points": len(grid), "channels": channels, "threads": torch.get_num_threads()}
    out["ours_fwd_bwd_s"] = _best(ours, repeats)
    out["ours_conv_only_fwd_bwd_s"] = _best(lambda: ours(False), repeats)
    try:
        with spconv_backend.cpu_baseline():

            def spc():
                x = feat.clone().requires_grad_(True)
                (spconv_backend.subm_conv3d(x, grid, batch, conv.weight, conv.bias) * upstream).sum().backward()

            out["spconv_cpu_fwd_bwd_s"] = _best(spc, repeats)
            with torch.no_grad():
                diff = spconv_backend.subm_conv3d(feat, grid, batch, conv.weight, conv.bias) - conv(feat, nbr_fixed)
            out["max_abs_diff_vs_spconv"] = float(diff.abs().max())
        out["spconv_vs_ours"] = out["spconv_cpu_fwd_bwd_s"] / out["ours_fwd_bwd_s"]
    except RuntimeError as e:  # spconv missing: report it, the rest of the benchmark still stands
        out["spconv_error"] = str(e)
    return out


def run_ops_bench(
    events: int,
    seed: int,
    radius: float,
    overlap: float,
    repeats: int,
    max_points: int = 32,
    serial_points: int = 2_000_000,
    conv_events: int = 8,
    channels: int = 32,
    progress: Callable[[str], None] = print,
) -> dict:
    """All three parts on one thread; returns the JSON-ready result with the interface keys at the top level. The
    settings `raysvc bench ops` exposes have their defaults in its table (cli/bench.py) only."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        progress(f"generating {events} events (>= 1024 points after the energy cut)")
        evs = generated_events(events, seed)
        pts = np.array([len(e) for e in evs])
        progress("grouping: C-NMS + ball query, FPS + ball query, FPS + kNN")
        grouping = bench_grouping(evs, radius, overlap, max_points, repeats)
        progress("PoLAr-MAE tokenizer: grouping + patches + mini-PointNet, per grouping")
        tokenizer = bench_tokenizer(evs, radius, overlap, max_points, repeats)
        progress("serialization: z and Hilbert")
        serial = bench_serialization(evs, serial_points, repeats)
        progress("sparse conv: ours vs spconv CPU, forward + backward")
        conv = bench_sparse_conv(evs[:conv_events], channels, repeats)
    finally:
        torch.set_num_threads(threads)
    return {
        "cnms_ball_events_per_s": grouping["cnms_ball_events_per_s"],
        "fps_ball_events_per_s": grouping["fps_ball_events_per_s"],
        "fps_knn_events_per_s": grouping["fps_knn_events_per_s"],
        "cnms_vs_fps_ball": grouping["cnms_vs_fps_ball"],
        "hilbert_mpts_per_s": serial["hilbert_mpts_per_s"],
        "z_mpts_per_s": serial["z_mpts_per_s"],
        "settings": {
            "events": events,
            "seed": seed,
            "radius": radius,
            "overlap": overlap,
            "max_points": max_points,
            "threads": 1,
            "points_per_event_mean": float(pts.mean()),
            "points_per_event_median": float(np.median(pts)),
        },
        "grouping": grouping,
        "tokenizer": tokenizer,
        "serialization": serial,
        "sparse_conv": conv,
    }
