"""PoLAr-MAE's pieces against independent references: Chamfer vs a double loop, the mini-PointNets' padding and order
(in)variance, per-event masking, tokenization vs C-NMS itself (pads, sizes, the context cap, FPS seeds), token
targets, feature propagation vs numpy, the key-padding mask, and a tiny forward + backward (and a falling loss)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from raysvc.models.polarmae import (
    EnergyHead,
    MiniPointNet,
    PolarMAE,
    PolarMAEConfig,
    Tokens,
    chamfer_loss,
    interpolate_to_points,
    preset,
    random_mask,
    token_targets,
    tokenize,
)
from raysvc.ops.grouping import cnms
from raysvc.ops.neighbors import fps

R = 5.0  # the tests' ball radius, in the 100-unit cube's units


def _event(rng: np.random.Generator, tracks: int = 3, per_track: int = 90, noise: int = 30) -> np.ndarray:
    """Straight tracks with 0.5-unit jitter (groups of many points) plus uniform noise (groups of one point)."""
    pts = [rng.uniform(0, 100, (noise, 3))]
    for _ in range(tracks):
        start, d = rng.uniform(20, 80, 3), rng.normal(size=3)
        t = rng.uniform(0, rng.uniform(30, 60), per_track)
        pts.append(start + t[:, None] * d / np.linalg.norm(d) + rng.normal(0, 0.5, (per_track, 3)))
    return np.concatenate(pts)


def _batch(seed: int = 0, events: int = 2, **kw) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    evs = [_event(rng, **kw) for _ in range(events)]
    coord = torch.from_numpy(np.concatenate(evs)).float()
    energy = torch.from_numpy(rng.uniform(-1, 1, len(coord))).float()
    return coord, energy, torch.cumsum(torch.tensor([len(e) for e in evs]), 0)


def _cfg(**kw) -> PolarMAEConfig:
    return preset("tiny", radius=R, drop_path=0.0, **kw)


def _event_tokens(tokens: Tokens, b: int) -> Tokens:
    """Event b's tokens as a batch of one."""
    bounds = [0, *tokens.token_offset.tolist()]
    sl = slice(bounds[b], bounds[b + 1])
    n = torch.tensor([sl.stop - sl.start])
    return Tokens(tokens.centres[sl], n, tokens.groups[sl], tokens.sizes[sl], tokens.patches[sl], 0)


def test_presets_and_validation():
    base, tiny = preset("base"), preset("tiny")
    assert (base.width, base.depth, base.heads, base.decoder_depth, base.mask_ratio) == (384, 12, 6, 4, 0.6)
    assert (tiny.width, tiny.depth, tiny.decoder_depth) == (96, 4, 2)
    assert preset("tiny", energy_weight=0.0).energy_weight == 0.0
    with pytest.raises(ValueError, match="unknown model size"):
        preset("huge")
    with pytest.raises(ValueError, match="divisible"):
        PolarMAEConfig(width=100, heads=6)
    with pytest.raises(ValueError):
        PolarMAEConfig(nonsense=1)


def test_chamfer_matches_a_double_loop_and_ignores_predictions_past_the_group_size():
    rng = np.random.default_rng(0)
    m, p = 24, 8
    pred, target = rng.normal(size=(m, p, 3)), rng.normal(size=(m, p, 3))
    sizes = rng.integers(1, p + 1, m)
    sizes[:2] = (1, p)
    expect = []
    for g in range(m):
        n = sizes[g]
        d = [[float(((pred[g, i] - target[g, j]) ** 2).sum()) for j in range(n)] for i in range(n)]
        to_pred = sum(min(d[i][j] for i in range(n)) for j in range(n)) / n
        to_true = sum(min(d[i][j] for j in range(n)) for i in range(n)) / n
        expect.append(to_pred + to_true)
    pred_t = torch.from_numpy(pred).requires_grad_()
    got = chamfer_loss(pred_t, torch.from_numpy(target), torch.from_numpy(sizes))
    assert got.item() == pytest.approx(np.mean(expect), rel=1e-10)
    got.backward()
    unused = torch.arange(p)[None] >= torch.from_numpy(sizes)[:, None]
    assert torch.all(pred_t.grad[unused] == 0) and pred_t.grad[~unused].abs().sum() > 0


def _pad(points: torch.Tensor, extra: int) -> torch.Tensor:
    return torch.cat([points, points[:1].expand(extra, -1)])


def test_mini_pointnet_is_invariant_to_pads_and_point_order():
    torch.manual_seed(0)
    net = MiniPointNet(4, 64, 128, 96)
    real, other = torch.randn(7, 4), torch.randn(7, 4)
    ref = net(real[None])
    for extra in (5, 20):
        assert torch.allclose(net(_pad(real, extra)[None]), ref, atol=1e-5)
    perm = torch.tensor([3, 0, 6, 1, 5, 2, 4])
    assert torch.allclose(net(_pad(real[perm], 5)[None]), ref, atol=1e-5)
    # batched with another group: per-point norms, no batch statistics
    assert torch.allclose(net(torch.stack([_pad(real, 13), _pad(other, 13)]))[0], ref[0], atol=1e-5)
    assert (net(other[None]) - ref).abs().max() > 1e-3


def test_energy_head_knows_point_order_but_ignores_pads():
    torch.manual_seed(0)
    cfg = _cfg()
    head = EnergyHead(cfg)
    xyz, token = torch.randn(7, 3), torch.randn(1, cfg.decoder_width)

    def run(points: torch.Tensor, extra: int) -> torch.Tensor:
        return head(_pad(points, extra)[None], torch.tensor([7]), token)[0, :7]

    ref = run(xyz, 0)
    for extra in (5, 20):
        assert torch.allclose(run(xyz, extra), ref, atol=1e-5)
    perm = torch.tensor([3, 0, 6, 1, 5, 2, 4])
    # an invariant per-point net would give the same predictions, permuted
    assert (run(xyz[perm], 5) - ref[perm]).abs().max() > 1e-3


def test_random_mask_draws_the_rounded_ratio_per_event_uniformly_and_reproducibly():
    counts = [1, 2, 3, 5, 10, 37]
    offset = torch.cumsum(torch.tensor(counts), 0)
    bounds = [0, *offset.tolist()]
    for ratio in (0.6, 0.5, 0.9):
        mask = random_mask(offset, ratio, torch.Generator().manual_seed(0))
        assert mask.dtype == torch.bool and len(mask) == sum(counts)
        for n, a, b in zip(counts, bounds[:-1], bounds[1:], strict=True):
            assert int(mask[a:b].sum()) == min(math.floor(ratio * n + 0.5), n - 1)
    a = random_mask(offset, 0.6, torch.Generator().manual_seed(1))
    assert torch.equal(a, random_mask(offset, 0.6, torch.Generator().manual_seed(1)))
    assert not torch.equal(a, random_mask(offset, 0.6, torch.Generator().manual_seed(2)))
    g = torch.Generator().manual_seed(0)
    freq = torch.stack([random_mask(offset, 0.6, g)[-37:] for _ in range(300)]).float().mean(0)
    assert freq.min() > 0.45 and freq.max() < 0.75  # every token of the big event is masked ~60 % of the time


def test_token_targets_match_a_count_over_real_points():
    semantic = torch.tensor([0, 1, 1, 2, -1, 3, 2])
    groups = torch.tensor([[0, 1, 2, 0], [3, 0, 1, 5], [4, 4, 4, 4], [6, 5, 3, 6]])
    sizes = torch.tensor([3, 1, 1, 3])  # entries past a group's size are not its points, whatever they hold
    got = token_targets(groups, sizes, semantic, num_classes=4)
    expect = np.zeros((4, 4), bool)
    for t in range(4):
        for j in range(int(sizes[t])):
            c = int(semantic[groups[t, j]])
            if 0 <= c < 4:
                expect[t, c] = True
    assert got.dtype == torch.bool and np.array_equal(got.numpy(), expect)
    assert got.nonzero().tolist() == [[0, 0], [0, 1], [1, 2], [3, 2], [3, 3]]


def test_tokenize_keeps_cnms_groups_pads_with_the_first_point_and_builds_patches():
    coord, energy, offset = _batch(0)
    cfg = _cfg()
    tokens = tokenize(coord, energy, offset, cfg)
    ref = cnms(coord, offset, R, cfg.overlap, cfg.max_points)
    assert tokens.truncated == 0 and torch.equal(tokens.token_offset, ref.center_offset)
    assert torch.equal(tokens.centres, coord[ref.centers])
    real = ref.groups >= 0
    assert torch.equal(tokens.sizes, real.sum(1))
    assert torch.equal(tokens.groups[real], ref.groups[real])
    pads = ~real
    assert torch.equal(tokens.groups[pads], tokens.groups[:, :1].expand_as(pads)[pads])
    assert int(tokens.sizes.max()) == cfg.max_points and int(tokens.sizes.min()) == 1 and pads.any()
    point_event = (torch.arange(len(coord))[:, None] >= offset[None]).sum(1)
    assert torch.all(point_event[tokens.groups] == tokens.batch[:, None])
    rel = (coord[tokens.groups] - tokens.centres[:, None]) / R
    assert torch.allclose(tokens.patches[..., :3], rel) and torch.equal(tokens.patches[..., 3], energy[tokens.groups])
    assert tokens.patches[..., :3].norm(dim=-1).max() <= 1 + 1e-5


def test_tokenize_caps_the_context_at_the_first_centres_and_counts_truncated_events():
    coord, energy, offset = _batch(1, events=3)
    ref = cnms(coord, offset, R, 0.72, 32)
    counts = torch.diff(ref.center_offset, prepend=torch.zeros(1, dtype=torch.long))
    cap = int(counts.min()) + 1  # the smallest event fits, the others are cut
    tokens = tokenize(coord, energy, offset, _cfg(max_tokens=cap))
    assert tokens.truncated == int((counts > cap).sum()) >= 1
    assert torch.equal(tokens.token_offset, torch.cumsum(counts.clamp(max=cap), 0))
    starts = ref.center_offset - counts
    kept = torch.cat([ref.centers[s : s + min(int(c), cap)] for s, c in zip(starts, counts, strict=True)])
    assert torch.equal(tokens.centres, coord[kept])


def test_tokenize_with_fps_seeds_runs_cnms_among_seeds_then_balls_over_all_points():
    coord, energy, offset = _batch(2)
    cfg = _cfg(fps_seeds=40, max_points=16)
    tokens = tokenize(coord, energy, offset, cfg)
    seeds, _ = fps(coord, offset, torch.tensor([40, 40]))
    x = coord.double().numpy()
    bounds = [0, *offset.tolist()]
    for b in range(2):
        t = _event_tokens(tokens, b)
        pts = x[bounds[b] : bounds[b + 1]]
        seed_xyz = {tuple(p) for p in x[seeds[(seeds >= bounds[b]) & (seeds < bounds[b + 1])]]}
        assert all(tuple(c) in seed_xyz for c in t.centres.double().numpy())
        gap = np.linalg.norm(t.centres.double().numpy()[:, None] - t.centres.double().numpy()[None], axis=-1)
        assert gap[~np.eye(len(gap), dtype=bool)].min() > 2 * R * cfg.overlap - 1e-5  # C-NMS suppression
        for c, g, n in zip(t.centres.double().numpy(), t.groups.numpy(), t.sizes.tolist(), strict=True):
            inside = np.linalg.norm(pts - c, axis=1) <= R
            assert n == min(int(inside.sum()), cfg.max_points)
            assert np.all(np.linalg.norm(x[g[:n]] - c, axis=1) <= R + 1e-6)
            assert np.all(g >= bounds[b]) and np.all(g < bounds[b + 1]) and np.all(g[n:] == g[0])


def test_interpolate_to_points_matches_numpy_inverse_distance_weights():
    rng = np.random.default_rng(3)
    centres = rng.uniform(0, 10, (8, 3))
    points = rng.uniform(0, 10, (90, 3))
    feat = rng.normal(size=(8, 5))
    token_offset, offset = torch.tensor([6, 8]), torch.tensor([50, 90])  # event 1 has fewer tokens than k
    got = interpolate_to_points(
        torch.from_numpy(feat), torch.from_numpy(centres), token_offset, torch.from_numpy(points), offset, k=3
    )
    expect = np.zeros((90, 5))
    for i, p in enumerate(points):
        lo, hi = (0, 6) if i < 50 else (6, 8)
        d = np.linalg.norm(centres[lo:hi] - p, axis=1)
        near = np.argsort(d)[:3]
        w = 1 / (d[near] + 1e-8)
        expect[i] = (w[:, None] * feat[lo:hi][near]).sum(0) / w.sum()
    assert np.allclose(got.numpy(), expect, atol=1e-8)


@pytest.fixture(scope="module")
def batch_tokens():
    coord, energy, offset = _batch(0)
    return tokenize(coord, energy, offset, _cfg())


def test_encoder_on_visible_tokens_equals_each_event_alone(batch_tokens):
    torch.manual_seed(0)
    model = PolarMAE(_cfg()).eval()
    tokens = batch_tokens
    mask = random_mask(tokens.token_offset, 0.6, torch.Generator().manual_seed(0))
    visible = model.encoder(tokens, ~mask)
    assert visible.shape == (int((~mask).sum()), 96)
    rows = torch.nonzero(~mask).squeeze(1)
    bounds = [0, *tokens.token_offset.tolist()]
    for b in range(2):
        alone = _event_tokens(tokens, b)
        own = (rows >= bounds[b]) & (rows < bounds[b + 1])
        assert torch.allclose(model.encoder(alone, ~mask[bounds[b] : bounds[b + 1]]), visible[own], atol=1e-5)
    full = model.encoder.encode(tokens)
    assert full.shape == (len(tokens), 96) and torch.isfinite(full).all()


def test_tiny_forward_backward_gives_finite_losses_and_a_gradient_on_every_parameter(batch_tokens):
    torch.manual_seed(0)
    model = PolarMAE(_cfg()).train()
    heads = {}
    for name in ("point_head", "energy_head"):
        getattr(model, name).register_forward_hook(lambda m, i, o, name=name: heads.__setitem__(name, o.detach()))
    out = model(batch_tokens, torch.Generator().manual_seed(5))
    mask = out["mask"]
    assert torch.equal(mask, random_mask(batch_tokens.token_offset, 0.6, torch.Generator().manual_seed(5)))
    # the losses from the heads' outputs, per masked group in numpy
    true, sizes = batch_tokens.patches[mask].double().numpy(), batch_tokens.sizes[mask].tolist()
    pred = heads["point_head"].double().numpy().reshape(len(sizes), -1, 3)
    energy = heads["energy_head"].double().numpy()
    chamfer, sq_err = [], []
    for g, n in enumerate(sizes):
        d = ((pred[g, :n, None] - true[g, None, :n, :3]) ** 2).sum(-1)
        chamfer.append(d.min(0).mean() + d.min(1).mean())
        sq_err.extend((energy[g, :n, 0] - true[g, :n, 3]) ** 2)
    assert out["chamfer_loss"].item() == pytest.approx(np.mean(chamfer), rel=1e-5)
    assert out["energy_loss"].item() == pytest.approx(np.mean(sq_err), rel=1e-5)
    for k in ("loss", "chamfer_loss", "energy_loss"):
        assert torch.isfinite(out[k]) and out[k] > 0, k
    assert torch.allclose(out["loss"], out["chamfer_loss"] + out["energy_loss"])
    assert int(out["num_tokens"]) == len(batch_tokens) and int(out["truncated"]) == 0
    out["loss"].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_energy_weight_zero_removes_the_energy_branch(batch_tokens):
    torch.manual_seed(0)
    model = PolarMAE(_cfg(energy_weight=0.0)).train()
    assert model.energy_head is None and not any("energy" in n for n, _ in model.named_parameters())
    out = model(batch_tokens, torch.Generator().manual_seed(0))
    assert float(out["energy_loss"]) == 0 and torch.equal(out["loss"], out["chamfer_loss"])
    out["loss"].backward()
    assert all(p.grad is not None for p in model.parameters())


def test_loss_falls_on_a_fixed_batch(batch_tokens):
    torch.manual_seed(0)
    model = PolarMAE(_cfg()).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(15):
        out = model(batch_tokens, torch.Generator().manual_seed(0))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3])
