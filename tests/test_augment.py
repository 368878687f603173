"""Fine-tuning augmentation: per-event rigid rotations / mirrors about each event's centroid."""

from __future__ import annotations

import pytest
import torch

from raysvc.train.augment import AugmentConfig, augment_coords


def _events(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    counts = [30, 45, 25, 40]
    coord = torch.cat([torch.rand(n, 3, generator=g) * 0.3 + i for i, n in enumerate(counts)])
    return coord, torch.cumsum(torch.tensor(counts), 0)


def _slices(offset):
    start = 0
    for end in offset.tolist():
        yield slice(start, end)
        start = end


def _pairwise(x):
    return (x[:, None].double() - x[None].double()).norm(dim=-1)


def test_off_by_default_and_identity_at_zero():
    coord, offset = _events()
    assert not AugmentConfig().active
    assert torch.equal(augment_coords(coord, offset, AugmentConfig()), coord)


def test_rotations_are_rigid_per_event_about_the_event_centroid():
    coord, offset = _events()
    torch.manual_seed(3)
    out = augment_coords(coord, offset, AugmentConfig(rotate_p=1.0, flip_p=0.5))
    assert out.shape == coord.shape and out.dtype == coord.dtype
    moved = []
    for s in _slices(offset):
        torch.testing.assert_close(_pairwise(out[s]), _pairwise(coord[s]), atol=2e-6, rtol=0)  # rigid
        torch.testing.assert_close(out[s].mean(0), coord[s].mean(0), atol=2e-6, rtol=0)  # about its own centroid
        moved.append((out[s] - coord[s]).abs().max().item())
    assert min(moved) > 0.01  # every event was turned
    # each event has its own transform: the map fitted on event 0 does not carry event 1
    a, b = list(_slices(offset))[:2]
    ca, cb = coord[a] - coord[a].mean(0), coord[b] - coord[b].mean(0)
    m = torch.linalg.lstsq(ca.double(), (out[a] - out[a].mean(0)).double()).solution
    assert (cb.double() @ m - (out[b] - out[b].mean(0)).double()).abs().max() > 0.01


def test_mirrors_alone_negate_x_and_y_about_the_centroid():
    coord, offset = _events(1)
    out = augment_coords(coord, offset, AugmentConfig(rotate_p=0.0, flip_p=1.0))
    for s in _slices(offset):
        c = coord[s].mean(0)
        expect = torch.stack([2 * c[0] - coord[s, 0], 2 * c[1] - coord[s, 1], coord[s, 2]], 1)
        torch.testing.assert_close(out[s], expect, atol=2e-6, rtol=0)


def test_draws_follow_torch_seed():
    coord, offset = _events(2)
    cfg = AugmentConfig(rotate_p=0.8, flip_p=0.5)
    torch.manual_seed(7)
    a = augment_coords(coord, offset, cfg)
    torch.manual_seed(7)
    b = augment_coords(coord, offset, cfg)
    torch.manual_seed(8)
    c = augment_coords(coord, offset, cfg)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_config_is_validated_by_field():
    from pydantic import ValidationError

    from raysvc.train.tasks.segmentation import FinetuneConfig

    base = {"data": {"uri": "x"}, "val_data": {"uri": "y"}}
    cfg = FinetuneConfig.model_validate(base | {"train": {"augment": {"rotate_p": 0.8, "flip_p": 0.5}}})
    assert cfg.train.augment.active
    with pytest.raises(ValidationError, match="rotate_p"):
        FinetuneConfig.model_validate(base | {"train": {"augment": {"rotate_p": 1.5}}})
    with pytest.raises(ValidationError, match="scale"):
        FinetuneConfig.model_validate(base | {"train": {"augment": {"scale": 2}}})


def test_turns_about_the_tank_axis_keep_hits_on_the_tank():
    """pivot detector + rotations about z only: every point keeps its height and its distance from the axis through
    the detector's centre, while the event as a whole moves (a turn about its own centroid would take it off)."""
    g = torch.Generator().manual_seed(5)
    phi = torch.rand(120, generator=g) * 6.28
    centre = 1850.0
    coord = torch.stack([centre + 1690 * torch.cos(phi), centre + 1690 * torch.sin(phi), torch.rand(120) * 3000], 1)
    offset = torch.tensor([50, 120])
    torch.manual_seed(1)
    cfg = AugmentConfig(rotate_p=1.0, flip_p=0.5, rotate_axes=("z",), pivot="detector")
    out = augment_coords(coord, offset, cfg, centre)
    radius = lambda x: (x[:, :2].double() - centre).norm(dim=1)  # noqa: E731
    torch.testing.assert_close(radius(out), radius(coord), atol=1e-3, rtol=0)
    torch.testing.assert_close(out[:, 2], coord[:, 2])
    assert (out - coord).abs().max() > 10
    with pytest.raises(ValueError, match="needs the detector's centre"):
        augment_coords(coord, offset, cfg)
