"""Submanifold sparse conv against dense conv3d (forward and backward) with torch on 2 threads."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from raysvc.ops.sparse_conv import KernelPairs, NeighbourMap, SubMConv3d, kernel_map


@pytest.fixture(autouse=True)
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # the setting under which spconv's CPU build silently goes wrong
    yield
    torch.set_num_threads(before)


def _sparse_problem(seed: int, batch: int = 2, side: int = 10, density: float = 0.25, cin: int = 5):
    g = torch.Generator().manual_seed(seed)
    active = torch.rand(batch, side, side, side, generator=g) < density
    b, x, y, z = active.nonzero(as_tuple=True)
    perm = torch.randperm(len(b), generator=g)  # input order must not matter
    b, x, y, z = b[perm], x[perm], y[perm], z[perm]
    feat = torch.randn(len(b), cin, generator=g, dtype=torch.float64)
    return b, torch.stack([x, y, z], 1), feat, side


MAPS = {"gather": NeighbourMap.from_map, "pairs": KernelPairs.from_map, "raw table": lambda nbr: nbr}


@pytest.mark.parametrize("path", list(MAPS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_forward_and_backward_match_dense_conv3d(seed, path):
    b, grid, feat, side = _sparse_problem(seed)
    conv = SubMConv3d(5, 7).double()
    feat.requires_grad_(True)
    out = conv(feat, MAPS[path](kernel_map(grid, b)))
    upstream = torch.randn_like(out)
    (out * upstream).sum().backward()

    dense_in = torch.zeros(2, 5, side, side, side, dtype=torch.float64)
    dense_in[b, :, grid[:, 0], grid[:, 1], grid[:, 2]] = feat.detach()
    dense_in.requires_grad_(True)
    w = conv.weight.detach().clone().requires_grad_(True)
    dense_w = w.permute(0, 4, 1, 2, 3)  # (Cout, kx, ky, kz, Cin) -> (Cout, Cin, kx, ky, kz)
    dense_out = F.conv3d(dense_in, dense_w, conv.bias.detach(), padding=1)
    at_sites = dense_out[b, :, grid[:, 0], grid[:, 1], grid[:, 2]]
    torch.testing.assert_close(out, at_sites)
    (at_sites * upstream).sum().backward()
    torch.testing.assert_close(feat.grad, dense_in.grad[b, :, grid[:, 0], grid[:, 1], grid[:, 2]])
    torch.testing.assert_close(conv.weight.grad, w.grad)
    torch.testing.assert_close(conv.bias.grad, upstream.sum(0))


def test_kernel_map_never_crosses_events_and_finds_itself():
    grid = torch.tensor([[3, 3, 3], [3, 3, 4], [3, 3, 3]])
    batch = torch.tensor([0, 0, 1])
    nbr = kernel_map(grid, batch)
    assert nbr[:, 13].tolist() == [0, 1, 2]  # the centre offset is the site itself
    assert (nbr[0] >= 0).sum() == 2 and (nbr[2] >= 0).sum() == 1  # event 1's point sees only itself


def test_spconv_cpu_baseline_matches_dense_conv3d_on_one_thread():
    """The spconv path (spconv-cu120 on GPUs; the CPU build as the benchmark baseline) runs our weights unchanged."""
    from raysvc.ops import spconv_backend

    with pytest.raises(RuntimeError, match="races with 2 threads"):  # 2 threads: refused, never silently wrong
        with spconv_backend.cpu_baseline():
            pass
    torch.set_num_threads(1)
    b, grid, feat, side = _sparse_problem(5, cin=4)
    feat = feat.float().requires_grad_(True)
    conv = SubMConv3d(4, 6)
    with spconv_backend.cpu_baseline():
        out = spconv_backend.subm_conv3d(feat, grid, b, conv.weight, conv.bias)
        upstream = torch.randn_like(out)
        (out * upstream).sum().backward()
    dense_in = torch.zeros(2, 4, side, side, side)
    dense_in[b, :, grid[:, 0], grid[:, 1], grid[:, 2]] = feat.detach()
    dense_in.requires_grad_(True)
    w = conv.weight.detach().clone().requires_grad_(True)
    dense_out = F.conv3d(dense_in, w.permute(0, 4, 1, 2, 3), conv.bias.detach(), padding=1)
    at_sites = dense_out[b, :, grid[:, 0], grid[:, 1], grid[:, 2]]
    torch.testing.assert_close(out, at_sites, atol=1e-5, rtol=1e-5)
    (at_sites * upstream).sum().backward()
    torch.testing.assert_close(feat.grad, dense_in.grad[b, :, grid[:, 0], grid[:, 1], grid[:, 2]], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(conv.weight.grad, w.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("replay", [False, True], ids=["cpu-path", "device-path"])
def test_kernel_map_keeps_events_apart_at_any_batch_index(replay):
    """The same two sites in events 0, 8, 16, ..., 4,088 (the event index sits above the coordinates in one int64
    key: with too few bits for it, event 16's keys were event 0's and the two saw each other); and more events than
    the key holds are refused, not folded."""
    from raysvc.ops.paths import device_path
    from raysvc.ops.sparse_conv import MAX_EVENTS

    events = torch.arange(0, MAX_EVENTS, 8)
    grid = torch.tensor([[5, 5, 5], [5, 5, 6]]).repeat(len(events), 1)
    batch = events.repeat_interleave(2)
    with device_path() if replay else contextlib.nullcontext():
        nbr = kernel_map(grid, batch, MAX_EVENTS)
        with pytest.raises(ValueError, match="at most 4096 events"):
            kernel_map(grid, batch, MAX_EVENTS + 1)
    rows = torch.arange(len(grid))
    assert torch.equal(nbr[:, 13], rows)  # itself
    assert torch.equal(nbr[0::2, 14], rows[1::2]) and torch.equal(nbr[1::2, 12], rows[0::2])  # its event's other site
    assert int((nbr >= 0).sum()) == 2 * len(grid)  # and nothing else
    with pytest.raises(ValueError, match="at most 4096 events"):
        kernel_map(grid[:1], torch.tensor([MAX_EVENTS]))


@pytest.mark.parametrize("replay", [False, True], ids=["cpu-path", "device-path"])
def test_kernel_map_matches_a_dictionary_reference(replay):
    from raysvc.ops.paths import device_path

    b, grid, _, _ = _sparse_problem(9, batch=3, side=12, density=0.3)
    with device_path() if replay else contextlib.nullcontext():
        nbr = kernel_map(grid, b)
    where = {(int(bb), *map(int, g)): i for i, (bb, g) in enumerate(zip(b, grid, strict=True))}
    for i, (bb, g) in enumerate(zip(b.tolist(), grid.tolist(), strict=True)):
        want = [
            where.get((bb, g[0] + dx, g[1] + dy, g[2] + dz), -1)
            for dx in (-1, 0, 1)
            for dy in (-1, 0, 1)
            for dz in (-1, 0, 1)
        ]
        assert nbr[i].tolist() == want


def test_gather_path_is_a_fixed_number_of_ops_without_syncs_and_matches_the_per_offset_path():
    """A GPU step is launch-bound: forward + backward must not grow with the kernel offsets or the data."""
    from raysvc.bench.launches import LaunchCounter

    counts = []
    for seed, density in ((3, 0.1), (4, 0.4)):
        b, grid, feat, _ = _sparse_problem(seed, density=density)
        conv = SubMConv3d(5, 7).double()
        nmap, pairs = NeighbourMap.from_map(kernel_map(grid, b)), KernelPairs.from_map(kernel_map(grid, b))
        x = feat.requires_grad_(True)
        counter = LaunchCounter([conv, x])
        with counter:
            out = conv(x, nmap)
            out.sum().backward()
        counts.append(counter.summary())
        torch.testing.assert_close(out, conv(feat, pairs))
    # forward: pad, gather, addmm; backward: the same twice (input and weight gradients), the flipped kernel, the bias
    # gradient; the test's own sum and backward seed
    assert counts[0]["device_ops"] == counts[1]["device_ops"] <= 14
    assert counts[0]["syncs"] == counts[1]["syncs"] == 0


def test_gather_path_under_float32_matches_float64():
    b, grid, feat, _ = _sparse_problem(6, cin=8)
    conv = SubMConv3d(8, 12).double()
    nmap = NeighbourMap.from_map(kernel_map(grid, b))
    x64 = feat.clone().requires_grad_(True)
    x32 = feat.float().requires_grad_(True)
    conv32 = SubMConv3d(8, 12)
    conv32.load_state_dict({k: v.float() for k, v in conv.state_dict().items()})
    conv(x64, nmap).square().sum().backward()
    conv32(x32, nmap).square().sum().backward()
    torch.testing.assert_close(x32.grad, x64.grad.float(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(conv32.weight.grad, conv.weight.grad.float(), atol=1e-3, rtol=1e-4)
