"""Multi-view generator for Panda / Sonata-style self-distillation pretraining, on preprocessed events.

Runs in CPU Ray tasks. Per event: G global and L local crops (k nearest points to a centre, k a random fraction of
min(N, max_points)). As in Sonata, the principal global view is centred on a random point and every other view is
centred inside it (its loss is matched against the teacher's principal view); local centres go to principal-view
points that no earlier local view covered, so the locals spread over it. Each view is centred, rotated, flipped,
jittered and grid-sampled; every cell keeps the mean ORIGINAL coordinate of its points (`origin`) so the loss can
match cells across views.

All randomness comes from one generator per event seeded by (seed, epoch, event_id): the views are a function of those
three numbers only, whatever the task order, worker or retry (deterministic and resumable).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, field_validator

from raysvc.data.contract.detectors import LARTPC
from raysvc.data.contract.schema import flat_coords, flat_times, flat_values


class ViewConfig(BaseModel):
    """Crops and augmentations of the multi-view generator; lengths in normalised units unless said otherwise."""

    model_config = ConfigDict(extra="forbid")
    global_views: int = Field(2, ge=1, description="global crops per event")
    local_views: int = Field(6, ge=0, description="local crops per event")
    global_scale: tuple[float, float] = Field((0.4, 1.0), description="global crop size range, fraction of base")
    local_scale: tuple[float, float] = Field((0.1, 0.4), description="local crop size range, fraction of base")
    max_points: int = Field(30000, ge=1, description="base count = min(N, max_points)")
    local_centers: Literal["uncovered", "cnms"] = Field(
        "uncovered",
        description="local centre candidates: principal-view points, or the C-NMS centres among them; "
        "ones no earlier local view covered first",
    )
    cnms_radius: float = Field(5.0, gt=0, description="C-NMS radius (voxels)")
    cnms_overlap: float = Field(0.73, gt=0, description="C-NMS overlap factor")
    voxel_scale: float = Field(LARTPC.scale, gt=0, description="normalised -> voxels, for C-NMS (the preprocess scale)")
    energy_jitter_sigma: float = Field(0.05, ge=0, description="sigma of the shared energy factor 1 + N(0, s)")
    energy_jitter_p: float = Field(0.8, ge=0, le=1, description="probability of jittering an event's energy")
    rotate_p: float = Field(0.8, ge=0, le=1, description="probability of each rotation (about rotate_axes)")
    rotate_axes: tuple[Literal["x", "y", "z"], ...] = Field(
        ("z", "x", "y"),
        description="axes of the random rotations, in order; a water Cherenkov tank only about its axis: [z]",
    )
    flip_p: float = Field(0.5, ge=0, le=1, description="probability of mirroring x, and y, independently")
    grid: float = Field(0.001, gt=0, description="grid-sampling cell size")
    coord_jitter: float | None = Field(None, ge=0, description="coordinate jitter sigma; None -> grid / 4")
    min_view_points: int = Field(16, ge=1, description="crops never smaller than this (or N if smaller)")

    @field_validator("global_scale", "local_scale")
    @classmethod
    def _scale_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        lo, hi = v
        if not (0 < lo <= hi <= 1):
            raise ValueError(f"need 0 < lo <= hi <= 1, got {v}")
        return v


@dataclass
class View:
    coord: np.ndarray  # (m, 3) float32 augmented, centred, grid-sampled
    origin: np.ndarray  # (m, 3) float32 mean original (pre-augmentation) normalised coordinate of each cell
    energy: np.ndarray  # (m,) float32
    grid_coord: np.ndarray  # (m, 3) int32
    index: np.ndarray  # (k,) int64 event points the crop took (before grid sampling)
    center: int  # event point index of the crop centre
    extra: np.ndarray | None = None  # (m, E) float32 further point features after energy (a PMT's hit time)


def _rotation(axis: int, a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    i, j = [(1, 2), (2, 0), (0, 1)][axis]  # the plane rotated about `axis`
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def _grid_sample(coord: np.ndarray, origin: np.ndarray, energy: np.ndarray, grid: float, extra=None):
    """Cell means of coord / origin / energy (/ extra), and the cells' grid coordinates (sorted by cell)."""
    gc = np.floor((coord - coord.min(0)) / grid).astype(np.int64)
    dims = gc.max(0) + 1
    if math.prod(int(d) for d in dims) >= 2**63:
        raise ValueError(f"grid {grid} too fine for a view of extent {np.ptp(coord, 0)}: cell key overflows int64")
    key = (gc[:, 0] * dims[1] + gc[:, 1]) * dims[2] + gc[:, 2]
    _, first, inv = np.unique(key, return_index=True, return_inverse=True)
    cnt = np.bincount(inv).astype(np.float64)

    def mean(x: np.ndarray) -> np.ndarray:
        return np.bincount(inv, weights=x, minlength=len(cnt)) / cnt

    cm = np.stack([mean(coord[:, d]) for d in range(3)], 1).astype(np.float32)
    om = np.stack([mean(origin[:, d]) for d in range(3)], 1).astype(np.float32)
    xm = None if extra is None else np.stack([mean(extra[:, d]) for d in range(extra.shape[1])], 1).astype(np.float32)
    return cm, om, mean(energy).astype(np.float32), gc[first].astype(np.int32), xm


def _augment(origin: np.ndarray, cfg: ViewConfig, rng: np.random.Generator) -> np.ndarray:
    """Centre shift, rotations about `rotate_axes` (each with p rotate_p), x / y mirror, clipped jitter."""
    x = origin - origin.mean(0)
    rot = np.eye(3)
    for axis in ("xyz".index(a) for a in cfg.rotate_axes):
        if rng.random() < cfg.rotate_p:
            rot = _rotation(axis, rng.uniform(-math.pi, math.pi)) @ rot
    for axis in (0, 1):
        if rng.random() < cfg.flip_p:
            rot[axis] *= -1  # mirror that coordinate after the rotations
    x = x @ rot.T
    sigma = cfg.grid / 4 if cfg.coord_jitter is None else cfg.coord_jitter
    if sigma > 0:
        x += np.clip(rng.normal(0.0, sigma, x.shape), -cfg.grid, cfg.grid)
    return x


def make_views(
    coord: np.ndarray, energy: np.ndarray, cfg: ViewConfig, rng: np.random.Generator, extra: np.ndarray | None = None
) -> tuple[list[View], list[View]]:
    """(global views, local views) of one event: coord (n, 3) normalised, energy (n,) log-scaled feature, `extra`
    (n, E) further features that are cell-averaged like energy but not jittered (a PMT's hit time)."""
    pts = np.asarray(coord, np.float64)
    n = len(pts)
    if n == 0:
        raise ValueError("make_views: empty event")
    base = min(n, cfg.max_points)
    # One factor for every view of the event (the teacher and student see the same energy scale). Energies are
    # log-scaled features here, so the factor multiplies the feature itself, not the deposited MeV.
    factor = 1.0 + rng.normal(0.0, cfg.energy_jitter_sigma) if rng.random() < cfg.energy_jitter_p else 1.0
    feat = np.asarray(energy, np.float64) * factor
    pool = np.arange(n)
    if cfg.local_views and cfg.local_centers == "cnms":
        from raysvc.ops.grouping import cnms_event

        pool, _ = cnms_event(pts * cfg.voxel_scale, cfg.cnms_radius, cfg.cnms_overlap)

    def crop(c: int, scale: tuple[float, float]) -> View:
        k = min(n, max(int(round(rng.uniform(*scale) * base)), cfg.min_view_points))
        d2 = ((pts - pts[c]) ** 2).sum(1)
        idx = np.sort(np.argpartition(d2, k - 1)[:k]) if k < n else np.arange(n)
        origin = pts[idx]
        cm, om, em, gc, xm = _grid_sample(
            _augment(origin, cfg, rng), origin, feat[idx], cfg.grid, None if extra is None else extra[idx]
        )
        return View(cm, om, em, gc, index=idx, center=c, extra=xm)

    # As in Sonata: the principal global view is centred on a random point; the other global views and every local
    # view are centred inside it, so each student view overlaps the teacher view its loss is matched against. Local
    # centres go to principal-view points (or C-NMS centres) that no earlier local view covered.
    principal = crop(int(rng.integers(n)), cfg.global_scale)
    globals_ = [principal] + [
        crop(int(principal.index[rng.integers(len(principal.index))]), cfg.global_scale)
        for _ in range(cfg.global_views - 1)
    ]
    in_principal = np.zeros(n, bool)
    in_principal[principal.index] = True
    cand_all = pool[in_principal[pool]]
    if len(cand_all) == 0:  # no C-NMS centre inside the principal view: its points then
        cand_all = principal.index
    covered = np.zeros(n, bool)
    locals_ = []
    for _ in range(cfg.local_views):
        free = cand_all[~covered[cand_all]]
        cand = free if len(free) else cand_all  # everything covered: start over
        view = crop(int(cand[rng.integers(len(cand))]), cfg.local_scale)
        covered[view.index] = True
        locals_.append(view)
    return globals_, locals_


def table_views(table: pa.Table, cfg: ViewConfig, seed: int, epoch: int) -> list[tuple[int, list[View], list[View]]]:
    """(event_id, globals, locals) for every row of a preprocessed table (event ids must be non-negative)."""
    coords = flat_coords(table)
    energy = flat_values(table, "energy").astype(np.float32, copy=False)
    times = flat_times(table)  # the channel `collate_packed` adds after energy
    extra = None if times is None else times.reshape(-1, 1)
    bounds = np.concatenate([[0], np.cumsum(table.column("num_points").to_numpy().astype(np.int64))])
    out = []
    for r, eid in enumerate(table.column("event_id").to_numpy().tolist()):
        sl = slice(bounds[r], bounds[r + 1])
        rng = np.random.default_rng([seed, epoch, eid])
        g, loc = make_views(coords[sl], energy[sl], cfg, rng, None if extra is None else extra[sl])
        out.append((eid, g, loc))
    return out


def collate_views(events: list[tuple[int, list[View], list[View]]]) -> dict:
    """Packed torch batch: event_id (B,), and for "global" / "local" (views event-major: e0v0, e0v1, e1v0, ...)
    feat (M, 4) = xyz + energy (+ the extra features: (M, 5) with hit times), coord, origin (M, 3), grid_coord (M, 3)
    int64, offset (V,) cumulative counts.
    "local" is None when the events have no local views."""
    import torch

    def pack(views: list[View]) -> dict[str, torch.Tensor] | None:
        if not views:
            return None
        coord = torch.from_numpy(np.concatenate([v.coord for v in views]))
        energy = torch.from_numpy(np.concatenate([v.energy for v in views])).unsqueeze(1)
        extra = [torch.from_numpy(np.concatenate([v.extra for v in views]))] if views[0].extra is not None else []
        return {
            "feat": torch.cat([coord, energy, *extra], 1),
            "coord": coord,
            "origin": torch.from_numpy(np.concatenate([v.origin for v in views])),
            "grid_coord": torch.from_numpy(np.concatenate([v.grid_coord for v in views]).astype(np.int64)),
            "offset": torch.from_numpy(np.cumsum([len(v.coord) for v in views]).astype(np.int64)),
        }

    return {
        "event_id": torch.tensor([e[0] for e in events], dtype=torch.long),
        "global": pack([v for e in events for v in e[1]]),
        "local": pack([v for e in events for v in e[2]]),
    }


# Views as Arrow rows, so that they can travel through Ray Data blocks (and be sliced and concatenated like events):
# one row per event; per kind ("global", "local") the points of each view and the event's views' arrays, flattened.
_VIEW_ARRAYS = (("coord", 3, pa.float32()), ("origin", 3, pa.float32()), ("energy", 1, pa.float32()))


def views_table(table: pa.Table, cfg: ViewConfig, seed: int, epoch: int) -> pa.Table:
    """`table_views` of a preprocessed table as an Arrow table (one row per event, in order): `event_id`, and per kind
    K in (global, local): `K_points` list<int32> (points of each view), `K_coord` / `K_origin` list<float32> (x, y, z
    of every point of the event's views, view after view), `K_energy` list<float32>, `K_grid` list<int32>.
    `collate_view_table` packs it exactly as `collate_views` packs the views themselves."""
    rows = table_views(table, cfg, seed, epoch)
    cols: dict[str, pa.Array] = {"event_id": pa.array([r[0] for r in rows], pa.int64())}
    for kind, k in (("global", 1), ("local", 2)):
        per_event = [r[k] for r in rows]
        cols[f"{kind}_points"] = pa.array([[len(v.coord) for v in vs] for vs in per_event], pa.list_(pa.int32()))
        sizes = np.array([sum(len(v.coord) for v in vs) for vs in per_event], np.int64)
        for name, width, dtype in (*_VIEW_ARRAYS, ("grid_coord", 3, pa.int32())):
            parts = [getattr(v, name).reshape(-1) for vs in per_event for v in vs]
            flat = np.concatenate(parts) if parts else np.zeros(0, dtype.to_pandas_dtype())
            offsets = np.concatenate([[0], np.cumsum(sizes * width)]).astype(np.int32)
            col = "grid" if name == "grid_coord" else name
            cols[f"{kind}_{col}"] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, dtype))
        views = [v for vs in per_event for v in vs]
        if views and views[0].extra is not None:  # one more list<float32>, E values per point
            width = views[0].extra.shape[1]
            flat = np.concatenate([v.extra.reshape(-1) for v in views])
            offsets = np.concatenate([[0], np.cumsum(sizes * width)]).astype(np.int32)
            cols[f"{kind}_extra"] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, pa.float32()))
    return pa.table(cols)


def collate_view_table(table: pa.Table) -> dict:
    """The packed torch batch of `collate_views` from rows of a `views_table` (which may be slices or concatenations
    of several): identical tensors."""
    import torch

    from raysvc.data.contract.schema import _list_parts

    def values(col: str, width: int) -> np.ndarray:
        return _list_parts(table.column(col))[1].to_numpy(zero_copy_only=False).reshape(-1, width)

    def pack(kind: str) -> dict[str, torch.Tensor] | None:
        points = _list_parts(table.column(f"{kind}_points"))[1].to_numpy(zero_copy_only=False).astype(np.int64)
        if not len(points):
            return None
        coord = torch.from_numpy(values(f"{kind}_coord", 3).copy())
        energy = torch.from_numpy(values(f"{kind}_energy", 1).copy())
        extra = []
        if f"{kind}_extra" in table.column_names:
            flat = _list_parts(table.column(f"{kind}_extra"))[1].to_numpy(zero_copy_only=False)
            extra = [torch.from_numpy(flat.reshape(len(coord), -1).copy())]
        return {
            "feat": torch.cat([coord, energy, *extra], 1),
            "coord": coord,
            "origin": torch.from_numpy(values(f"{kind}_origin", 3).copy()),
            "grid_coord": torch.from_numpy(values(f"{kind}_grid", 3).astype(np.int64)),
            "offset": torch.from_numpy(np.cumsum(points)),
        }

    return {
        "event_id": torch.from_numpy(table.column("event_id").to_numpy().astype(np.int64)),
        "global": pack("global"),
        "local": pack("local"),
    }
