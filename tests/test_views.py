"""Multi-view generator: crops, centre choice, grid sampling, augmentations, determinism, packing, config."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import torch
from pydantic import ValidationError

from raysvc.data.contract.schema import table_from_events
from raysvc.data.streaming.views import (
    View,
    ViewConfig,
    collate_view_table,
    collate_views,
    make_views,
    table_views,
    views_table,
)
from raysvc.ops.grouping import cnms_event

SCALE = 768 * math.sqrt(3) / 2
NO_AUG = {"rotate_p": 0.0, "flip_p": 0.0, "coord_jitter": 0.0, "energy_jitter_p": 0.0}


def lartpc_event(seed: int, n_tracks: int = 4, n_blobs: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Voxelised line segments and Gaussian blobs on the 768^3 lattice, normalised like the preprocessing."""
    rng = np.random.default_rng(seed)
    parts = []
    for _ in range(n_tracks):
        start, d = rng.uniform(150, 620, 3), rng.normal(size=3)
        t = np.arange(0, rng.uniform(150, 300), 0.5)[:, None]
        parts.append(start + t * d / np.linalg.norm(d) + rng.normal(0, 0.6, (len(t), 3)))
    for _ in range(n_blobs):
        parts.append(rng.uniform(200, 560, 3) + rng.normal(0, 7, (500, 3)))
    vox = np.unique(np.clip(np.round(np.concatenate(parts)), 0, 767), axis=0)
    vox = vox[rng.permutation(len(vox))]  # no spatial order in the point index
    energy = rng.uniform(-1, 1, len(vox)) * rng.choice([-1, 1], len(vox))
    return ((vox - 384) / 665.1).astype(np.float32), energy.astype(np.float32)


@pytest.fixture(scope="module")
def event():
    return lartpc_event(0)


def brute_cells(aug: np.ndarray, origin: np.ndarray, energy: np.ndarray, grid: float) -> dict:
    """Reference grid sampling with a Python dict: cell -> (mean coord, mean origin, mean energy)."""
    cells: dict[tuple, list] = {}
    for g, a, o, e in zip(
        map(tuple, np.floor((aug - aug.min(0)) / grid).astype(int)), aug, origin, energy, strict=True
    ):
        cells.setdefault(g, []).append((a, o, e))
    return {g: tuple(np.mean([m[i] for m in ms], 0) for i in range(3)) for g, ms in cells.items()}


def test_crop_sizes_and_nearest_points(event):
    coord, energy = event
    pts = coord.astype(np.float64)
    for max_points in (30000, 700):  # base = N, then base = max_points < N
        cfg = ViewConfig(max_points=max_points)
        base = min(len(coord), max_points)
        for seed in range(3):
            g, loc = make_views(coord, energy, cfg, np.random.default_rng(seed))
            assert (len(g), len(loc)) == (2, 6)
            for views, (lo, hi) in ((g, cfg.global_scale), (loc, cfg.local_scale)):
                for v in views:
                    assert math.floor(lo * base) <= len(v.index) <= math.ceil(hi * base)
                    assert len(np.unique(v.index)) == len(v.index)
                    assert v.index.min() >= 0 and v.index.max() < len(coord)
                    d = np.linalg.norm(pts - pts[v.center], axis=1)
                    out = np.setdiff1d(np.arange(len(coord)), v.index)
                    assert d[v.index].max() <= d[out].min()  # the k nearest points to the centre
                    assert v.center in v.index


def test_min_view_points_and_tiny_event():
    coord, energy = lartpc_event(1)
    cfg = ViewConfig(local_scale=(0.001, 0.001), min_view_points=50)
    _, loc = make_views(coord, energy, cfg, np.random.default_rng(0))
    assert all(len(v.index) == 50 for v in loc)
    g, loc = make_views(coord[:10], energy[:10], cfg, np.random.default_rng(0))
    assert all(len(v.index) == 10 for v in g + loc)


def test_view_centres_lie_in_the_principal_view_and_locals_go_where_no_local_went(event):
    coord, energy = event
    cfg = ViewConfig(global_scale=(0.3, 0.5), local_scale=(0.05, 0.15))
    checked = 0
    for seed in range(4):
        g, loc = make_views(coord, energy, cfg, np.random.default_rng(seed))
        principal = set(g[0].index.tolist())
        assert all(v.center in principal for v in g[1:] + loc)  # every view overlaps the teacher's principal view
        covered = np.zeros(len(coord), bool)
        for v in loc:
            if not covered[g[0].index].all():
                assert not covered[v.center]
                checked += 1
            covered[v.index] = True
    assert checked >= 20  # the rule was exercised, not skipped by full coverage


def test_cnms_local_centres(event):
    coord, energy = event
    cfg = ViewConfig(local_centers="cnms", global_scale=(0.4, 0.6))
    centres, _ = cnms_event(coord.astype(np.float64) * SCALE, cfg.cnms_radius, cfg.cnms_overlap)
    g, loc = make_views(coord, energy, cfg, np.random.default_rng(0))
    inside = np.intersect1d(centres, g[0].index)
    assert len(inside) > 0
    covered = np.zeros(len(coord), bool)
    for v in loc:
        assert v.center in inside  # a C-NMS centre inside the principal view
        if not covered[inside].all():
            assert not covered[v.center]
        covered[v.index] = True


def test_grid_sampling_matches_bruteforce(event):
    coord, energy = event
    cfg = ViewConfig(grid=0.004, **NO_AUG)  # coarse enough that many cells merge several points
    g, loc = make_views(coord, energy, cfg, np.random.default_rng(0))
    merged = 0
    for v in g + loc:
        origin = coord[v.index].astype(np.float64)
        aug = origin - origin.mean(0)
        ref = brute_cells(aug, origin, energy[v.index].astype(np.float64), cfg.grid)
        assert len(ref) == len(v.coord)
        merged += len(v.index) - len(v.coord)
        for gc, c, o, e in zip(v.grid_coord, v.coord, v.origin, v.energy, strict=True):
            rc, ro, re = ref[tuple(gc)]
            np.testing.assert_allclose(c, rc, atol=1e-6)
            np.testing.assert_allclose(o, ro, atol=1e-6)
            np.testing.assert_allclose(e, re, atol=1e-6)
        np.testing.assert_allclose(v.coord, v.origin - origin.mean(0), atol=1e-6)  # no augmentation
        assert v.coord.dtype == v.origin.dtype == v.energy.dtype == np.float32 and v.grid_coord.dtype == np.int32
    assert merged > 100


def test_augmentation_is_rigid_up_to_jitter(event):
    """coord = (origin - crop mean) @ A.T with A orthogonal (rotations, mirrors), up to the clipped jitter."""
    coord, energy = event
    dets, mats = [], []
    for jitter in (0.0, None):
        cfg = ViewConfig(coord_jitter=jitter)
        for seed in range(2):
            g, loc = make_views(coord, energy, cfg, np.random.default_rng(seed))
            for v in g + loc:
                x = v.origin.astype(np.float64) - coord[v.index].astype(np.float64).mean(0)
                a = np.linalg.lstsq(x, v.coord.astype(np.float64), rcond=None)[0].T
                resid = np.abs(x @ a.T - v.coord)
                assert resid.max() <= (cfg.grid + 1e-5 if jitter is None else 1e-5)
                if jitter is None:
                    assert resid.max() > cfg.grid / 10  # jitter is applied
                else:
                    np.testing.assert_allclose(a @ a.T, np.eye(3), atol=1e-5)
                    dets.append(np.linalg.det(a))
                    mats.append(a)
                    # pairwise distances of the view are preserved
                    i = np.arange(min(len(x), 200))
                    dx = np.linalg.norm(x[i, None] - x[None, i], axis=-1)
                    dv = np.linalg.norm(v.coord[i, None] - v.coord[None, i], axis=-1)
                    np.testing.assert_allclose(dv, dx, atol=1e-5)
    dets = np.array(dets)
    assert np.allclose(np.abs(dets), 1, atol=1e-4)
    assert (dets < 0).any() and (dets > 0).any()  # some views mirrored, some not
    off_diag = np.array([np.abs(a - np.diag(np.diag(a))).max() for a in mats])
    assert (off_diag > 0.1).mean() > 0.5  # most views rotated (p 0.8 per axis)


def test_energy_jitter_shared_per_event(event):
    coord, energy = event
    cfg = ViewConfig(grid=1e-5, coord_jitter=0.0)  # cells far smaller than the voxel: no merging
    lookup = {tuple(c): i for i, c in enumerate(coord)}
    factors = []
    for seed in range(6):
        g, loc = make_views(coord, energy, cfg, np.random.default_rng(seed))
        ratios = []
        for v in g + loc:
            assert len(v.coord) == len(v.index)
            src = np.array([lookup[tuple(o)] for o in v.origin])  # one point per cell: origin is that point
            assert set(src.tolist()) == set(v.index.tolist())
            ratios.append(v.energy / energy[src])
        ratios = np.concatenate(ratios)
        np.testing.assert_allclose(ratios, ratios[0], rtol=1e-4)
        factors.append(ratios[0])
    factors = np.array(factors)
    assert (np.abs(factors - 1) > 1e-4).any() and (np.abs(factors - 1) < 0.3).all()


def test_matched_pairs_between_views(event):
    coord, energy = event
    cfg = ViewConfig()
    g, loc = make_views(coord, energy, cfg, np.random.default_rng(1))
    g0 = g[0]
    total = 0
    for v in loc:
        shared = np.intersect1d(v.index, g0.index)
        if not len(shared):
            continue
        p = coord[shared].astype(np.float64)
        # the local cell holding each shared point (nearest local origin), then its partner among global-0 cells
        near = np.linalg.norm(p[:, None] - v.origin[None], axis=-1).argmin(1)
        q = v.origin[near].astype(np.float64)
        d = np.linalg.norm(q[:, None] - g0.origin[None], axis=-1).min(1)
        assert d.max() <= 2 * cfg.grid
        total += len(shared)
    assert total > 100


def table_of(events: list[tuple[np.ndarray, np.ndarray]], ids: list[int]):
    return table_from_events(
        [
            {
                "event_id": i,
                "coord": c,
                "energy": e,
                **{k: np.zeros(len(e), np.int32) for k in ("semantic", "pid", "particle", "interaction", "fragment")},
            }
            for i, (c, e) in zip(ids, events, strict=True)
        ],
        source="test",
    )


def same(a: View, b: View) -> bool:
    return all(
        np.array_equal(getattr(a, f), getattr(b, f))
        for f in ("coord", "origin", "energy", "grid_coord", "index", "center")
    )


def test_determinism_and_order_independence():
    evs = [lartpc_event(s, n_tracks=2, n_blobs=1) for s in (3, 4, 5)]
    table = table_of(evs, [7, 11, 13])
    cfg = ViewConfig(local_views=2)
    a = table_views(table, cfg, seed=1, epoch=0)
    b = table_views(table.slice(1, 2), cfg, seed=1, epoch=0)  # another task holding a subset, other positions
    assert [e[0] for e in a] == [7, 11, 13] and [e[0] for e in b] == [11, 13]
    for ea, eb in zip(a[1:], b, strict=True):
        assert all(same(x, y) for x, y in zip(ea[1] + ea[2], eb[1] + eb[2], strict=True))
    c = table_views(table, cfg, seed=1, epoch=1)
    for ea, ec in zip(a, c, strict=True):
        assert not any(np.array_equal(x.index, y.index) for x, y in zip(ea[1] + ea[2], ec[1] + ec[2], strict=True))
    # the row's coordinates reach make_views: views of row 1 lie on that event's points
    np.testing.assert_array_equal(a[1][1][0].index.max() < len(evs[1][0]), True)


def test_collate_views_packing():
    evs = [lartpc_event(s, n_tracks=2, n_blobs=1) for s in (3, 4)]
    events = table_views(table_of(evs, [5, 9]), ViewConfig(local_views=3), seed=0, epoch=0)
    batch = collate_views(events)
    assert batch["event_id"].tolist() == [5, 9]
    for key, nv in (("global", 2), ("local", 3)):
        views = [v for e in events for v in (e[1] if key == "global" else e[2])]  # event-major
        part = batch[key]
        counts = [len(v.coord) for v in views]
        assert part["offset"].tolist() == np.cumsum(counts).tolist() and len(counts) == 2 * nv
        m = sum(counts)
        assert part["feat"].shape == (m, 4) and part["coord"].shape == part["origin"].shape == (m, 3)
        assert str(part["grid_coord"].dtype) == "torch.int64" and str(part["offset"].dtype) == "torch.int64"
        assert (part["feat"][:, :3] == part["coord"]).all()
        np.testing.assert_array_equal(part["feat"][:, 3].numpy(), np.concatenate([v.energy for v in views]))
        s, t = counts[0], counts[0] + counts[1]  # the second view of event 0 follows the first
        np.testing.assert_array_equal(part["origin"][s:t].numpy(), views[1].origin)
        np.testing.assert_array_equal(part["grid_coord"].numpy(), np.concatenate([v.grid_coord for v in views]))
    no_local = table_views(table_of(evs[:1], [5]), ViewConfig(local_views=0), seed=0, epoch=0)
    assert collate_views(no_local)["local"] is None


def assert_same_batch(a: dict, b: dict) -> None:
    assert a["event_id"].tolist() == b["event_id"].tolist()
    for key in ("global", "local"):
        assert (a[key] is None) == (b[key] is None)
        for name, t in (a[key] or {}).items():
            assert t.dtype == b[key][name].dtype and torch.equal(t, b[key][name]), (key, name)


def test_views_as_arrow_rows_pack_to_the_same_tensors_after_slicing_and_concatenation():
    """The Ray Data loader carries views as Arrow rows: sliced (a batch cut inside a block) and concatenated (a batch
    across blocks), they must pack to exactly the tensors `collate_views` makes from the views themselves."""
    evs = [lartpc_event(s, n_tracks=2, n_blobs=1) for s in (3, 4, 5, 6)]
    cfg = ViewConfig(local_views=3)
    t1, t2 = table_of(evs[:2], [5, 9]), table_of(evs[2:], [12, 14])
    views = table_views(t1, cfg, seed=2, epoch=1) + table_views(t2, cfg, seed=2, epoch=1)
    rows = pa.concat_tables([views_table(t1, cfg, seed=2, epoch=1), views_table(t2, cfg, seed=2, epoch=1)])
    assert rows.num_rows == 4 and rows.column("event_id").to_pylist() == [5, 9, 12, 14]
    assert_same_batch(collate_view_table(rows), collate_views(views))
    assert_same_batch(collate_view_table(rows.slice(1, 2)), collate_views(views[1:3]))  # across the two tables
    no_local = views_table(table_of(evs[:1], [5]), ViewConfig(local_views=0), seed=0, epoch=0)
    assert collate_view_table(no_local)["local"] is None


@pytest.mark.parametrize(
    "field,value",
    [
        ("global_scale", (0.0, 0.5)),
        ("global_scale", (0.5, 1.2)),
        ("local_scale", (0.4, 0.1)),
        ("local_scale", (-0.1, 0.2)),
    ],
)
def test_config_rejects_bad_scales(field, value):
    with pytest.raises(ValidationError, match=field):
        ViewConfig(**{field: value})
    with pytest.raises(ValidationError, match="global_views"):
        ViewConfig(global_views=0)
    with pytest.raises(ValidationError, match="extra"):
        ViewConfig(bogus=1)


def tank_event(seed: int, n: int = 600) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hit PMTs on a cylinder's wall (normalised by the half-height, as a wch job does): coord, charge, time."""
    rng = np.random.default_rng(seed)
    phi, z = rng.uniform(-math.pi, math.pi, n), rng.uniform(-1, 1, n)
    coord = np.stack([0.93 * np.cos(phi), 0.93 * np.sin(phi), z], 1)
    return coord.astype(np.float32), rng.uniform(0, 1, n).astype(np.float32), rng.uniform(-1, 1, n).astype(np.float32)


def test_hit_times_ride_along_as_an_extra_cell_averaged_channel():
    coord, energy, time = tank_event(0)
    cfg = ViewConfig(grid=0.05, **NO_AUG)  # coarse: cells merge several PMTs
    g, loc = make_views(coord, energy, cfg, np.random.default_rng(0), extra=time[:, None])
    merged = 0
    for v in g + loc:
        origin = coord[v.index].astype(np.float64)
        aug = origin - origin.mean(0)
        # the time channel goes through the same cells as energy: brute force with time in energy's place
        ref = brute_cells(aug, origin, time[v.index].astype(np.float64), cfg.grid)
        merged += len(v.index) - len(v.coord)
        for gc, x in zip(v.grid_coord, v.extra[:, 0], strict=True):
            np.testing.assert_allclose(x, ref[tuple(gc)][2], atol=1e-6)
    assert merged > 50
    # and it reaches the model as a fifth channel, the same from the views and from their Arrow rows
    table = (
        table_of([(coord, energy)], [3])
        .drop_columns(["time"])
        .append_column("time", pa.array([time.tolist()], pa.list_(pa.float32())))
    )
    events = table_views(table, ViewConfig(local_views=2), seed=0, epoch=0)
    batch = collate_views(events)
    assert batch["global"]["feat"].shape[1] == 5
    views = events[0][1]
    np.testing.assert_array_equal(batch["global"]["feat"][:, 4].numpy(), np.concatenate([v.extra[:, 0] for v in views]))
    assert_same_batch(collate_view_table(views_table(table, ViewConfig(local_views=2), seed=0, epoch=0)), batch)


def test_rotations_only_about_the_tank_axis_keep_z():
    coord, energy, _ = tank_event(1)
    cfg = ViewConfig(rotate_p=1.0, rotate_axes=("z",), flip_p=0.5, coord_jitter=0.0, energy_jitter_p=0.0)
    g, loc = make_views(coord, energy, cfg, np.random.default_rng(2), extra=None)
    for v in g + loc:
        np.testing.assert_allclose(v.coord[:, 2], v.origin[:, 2] - coord[v.index, 2].mean(), atol=1e-5)
        # rotations and mirrors about z keep the distance from the axis (relative to the crop's centre)
        centre = coord[v.index, :2].mean(0)
        np.testing.assert_allclose(
            np.linalg.norm(v.coord[:, :2], axis=1), np.linalg.norm(v.origin[:, :2] - centre, axis=1), atol=1e-5
        )
    tilted = make_views(coord, energy, ViewConfig(rotate_p=1.0, coord_jitter=0.0), np.random.default_rng(2))[0][0]
    assert not np.allclose(tilted.coord[:, 2], tilted.origin[:, 2] - coord[tilted.index, 2].mean(), atol=1e-3)
    with pytest.raises(ValidationError):
        ViewConfig(rotate_axes=("w",))
