"""PTv3 backbone and segmentation heads: shapes, parameter counts, and the invariances a point model must have."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from raysvc.models.heads import SegModel
from raysvc.models.ptv3 import PTv3, PTv3Config, count_parameters, preset, upcast
from raysvc.ops.packed import offset_to_batch
from raysvc.ops.serialization import event_depths


def _batch(sizes=(700, 300), seed=0):
    """Events of random-walk voxel tracks (connected, like LArTPC tracks) -> model inputs."""
    rng = np.random.default_rng(seed)
    evs = []
    for n in sizes:
        steps = rng.integers(-1, 2, (n * 2, 3))
        pts = np.unique(np.cumsum(steps, 0) + 200, axis=0)[:n]
        evs.append(pts)
    vox = torch.from_numpy(np.concatenate(evs)).long()
    offset = torch.cumsum(torch.tensor([len(e) for e in evs]), 0)
    b = offset_to_batch(offset)
    mins = torch.stack([vox[b == i].min(0).values for i in range(len(evs))])
    coord = (vox.double() - 384) / 665.1
    feat = torch.cat([coord, torch.from_numpy(rng.normal(size=(len(vox), 1)))], 1).float()
    return feat, coord.float(), vox - mins[b], offset


def test_parameter_counts_of_the_presets():
    base = count_parameters(PTv3(preset("base")))
    assert 89e6 < base < 92e6  # Panda-Base encoder: ~90 M (docs/methods.md, "Panda")
    assert count_parameters(PTv3(preset("tiny"))) < 5e6
    assert 10e6 < count_parameters(PTv3(preset("small"))) < base
    names = dict(PTv3(preset("base")).named_parameters())
    assert names["enc.3.blocks.8.cpe.conv.weight"].shape == (384, 3, 3, 3, 384)  # spconv layout
    assert names["enc.4.blocks.2.attn.qkv.weight"].shape == (3 * 512, 512)
    assert names["enc.1.down.proj.weight"].shape == (96, 48)


def test_bad_shapes_are_rejected_with_the_field():
    with pytest.raises(ValueError, match="divisible"):
        PTv3Config(**{**preset("tiny").model_dump(), "heads": (3, 2, 4, 8, 12)})
    with pytest.raises(ValueError, match="one entry per stage"):
        PTv3Config(depths=(1, 1))
    with pytest.raises(ValueError, match="unknown model size"):
        preset("huge")


def test_levels_shrink_and_upcast_concatenates_every_stage():
    torch.manual_seed(0)
    model = PTv3(preset("tiny")).eval()
    feat, coord, grid, offset = _batch()
    levels = model(feat, coord, grid, offset)
    sizes = [len(lv.feat) for lv in levels]
    assert sizes[0] == len(feat) and all(a > b for a, b in zip(sizes, sizes[1:], strict=False))
    for lv, c in zip(levels, preset("tiny").channels, strict=True):
        assert lv.feat.shape[1] == c and len(lv.offset) == 2
    up = upcast(levels)
    assert up.shape == (len(feat), sum(preset("tiny").channels))
    # a point's deepest features are those of the cell it pools into
    cell = levels[1].parent_inverse
    for s in range(2, len(levels)):
        cell = levels[s].parent_inverse[cell]
    torch.testing.assert_close(up[:, -preset("tiny").channels[-1] :], levels[-1].feat[cell])


@pytest.mark.parametrize("path", ["cpu", "device"])
def test_every_levels_orders_equal_its_cells_serialized_afresh(path):
    """Pooled levels take their orders from the level below's codes (`coarsen_codes`) instead of encoding their cells
    again: after a forward of a model with two orders per stage, each order of each level is the one
    `serialize_by_event` gives that level's own cells."""
    from raysvc.ops.paths import device_path
    from raysvc.ops.serialization import ORDERS, serialize_by_event

    torch.manual_seed(0)
    cfg = preset("tiny", depths=(2, 2, 2, 2, 2))
    model = PTv3(cfg).eval()
    feat, coord, grid, offset = _batch(sizes=(700, 40, 300))
    with torch.no_grad(), device_path() if path == "device" else contextlib.nullcontext():
        levels = model(feat, coord, grid, offset)
        checked = 0
        for level in levels:
            for key, (perm, inverse) in [(k, v) for k, v in level._cache.items() if k.startswith("order:")]:
                _, want, want_inverse = serialize_by_event(level.grid_coord, level.batch, key.split(":")[1])
                assert torch.equal(perm, want) and torch.equal(inverse, want_inverse), key
                checked += level is not levels[0]
        assert checked >= 2 * (len(levels) - 1)  # every pooled level, both of its orders
        for level in reversed(levels):  # coarsest first, as the decoder asks: orders no finer level has made yet
            for name in ORDERS:
                perm, inverse = level.order(name)
                _, want, want_inverse = serialize_by_event(level.grid_coord, level.batch, name)
                assert torch.equal(perm, want) and torch.equal(inverse, want_inverse), name
    assert levels[1]._cache["curves"]["from"] is not None  # pooled levels coarsen, not encode


@pytest.mark.parametrize("path", ["cpu", "device"])
def test_inference_mode_gives_the_no_grad_outputs(path):
    """Under torch.inference_mode (a user's predict loop) tensors carry no version counter, which the caches of
    checked ranges and host-read offsets key on: they must not fail there, and give what no_grad gives."""
    from raysvc.ops.paths import device_path

    torch.manual_seed(0)
    model = SegModel(preset("tiny"), 5, head="dec").eval()
    feat, coord, grid, offset = _batch(sizes=(300, 200))
    with device_path() if path == "device" else contextlib.nullcontext():
        with torch.no_grad():
            want = model(feat, coord, grid, offset)
        with torch.inference_mode():
            got = model(feat, coord, grid, offset)
    assert torch.equal(got, want)


@pytest.mark.parametrize("head", ["lin", "dec"])
def test_outputs_follow_a_permutation_of_the_input_points(head):
    """Serialization sorts points, so the input order must not matter (checks every inverse map)."""
    torch.manual_seed(1)
    model = SegModel(preset("tiny"), 5, head).eval()
    feat, coord, grid, offset = _batch()
    out = model(feat, coord, grid, offset)
    perm = torch.cat([torch.randperm(700), 700 + torch.randperm(300)])
    out_p = model(feat[perm], coord[perm], grid[perm], offset)
    torch.testing.assert_close(out_p, out[perm], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("head", ["lin", "dec"])
def test_events_in_a_batch_do_not_see_each_other(head):
    """Each event gets the same answer alone as in a batch, also when the events differ in extent: the
    serialization depth is per event (a batch-wide depth bends the smaller event's Hilbert curve)."""
    torch.manual_seed(2)
    model = SegModel(preset("tiny"), 5, head).eval()
    feat, coord, grid, offset = _batch()
    grid = grid.clone()
    grid[700:] *= 8  # the second event now spans more bits than the first
    depths = event_depths(grid, offset_to_batch(offset))
    assert depths[1] > depths[0]
    together = model(feat, coord, grid, offset)
    for lo, hi in ((0, 700), (700, 1000)):
        alone = model(feat[lo:hi], coord[lo:hi], grid[lo:hi], torch.tensor([hi - lo]))
        torch.testing.assert_close(together[lo:hi], alone, atol=1e-4, rtol=1e-4)


def test_training_mode_drops_paths_and_backward_reaches_every_trainable_parameter():
    torch.manual_seed(3)
    model = SegModel(preset("tiny", drop_path=0.0), 5, "dec").train()
    feat, coord, grid, offset = _batch()
    model(feat, coord, grid, offset).logsumexp(1).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing
    model.freeze_backbone()
    assert all(not p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.decoder.parameters())


def test_the_device_path_gives_the_cpu_paths_outputs_and_gradients():
    """The gather-GEMM convolution and the whole-array serialization (what a GPU runs; here on CPU tensors) against
    the per-offset convolution and the numba serialization, on the same weights, batch and orders."""
    from raysvc.ops.paths import device_path

    torch.manual_seed(2)
    model = SegModel(preset("tiny", shuffle_orders=False), 5, "dec").train()
    feat, coord, grid, offset = _batch()
    got = []
    for ctx in (contextlib.nullcontext, device_path):
        torch.manual_seed(3)  # the same drop-path draws
        model.zero_grad()
        with ctx():
            out = model(feat, coord, grid, offset)
            out.square().mean().backward()
        got.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(got[1][0], got[0][0], atol=1e-5, rtol=1e-4)
    for a, b in zip(got[1][1], got[0][1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-3)
