"""Farthest point sampling, kNN and ball query on packed batches; neighbours never cross events.

Exact per event. On CPU: numba kernels (`cpu_kernels`: FPS loop, a cell grid for ball query, a bounded insertion
list for kNN). On other devices: brute-force torch distances in chunks, which the CPU kernels are tested against.
Conventions:
FPS starts at each event's first point and breaks ties by the lowest index; kNN and ball query return neighbours
nearest first (ties by index), padded with -1; a point is inside a ball when its distance is <= radius.
"""

from __future__ import annotations

import numpy as np
import torch

from raysvc.ops import cpu_kernels
from raysvc.ops.packed import event_slices
from raysvc.ops.paths import cpu_path

CHUNK = 4096


def fps(coord: torch.Tensor, offset: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Farthest point sampling: `counts[b]` points from event b (all of them if it has fewer).
    Returns (global indices, cumulative sample counts)."""
    out, sizes = [], []
    for sl, k in zip(event_slices(offset), counts.tolist(), strict=True):
        idx = fps_event(coord[sl], k) + sl.start
        out.append(idx)
        sizes.append(len(idx))
    return (torch.cat(out) if out else coord.new_zeros(0, dtype=torch.long)), torch.cumsum(torch.tensor(sizes), 0)


def fps_event(points: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (local) of k farthest-point samples of one event, starting at point 0."""
    n = len(points)
    k = min(k, n)
    if points.device.type == "cpu":
        return torch.from_numpy(cpu_kernels.fps(_f64(points), k))
    return _fps_torch(points, k)


def _fps_torch(points: torch.Tensor, k: int) -> torch.Tensor:
    n = len(points)
    k = min(k, n)
    chosen = torch.empty(k, dtype=torch.long, device=points.device)
    if k == 0:
        return chosen
    dist = torch.full((n,), float("inf"), dtype=points.dtype, device=points.device)
    last = 0
    for i in range(k):
        chosen[i] = last
        dist = torch.minimum(dist, ((points - points[last]) ** 2).sum(1))
        last = int(torch.argmax(dist))
    return chosen


def _per_event_pairs(query: torch.Tensor, q_offset: torch.Tensor, ref: torch.Tensor, r_offset: torch.Tensor):
    """Per event and query chunk: (the event's ref slice, the chunk's first query row, squared distances)."""
    for qs, rs in zip(event_slices(q_offset), event_slices(r_offset), strict=True):
        for start in range(qs.start, qs.stop, CHUNK):
            q = query[start : min(start + CHUNK, qs.stop)]
            yield rs, start, torch.cdist(q.double(), ref[rs].double()) ** 2


def knn(
    query: torch.Tensor,
    q_offset: torch.Tensor,
    ref: torch.Tensor,
    r_offset: torch.Tensor,
    k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(idx (M, k) global ref indices, dist (M, k)) of the k nearest ref points of the same event."""
    if cpu_path(query):  # in the step (Panda's matching): `raysvc bench launches` must count the device path
        return _knn_cpu(query, q_offset, ref, r_offset, k)
    return _knn_torch(query, q_offset, ref, r_offset, k)


def _knn_torch(query, q_offset, ref, r_offset, k):
    idx = torch.full((len(query), k), -1, dtype=torch.long, device=query.device)
    dist = torch.full((len(query), k), float("inf"), dtype=query.dtype, device=query.device)
    for rs, start, d2 in _per_event_pairs(query, q_offset, ref, r_offset):
        kk = min(k, d2.shape[1])
        if kk == 0:
            continue
        order = _stable_smallest(d2, kk)
        rows = slice(start, start + len(d2))
        idx[rows, :kk] = order + rs.start
        dist[rows, :kk] = torch.gather(d2, 1, order).sqrt().to(query.dtype)
    return idx, dist


def ball_query(
    query: torch.Tensor,
    q_offset: torch.Tensor,
    ref: torch.Tensor,
    r_offset: torch.Tensor,
    radius: float,
    max_points: int,
) -> torch.Tensor:
    """(M, max_points) global indices of ref points within `radius`, nearest first, -1 padded."""
    if query.device.type == "cpu":
        return _ball_query_cpu(query, q_offset, ref, r_offset, radius, max_points)
    return _ball_query_torch(query, q_offset, ref, r_offset, radius, max_points)


def _ball_query_torch(query, q_offset, ref, r_offset, radius, max_points):
    idx = torch.full((len(query), max_points), -1, dtype=torch.long, device=query.device)
    for rs, start, d2 in _per_event_pairs(query, q_offset, ref, r_offset):
        kk = min(max_points, d2.shape[1])
        if kk == 0:
            continue
        order = _stable_smallest(d2, kk)
        inside = torch.gather(d2, 1, order) <= radius * radius
        idx[start : start + len(d2), :kk] = torch.where(inside, order + rs.start, -1)
    return idx


def _stable_smallest(d2: torch.Tensor, k: int) -> torch.Tensor:
    """Column indices of the k smallest values per row, ties broken by the lower index."""
    return torch.sort(d2, dim=1, stable=True).indices[:, :k]


def _f64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).contiguous().numpy()


def _knn_cpu(query, q_offset, ref, r_offset, k):
    q, r = _f64(query), _f64(ref)
    idx = np.full((len(q), k), -1, np.int64)
    d2 = np.full((len(q), k), np.inf)
    for qs, rs in zip(event_slices(q_offset), event_slices(r_offset), strict=True):
        i, d = cpu_kernels.knn(q[qs], r[rs], k)
        idx[qs] = np.where(i >= 0, i + rs.start, -1)
        d2[qs] = d
    return torch.from_numpy(idx), torch.from_numpy(np.sqrt(d2)).to(query.dtype)


def _ball_query_cpu(query, q_offset, ref, r_offset, radius, max_points):
    q, r = _f64(query), _f64(ref)
    idx = np.full((len(q), max_points), -1, np.int64)
    for qs, rs in zip(event_slices(q_offset), event_slices(r_offset), strict=True):
        rows = cpu_kernels.ball_query(q[qs], r[rs], float(radius), max_points)
        idx[qs] = np.where(rows >= 0, rows + rs.start, -1)
    return torch.from_numpy(idx)
