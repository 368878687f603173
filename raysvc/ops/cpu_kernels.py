"""Numba kernels behind the CPU path of the ops (serialization, FPS, radius search, kNN, C-NMS selection).

The torch code in the sibling modules stays the reference and the path for other devices; these loops do the same
arithmetic point by point, which on one CPU core is 5-20x faster than chains of whole-array torch ops. Every kernel
is compiled on first use and cached on disk (`cache=True`), and each is tested against the torch path and against
brute force. Conventions are those of the callers: distances compare squared, `<=` the squared radius; ties go to
the lower index.
"""

from __future__ import annotations

import numpy as np
from numba import njit

# ---- serialization -------------------------------------------------------------------------------------------


@njit(cache=True, inline="always")
def _spread3(v):
    v = (v | (v << 32)) & 0x1F00000000FFFF
    v = (v | (v << 16)) & 0x1F0000FF0000FF
    v = (v | (v << 8)) & 0x100F00F00F00F00F
    v = (v | (v << 4)) & 0x10C30C30C30C30C3
    return (v | (v << 2)) & 0x1249249249249249


@njit(cache=True)
def encode_z(c, depth, trans):
    """Morton codes of int64 (N, 3) coordinates (bit i of x, y, z -> 3i+2, 3i+1, 3i)."""
    n = c.shape[0]
    out = np.empty(n, np.int64)
    mask = (1 << depth) - 1
    ix, iy = (1, 0) if trans else (0, 1)
    for i in range(n):
        out[i] = (_spread3(c[i, ix] & mask) << 2) | (_spread3(c[i, iy] & mask) << 1) | _spread3(c[i, 2] & mask)
    return out


@njit(cache=True, inline="always")
def _skilling_step(x0, xd, b, lower):
    """Skilling's transform for axis d > 0 at bit b: where xd has the bit, invert x0's lower bits; else exchange the
    lower bits of x0 and xd. Returns the new (x0, xd)."""
    if (xd >> b) & 1:
        return x0 ^ lower, xd
    t = (x0 ^ xd) & lower
    return x0 ^ t, xd ^ t


@njit(cache=True)
def encode_hilbert(c, depth, trans):
    """Hilbert codes: Skilling's transform per point, interleave, Gray decode (same steps as serialization.py)."""
    n = c.shape[0]
    out = np.empty(n, np.int64)
    ix, iy = (1, 0) if trans else (0, 1)
    bits = 3 * depth
    for i in range(n):
        x0, x1, x2 = c[i, ix], c[i, iy], c[i, 2]
        for b in range(depth - 1, -1, -1):
            lower = (1 << b) - 1
            if (x0 >> b) & 1:  # d = 0 (exchanging x0 with itself would change nothing)
                x0 ^= lower
            x0, x1 = _skilling_step(x0, x1, b, lower)
            x0, x2 = _skilling_step(x0, x2, b, lower)
        g = (_spread3(x0) << 2) | (_spread3(x1) << 1) | _spread3(x2)
        shift = 1
        while shift < bits:
            g ^= g >> shift
            shift <<= 1
        out[i] = g
    return out


# ---- farthest point sampling ---------------------------------------------------------------------------------


@njit(cache=True)
def fps(points, k):
    """k farthest-point samples (local indices) of float64 (n, 3) points, starting at point 0, ties to the lower
    index."""
    n = points.shape[0]
    k = min(k, n)
    chosen = np.empty(k, np.int64)
    dist = np.full(n, np.inf)
    last = 0
    for s in range(k):
        chosen[s] = last
        px, py, pz = points[last, 0], points[last, 1], points[last, 2]
        best, arg = -1.0, 0
        for j in range(n):
            dx, dy, dz = points[j, 0] - px, points[j, 1] - py, points[j, 2] - pz
            d = dx * dx + dy * dy + dz * dz
            if d < dist[j]:
                dist[j] = d
            if dist[j] > best:
                best, arg = dist[j], j
        last = arg
    return chosen


# ---- radius search on a uniform grid -------------------------------------------------------------------------


@njit(cache=True)
def build_grid(ref, radius):
    """A dense cell table over ref's bounding box with cells of side h >= radius (enlarged when the box would need
    more than max(64 n, 65536) cells), so every point within `radius` of a query lies in the query's 27 cells.
    Returns (lo, h, dims, cell_start, order): points of cell c are order[cell_start[c]:cell_start[c + 1]]."""
    n = ref.shape[0]
    lo = np.zeros(3)
    ext = np.zeros(3)
    if n:
        for a in range(3):
            lo[a] = ref[:, a].min()
            ext[a] = ref[:, a].max() - lo[a]
    h = max(radius, 1e-9)
    limit = max(64 * n, 1 << 16)
    dims = np.empty(3, np.int64)
    while True:
        for a in range(3):
            dims[a] = int(ext[a] / h) + 1
        if dims[0] * dims[1] * dims[2] <= limit:
            break
        h *= 1.25
    cells = dims[0] * dims[1] * dims[2]
    cell = np.empty(n, np.int64)
    start = np.zeros(cells + 1, np.int64)
    for j in range(n):
        c0 = int((ref[j, 0] - lo[0]) / h)
        c1 = int((ref[j, 1] - lo[1]) / h)
        c2 = int((ref[j, 2] - lo[2]) / h)
        cell[j] = (c0 * dims[1] + c1) * dims[2] + c2
        start[cell[j] + 1] += 1
    for c in range(cells):
        start[c + 1] += start[c]
    fill = start[:-1].copy()
    order = np.empty(n, np.int64)
    for j in range(n):  # counting sort: within a cell, points stay in index order
        order[fill[cell[j]]] = j
        fill[cell[j]] += 1
    return lo, h, dims, start, order


@njit(cache=True)
def _neighbours(grid, ref, qx, qy, qz, r2, cap, out_idx, out_d2):
    """Write the ref points within sqrt(r2) of (qx, qy, qz) into the buffers (cell order); return how many. With
    cap > 0, stop at cap (enough for a capped count)."""
    lo, h, dims, start, order = grid
    c0 = int(np.floor((qx - lo[0]) / h))
    c1 = int(np.floor((qy - lo[1]) / h))
    c2 = int(np.floor((qz - lo[2]) / h))
    m = 0
    for a in range(max(c0 - 1, 0), min(c0 + 2, dims[0])):
        for b in range(max(c1 - 1, 0), min(c1 + 2, dims[1])):
            base = (a * dims[1] + b) * dims[2]
            lo_c, hi_c = max(c2 - 1, 0), min(c2 + 2, dims[2])
            if lo_c >= hi_c:
                continue
            for s in range(start[base + lo_c], start[base + hi_c]):  # the z-adjacent cells are contiguous
                j = order[s]
                dx, dy, dz = ref[j, 0] - qx, ref[j, 1] - qy, ref[j, 2] - qz
                d = dx * dx + dy * dy + dz * dz
                if d <= r2:
                    out_idx[m] = j
                    out_d2[m] = d
                    m += 1
                    if m == cap:
                        return m
    return m


@njit(cache=True)
def _nearest_first(idx, d2, m):
    """Positions 0..m-1 of the buffers ordered by (distance, index)."""
    by_index = np.argsort(idx[:m], kind="mergesort")
    by_dist = np.argsort(d2[:m][by_index], kind="mergesort")  # stable: equal distances keep index order
    return by_index[by_dist]


@njit(cache=True)
def ball_query(query, ref, radius, k):
    """(m, k) ref indices within `radius` of each query, nearest first (ties by index), -1 padded."""
    out = np.full((query.shape[0], k), -1, np.int64)
    if ref.shape[0] == 0:
        return out
    grid = build_grid(ref, radius)
    idx = np.empty(ref.shape[0], np.int64)
    d2 = np.empty(ref.shape[0])
    for i in range(query.shape[0]):
        m = _neighbours(grid, ref, query[i, 0], query[i, 1], query[i, 2], radius * radius, 0, idx, d2)
        order = _nearest_first(idx, d2, m)
        for s in range(min(k, m)):
            out[i, s] = idx[order[s]]
    return out


# ---- C-NMS ---------------------------------------------------------------------------------------------------


@njit(cache=True)
def cnms(points, radius, overlap, k, cap):
    """C-NMS on one event of float64 (n, 3) points: (centres, (G, k) groups). Centrality = number of points within
    2 r overlap (itself included) capped at `cap`; visit by descending centrality, ties by ascending index; a kept
    point suppresses its neighbours. Groups: the ball of radius r, nearest first (ties by index) when it has at most
    k points, else FPS from the centre over the ball's points in index order."""
    n = points.shape[0]
    r_sup = 2.0 * radius * overlap
    grid = build_grid(points, max(r_sup, radius))
    idx = np.empty(n, np.int64)
    d2 = np.empty(n)
    key = np.empty(n, np.int64)
    for i in range(n):  # capped counts stop scanning at the cap
        key[i] = cap - _neighbours(grid, points, points[i, 0], points[i, 1], points[i, 2], r_sup * r_sup, cap, idx, d2)
    order = np.argsort(key, kind="mergesort")
    suppressed = np.zeros(n, np.bool_)
    centers = np.empty(n, np.int64)
    g = 0
    for i in order:
        if suppressed[i]:
            continue
        centers[g] = i
        g += 1
        m = _neighbours(grid, points, points[i, 0], points[i, 1], points[i, 2], r_sup * r_sup, 0, idx, d2)
        for s in range(m):
            suppressed[idx[s]] = True
    centers = centers[:g]
    groups = np.full((g, k), -1, np.int64)
    for t in range(g):
        c = centers[t]
        m = _neighbours(grid, points, points[c, 0], points[c, 1], points[c, 2], radius * radius, 0, idx, d2)
        if m <= k:
            order_m = _nearest_first(idx, d2, m)
            for s in range(m):
                groups[t, s] = idx[order_m[s]]
            continue
        members = np.empty(m, np.int64)
        members[0] = c
        u = 1
        for j in np.sort(idx[:m]):
            if j != c:
                members[u] = j
                u += 1
        pick = fps(points[members], k)
        for s in range(k):
            groups[t, s] = members[pick[s]]
    return centers, groups


# ---- kNN -----------------------------------------------------------------------------------------------------


@njit(cache=True)
def knn(query, ref, k):
    """(m, k) indices and squared distances of the k nearest ref points, nearest first, ties by index, -1 / inf
    padded. Brute force with a bounded insertion list: exact, and O(n) per query once the list is full."""
    m, n = query.shape[0], ref.shape[0]
    out = np.full((m, k), -1, np.int64)
    dist = np.full((m, k), np.inf)
    for i in range(m):
        qx, qy, qz = query[i, 0], query[i, 1], query[i, 2]
        filled = 0
        for j in range(n):
            dx, dy, dz = ref[j, 0] - qx, ref[j, 1] - qy, ref[j, 2] - qz
            d = dx * dx + dy * dy + dz * dz
            if filled == k and d >= dist[i, k - 1]:
                continue  # ties with the worst kept lose to it: lower index first
            s = filled if filled < k else k - 1
            while s > 0 and dist[i, s - 1] > d:
                if s < k:
                    dist[i, s], out[i, s] = dist[i, s - 1], out[i, s - 1]
                s -= 1
            dist[i, s], out[i, s] = d, j
            if filled < k:
                filled += 1
    return out, dist


# ---- sparse conv kernel map ----------------------------------------------------------------------------------


@njit(cache=True)
def kernel_map(keys, bits):
    """(N, 27) index of the site at each 3x3x3 offset (x-major, then y, then z, each -1..1), -1 where empty. `keys`
    are ((b << bits | x) << bits | y) << bits | z with coordinates shifted by +1, so the three z-neighbours of a
    (dx, dy) column are consecutive keys: one binary search per column, 9 per site."""
    n = keys.shape[0]
    order = np.argsort(keys, kind="mergesort")
    skeys = keys[order]
    out = np.full((n, 27), -1, np.int64)
    for i in range(n):
        key = keys[i]
        for a in range(3):
            for b in range(3):
                col = key + ((a - 1) << (2 * bits)) + ((b - 1) << bits)
                p = np.searchsorted(skeys, col - 1)
                for c in range(3):
                    want = col + (c - 1)
                    while p < n and skeys[p] < want:
                        p += 1
                    if p < n and skeys[p] == want:
                        out[i, (a * 3 + b) * 3 + c] = order[p]
    return out
