"""Point-cloud ops against brute-force references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import raysvc.ops as ops
from raysvc.ops.grid import grid_sample
from raysvc.ops.neighbors import ball_query, fps, knn
from raysvc.ops.serialization import ORDERS, decode, encode, event_depths, serialize, serialize_by_event


# --- serialization --------------------------------------------------------------------------------------------
def z_reference(x: int, y: int, z: int, depth: int) -> int:
    """Bit by bit: bit i of x, y, z -> 3i+2, 3i+1, 3i (PTv3 / O-CNN convention)."""
    code = 0
    for i in range(depth):
        code |= ((x >> i) & 1) << (3 * i + 2) | ((y >> i) & 1) << (3 * i + 1) | ((z >> i) & 1) << (3 * i)
    return code


def hilbert_reference(p: list[int], depth: int) -> int:
    """Skilling (2004), 'AxestoTranspose' written with per-bit Python loops, then interleave and Gray-decode."""
    x = list(p)
    q = 1 << (depth - 1)
    while q > 1:  # inverse undo
        pm = q - 1
        for i in range(3):
            if x[i] & q:
                x[0] ^= pm
            else:
                t = (x[0] ^ x[i]) & pm
                x[0] ^= t
                x[i] ^= t
        q >>= 1
    bits = []
    for level in range(depth - 1, -1, -1):
        for i in range(3):
            bits.append((x[i] >> level) & 1)
    out, acc = 0, 0
    for b in bits:  # Gray -> binary: prefix XOR from the most significant bit
        acc ^= b
        out = (out << 1) | acc
    return out


@pytest.mark.parametrize("depth", [1, 3, 10, 16])
def test_z_and_hilbert_match_bitwise_references(depth):
    g = torch.randint(0, 1 << depth, (300, 3))
    z = encode(g, depth=depth, order="z")
    h = encode(g, depth=depth, order="hilbert")
    for i in range(len(g)):
        p = [int(v) for v in g[i]]
        assert int(z[i]) == z_reference(*p, depth)
        assert int(h[i]) == hilbert_reference(p, depth)
    zt = encode(g, depth=depth, order="z-trans")
    assert torch.equal(zt, encode(g[:, [1, 0, 2]], depth=depth, order="z"))


@pytest.mark.parametrize("order", ORDERS)
def test_decode_inverts_encode_with_batch(order):
    g = torch.randint(0, 1 << 16, (5000, 3))
    b = torch.randint(0, 1000, (5000,))
    grid, batch = decode(encode(g, b, 16, order), 16, order)
    assert torch.equal(grid, g) and torch.equal(batch, b)


def test_hilbert_is_a_continuous_curve_and_batches_never_interleave():
    ar = torch.arange(16)
    cube = torch.cartesian_prod(ar, ar, ar)
    for order in ("hilbert", "hilbert-trans"):
        code = encode(cube, depth=4, order=order)
        walk = cube[torch.argsort(code)]
        assert torch.equal(torch.sort(code).values, torch.arange(16**3))  # a bijection onto [0, 8^depth)
        assert (walk[1:] - walk[:-1]).abs().sum(1).max() == 1  # each step moves to a face neighbour
    b = torch.tensor([1] * 10 + [0] * 10)
    code, perm, inverse = serialize(torch.randint(0, 16, (20, 3)), b, 4, "z")
    assert (b[perm][:10] == 0).all() and torch.equal(perm[inverse], torch.arange(20))


@pytest.mark.parametrize("order", ORDERS)
def test_serialize_by_event_orders_each_event_as_alone(order):
    """Events of different extents in one batch: each is ordered exactly as on its own (PTv3's rule at its own
    depth), and the events stay in batch order. One batch-wide depth would reorder the small event's Hilbert curve."""

    def cells(n: int, side: int, seed: int) -> torch.Tensor:  # n distinct cells of a side^3 box (no code ties)
        idx = torch.randperm(side**3, generator=torch.Generator().manual_seed(seed))[:n]
        return torch.stack([idx // side**2, idx // side % side, idx % side], 1)

    small, large = cells(300, 20, 4), cells(400, 20, 5) * 35  # spread over [0, 665]
    grid, batch = torch.cat([small, large]), torch.tensor([0] * 300 + [1] * 400)
    assert event_depths(grid, batch) == [6, 11]
    _, perm, inverse = serialize_by_event(grid, batch, order)
    assert torch.equal(perm[:300], serialize(small, torch.zeros(300, dtype=torch.long), 6, order)[1])
    assert torch.equal(perm[300:] - 300, serialize(large, torch.zeros(400, dtype=torch.long), 11, order)[1])
    assert torch.equal(perm[inverse], torch.arange(700))
    if order.startswith("hilbert"):  # the batch-wide depth really differs for the small event
        assert not torch.equal(serialize(grid, batch, 11, order)[1][:300], perm[:300])


def test_encode_rejects_bad_input():
    with pytest.raises(ValueError, match="order"):
        encode(torch.zeros(2, 3), order="peano")
    with pytest.raises(ValueError, match=r"\[0, 2\^4\)"):
        encode(torch.tensor([[16, 0, 0]]), depth=4)


# --- grid sampling --------------------------------------------------------------------------------------------
def test_grid_sample_matches_dictionary_reference():
    rng = np.random.default_rng(0)
    coord = torch.from_numpy(rng.uniform(0, 5, (400, 3)))
    energy = torch.from_numpy(rng.uniform(0, 1, 400))
    offset = torch.tensor([150, 400])
    g = grid_sample(coord, offset, 0.7, energy)
    for ev, (a, b) in enumerate([(0, 150), (150, 400)]):
        cells: dict = {}
        lo = coord[a:b].min(0).values
        for i in range(a, b):
            key = tuple(int(v) for v in torch.floor((coord[i] - lo) / 0.7))
            cells.setdefault(key, []).append(i)
        s, e = (0 if ev == 0 else int(g.offset[0])), int(g.offset[ev])
        assert e - s == len(cells)
        for m in range(s, e):
            members = cells[tuple(g.grid_coord[m].tolist())]
            assert torch.allclose(g.coord[m], coord[members].mean(0))
            assert torch.isclose(g.feat_sum[m, 0], energy[members].sum())
            assert all(int(g.inverse[i]) == m for i in members)


# --- neighbours -----------------------------------------------------------------------------------------------
def _events(seed=0, sizes=(60, 1, 90)):
    rng = np.random.default_rng(seed)
    coord = torch.from_numpy(rng.integers(0, 12, (sum(sizes), 3)).astype(np.float64))  # ties on purpose
    return coord, torch.cumsum(torch.tensor(sizes), 0)


def test_knn_and_ball_query_match_brute_force():
    coord, offset = _events()
    idx, dist = knn(coord, offset, coord, offset, 5)
    balls = ball_query(coord, offset, coord, offset, 3.0, 7)
    bounds = [0, *offset.tolist()]
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        for i in range(a, b):
            d = ((coord[a:b] - coord[i]) ** 2).sum(1)
            ranked = sorted(range(b - a), key=lambda j: (float(d[j]), j))  # nearest first, ties by index
            want = [a + j for j in ranked[:5]] + [-1] * (5 - min(5, b - a))
            assert idx[i].tolist() == want
            inside = [a + j for j in ranked if float(d[j]) <= 9.0][:7]
            assert balls[i].tolist() == inside + [-1] * (7 - len(inside))
    assert torch.isinf(dist[60, 1:]).all()  # the 1-point event


def test_fps_matches_brute_force():
    coord, offset = _events(seed=3)
    idx, off = fps(coord, offset, torch.tensor([10, 4, 20]))
    assert off.tolist() == [10, 11, 31]
    for (a, b), (s, e) in zip([(0, 60), (60, 61), (61, 151)], [(0, 10), (10, 11), (11, 31)], strict=True):
        pts = coord[a:b]
        chosen = [0]
        while len(chosen) < e - s:
            d = torch.stack([((pts - pts[c]) ** 2).sum(1) for c in chosen]).min(0).values
            chosen.append(int(np.argmax(d.numpy())))  # first maximum
        assert (idx[s:e] - a).tolist() == chosen


# --- C-NMS ----------------------------------------------------------------------------------------------------
def cnms_brute_force(pts: np.ndarray, radius: float, overlap: float, max_points: int):
    n = len(pts)
    d = np.sqrt(((pts[:, None] - pts[None]) ** 2).sum(-1))
    r_sup = 2 * radius * overlap
    cent = [min(int((d[i] <= r_sup).sum()), max_points) for i in range(n)]
    order = sorted(range(n), key=lambda i: (-cent[i], i))
    alive, centers = [True] * n, []
    for i in order:
        if alive[i]:
            centers.append(i)
            for j in range(n):
                if d[i, j] <= r_sup:
                    alive[j] = False
    groups = []
    for c in centers:
        members = sorted((j for j in range(n) if d[c, j] <= radius), key=lambda j: (d[c, j], j))
        groups.append(members)
    return centers, groups


@pytest.mark.parametrize("overlap", [0.3, 0.73, 1.0])
def test_cnms_matches_brute_force(overlap):
    rng = np.random.default_rng(int(overlap * 100))
    sizes = (120, 5, 200)
    coord = torch.from_numpy(rng.uniform(0, 30, (sum(sizes), 3)))
    offset = torch.cumsum(torch.tensor(sizes), 0)
    res = ops.cnms(coord, offset, radius=4.0, overlap=overlap, max_points=32)
    bounds = [0, *offset.tolist()]
    starts = [0, *res.center_offset.tolist()]
    for e, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        centers, groups = cnms_brute_force(coord[a:b].numpy(), 4.0, overlap, 32)
        got = res.centers[starts[e] : starts[e + 1]] - a
        assert got.tolist() == centers
        for g, members in enumerate(groups):
            row = res.groups[starts[e] + g]
            real = (row[row >= 0] - a).tolist()
            if len(members) <= 32:
                assert real == members
            else:  # FPS down-sampling: 32 distinct members of the ball, the centre first
                assert len(set(real)) == 32 and set(real) <= set(members) and real[0] == centers[g]


def test_cnms_on_a_generated_event_and_coverage():
    from raysvc.data.sources.lartpc_generator import GeneratorConfig, generate_event

    ev = generate_event(GeneratorConfig(), 0, 1)
    coord = torch.from_numpy(ev["coord"])
    res = ops.cnms(coord, torch.tensor([len(coord)]), radius=5.0, overlap=0.73)
    cov = ops.coverage(len(coord), res.groups)
    counts = torch.bincount(res.groups[res.groups >= 0], minlength=len(coord))
    assert cov["missed_ratio"] == pytest.approx(float((counts == 0).float().mean()))
    assert cov["duplicated_ratio"] == pytest.approx(float((counts > 1).float().mean()))
    # centres are at least 2 * r * overlap apart: the defining property of the suppression
    c = coord[res.centers].double()
    d = torch.cdist(c, c) + torch.eye(len(c)) * 1e9
    assert d.min() > 2 * 5.0 * 0.73
    assert 0 < cov["missed_ratio"] < 0.5


# --- CPU kernels (numba) against the torch path used on other devices -------------------------------------------
def _generated_coords(n_events=3):
    from raysvc.data.sources.lartpc_generator import GeneratorConfig, generate_event

    evs = [generate_event(GeneratorConfig(), 7, i)["coord"] for i in range(n_events)]
    coord = torch.from_numpy(np.concatenate(evs).astype(np.float64))
    return coord, torch.cumsum(torch.tensor([len(e) for e in evs]), 0)


@pytest.mark.parametrize("order", ORDERS)
def test_cpu_encoders_match_torch_path(order):
    from raysvc.ops.serialization import _encode_torch

    for depth in (1, 5, 11, 16):
        g = torch.randint(0, 1 << depth, (5000, 3))
        g[:3] = torch.tensor([[0, 0, 0], [(1 << depth) - 1] * 3, [0, (1 << depth) - 1, 0]])  # corners
        assert torch.equal(encode(g, depth=depth, order=order), _encode_torch(g, depth, order))


@pytest.mark.parametrize("order", ORDERS)
def test_device_path_encoder_matches_the_reference_at_every_depth_and_mixed_depths(order):
    """The level-by-level state machine of the device path against the transform written out (`_encode_torch`), at
    one depth and with every point at its own depth in one call."""
    from raysvc.ops.serialization import _encode_levels, _encode_torch

    g = torch.Generator().manual_seed(1)
    for depth in (1, 2, 5, 11, 16):
        c = torch.randint(0, 1 << depth, (3000, 3), generator=g)
        c[:3] = torch.tensor([[0, 0, 0], [(1 << depth) - 1] * 3, [0, (1 << depth) - 1, 0]])  # corners
        assert torch.equal(_encode_levels(c, depth, depth, order), _encode_torch(c, depth, order))
        assert torch.equal(_encode_levels(c, depth, 16, order), _encode_torch(c, depth, order))  # levels unused
    depths = torch.randint(1, 13, (600,), generator=g)
    c = (torch.rand(600, 3, generator=g) * 2.0 ** depths[:, None]).long()
    want = torch.cat([_encode_torch(c[i : i + 1], int(depths[i]), order) for i in range(600)])
    assert torch.equal(_encode_levels(c, depths, 16, order), want)


@pytest.mark.parametrize("order", ORDERS)
def test_serialize_by_event_on_the_device_path_equals_the_cpu_path(order):
    """All events at their own depths in a fixed number of ops (no per-depth loop, no read-back of the depths)."""
    from raysvc.ops.paths import device_path
    from raysvc.ops.serialization import point_depths

    g = torch.Generator().manual_seed(2)
    sizes, tops = [300, 1, 400, 50], [40, 3, 1500, 9000]
    grid = torch.cat([torch.randint(0, t, (n, 3), generator=g) for n, t in zip(sizes, tops, strict=True)])
    batch = torch.repeat_interleave(torch.arange(4), torch.tensor(sizes))
    want = serialize_by_event(grid, batch, order)
    with device_path():
        assert point_depths(grid, batch).unique_consecutive().tolist() == event_depths(grid, batch)
        for got in (serialize_by_event(grid, batch, order), serialize_by_event(grid, batch, order, [7, 3, 12, 15])):
            for a, b in zip(got, want, strict=True):
                assert torch.equal(a, b)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("levels", [1, 2])
def test_pooled_cells_codes_from_their_points_equal_the_cells_encoded_afresh(order, levels):
    """A pooling's cell order, made from its points' codes (`coarsen_codes`), is the order `serialize_by_event`
    gives the cells themselves, event by event at each one's own depth: for events of any extent, one all at the
    origin, and on the device path too."""
    from raysvc.ops.packed import unique_cells
    from raysvc.ops.paths import device_path
    from raysvc.ops.serialization import coarsen_codes

    g = torch.Generator().manual_seed(3)
    sizes, tops = [300, 5, 400, 50, 7], [40, 1, 1500, 9000, 4]
    grid = torch.cat([torch.randint(0, t, (n, 3), generator=g) for n, t in zip(sizes, tops, strict=True)])
    batch = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    cell_batch, cells, inverse = unique_cells(batch, grid >> levels)
    for ctx in (torch.no_grad, device_path):
        with ctx():
            code = serialize_by_event(grid, batch, order)[0]
            got = coarsen_codes(code, inverse, len(cells), levels)
            want = serialize_by_event(cells, cell_batch, order)[0]
            assert torch.equal(got, want)


def test_cpu_neighbour_kernels_match_torch_path_on_generated_events():
    from raysvc.ops.neighbors import _ball_query_torch, _fps_torch, _knn_torch

    coord, offset = _generated_coords()  # integer voxel coordinates: many distance ties
    q_idx, q_off = fps(coord, offset, torch.tensor([50, 50, 50]))
    starts = [0, *offset.tolist()[:-1]]
    for e, (a, b) in enumerate(zip(starts, offset.tolist(), strict=True)):
        assert torch.equal(q_idx[50 * e : 50 * (e + 1)] - a, _fps_torch(coord[a:b], 50))
    query = coord[q_idx]
    for radius in (2.0, 5.0, 9.5):
        got = ball_query(query, q_off, coord, offset, radius, 32)
        assert torch.equal(got, _ball_query_torch(query, q_off, coord, offset, radius, 32))
        assert (got[:, 0] == q_idx).all()  # every query point is its own nearest member
    idx, dist = knn(query, q_off, coord, offset, 16)
    ref_idx, ref_dist = _knn_torch(query, q_off, coord, offset, 16)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(dist, ref_dist)


def test_ball_query_with_cells_enlarged_for_a_wide_sparse_event():
    """A small radius over a wide box: the grid caps its cell count by enlarging cells; results stay exact."""
    from raysvc.ops.neighbors import _ball_query_torch

    rng = np.random.default_rng(11)
    pts = rng.integers(0, 768, (300, 3)).astype(np.float64)
    pts[150:] = pts[:150] + rng.integers(-1, 2, (150, 3))  # near pairs, some at distance exactly 1
    coord, offset = torch.from_numpy(pts), torch.tensor([300])
    for radius in (0.5, 1.0, 1.8):
        got = ball_query(coord, offset, coord, offset, radius, 4)
        assert torch.equal(got, _ball_query_torch(coord, offset, coord, offset, radius, 4))
    assert (ball_query(coord, offset, coord, offset, 1.8, 4)[:, 1] >= 0).sum() >= 150


def test_device_range_checks_run_once_per_tensor_and_again_after_an_in_place_change(monkeypatch):
    from raysvc.ops import ranges

    calls = []
    real = torch._assert_async
    monkeypatch.setattr(torch, "_assert_async", lambda *a: calls.append(1) or real(*a))
    t = torch.tensor([0, 5, 9])
    ranges.assert_range_async(t, 0, 10, "out of range")
    ranges.assert_range_async(t, 0, 10, "out of range")
    ranges.assert_range_async(t, -1, 20, "out of range")  # implied by the range checked
    assert len(calls) == 1
    with pytest.raises(RuntimeError, match="out of range"):
        ranges.assert_range_async(t, 0, 8, "out of range")  # narrower: checked, and 9 fails
    t[0] = 30  # modified in place: checked again
    with pytest.raises(RuntimeError, match="out of range"):
        ranges.assert_range_async(t, 0, 10, "out of range")
    assert len(calls) == 3


def test_permute_rows_gives_indexing_values_and_gradients():
    from raysvc.ops.packed import permute_rows

    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(50, generator=g)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(50)
    x = torch.randn(50, 4, generator=g, requires_grad=True)
    w = torch.randn(50, 4, generator=g)
    got = permute_rows(x, perm, inverse)
    (got * w).sum().backward()
    got_grad, x.grad = x.grad, None
    want = x[perm]
    (want * w).sum().backward()
    assert torch.equal(got, want) and torch.equal(got_grad, x.grad)
