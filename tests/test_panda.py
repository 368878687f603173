"""Panda's pieces on tiny inputs: Sinkhorn-Knopp (sums, and the all-reduced version equal to one process on all the
points), EMA, schedules, grid masks, matching vs brute force, layer-wise lr decay, collapse monitors, the mask
token, and the loss falling over a few steps on a fixed batch."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from raysvc.models.panda import (
    PandaConfig,
    PandaStudent,
    collapse_monitors,
    cosine,
    ema_update,
    grid_mask,
    make_teacher,
    match,
    panda_losses,
    sinkhorn_knopp,
    teacher_forward,
    warm,
)
from raysvc.models.ptv3 import preset
from raysvc.ops import packed
from raysvc.seaweed import free_port

TINY_HEAD = dict(head_hidden=64, head_embed=32, prototypes=48, match_radius=0.02)


def test_sinkhorn_rows_are_distributions_and_prototypes_share_the_mass():
    torch.manual_seed(0)
    scores = (
        torch.nn.functional.normalize(torch.randn(600, 32), dim=1)
        @ torch.nn.functional.normalize(torch.randn(40, 32), dim=1).t()
    )
    scores[:, :4] += 0.3  # a few prototypes attract most points: what Sinkhorn must undo
    q = sinkhorn_knopp(scores, temp=0.05, iters=3)
    assert torch.allclose(q.sum(1), torch.ones(600), atol=1e-5)  # each point: a distribution over prototypes
    assert (q >= 0).all()
    mass = q.sum(0)
    raw = torch.softmax(scores / 0.05, 1).sum(0)  # what a plain softmax would give each prototype
    assert (mass.max() - mass.min()) < 0.25 * (raw.max() - raw.min())  # much closer to the equal share
    assert abs(float(mass.mean()) - 600 / 40) < 1e-3
    q30 = sinkhorn_knopp(scores, temp=0.05, iters=30)
    assert torch.allclose(q30.sum(0), torch.full((40,), 600 / 40), rtol=1e-2)  # converges to equal shares


def _sinkhorn_rank(rank: int, port: int, scores: torch.Tensor, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    half = len(scores) // 2
    part = scores[:half] if rank == 0 else scores[half:]
    out[rank] = sinkhorn_knopp(part, 0.05, 3)
    dist.destroy_process_group()


def test_sinkhorn_all_reduced_over_two_workers_equals_one_process_on_all_points():
    torch.manual_seed(0)
    scores = torch.rand(300, 24) * 2 - 1
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_sinkhorn_rank, args=(free_port(), scores, out), nprocs=2, join=True)
        joined = torch.cat([out[0], out[1]])
    assert torch.allclose(joined, sinkhorn_knopp(scores, 0.05, 3), atol=1e-6)


def test_ema_update_is_the_convex_combination():
    s, t = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    before = [p.clone() for p in t.parameters()]
    ema_update(t, s, 0.9)
    for p_t, p_s, b in zip(t.parameters(), s.parameters(), before, strict=True):
        assert torch.allclose(p_t, 0.9 * b + 0.1 * p_s)
    frozen = [p.clone() for p in t.parameters()]
    ema_update(t, s, 1.0)  # momentum 1 at the end of the run: the teacher stops moving
    assert all(torch.equal(a, b) for a, b in zip(t.parameters(), frozen, strict=True))


def test_schedules_warm_then_hold_and_cosine_between_endpoints():
    assert warm(0, 1000, 0.5, 0.9, 0.05) == pytest.approx(0.5)
    assert warm(25, 1000, 0.5, 0.9, 0.05) == pytest.approx(0.7)
    assert warm(50, 1000, 0.5, 0.9, 0.05) == 0.9 and warm(999, 1000, 0.5, 0.9, 0.05) == 0.9
    vals = [warm(s, 1000, 0.5, 0.9, 0.05) for s in range(60)]
    assert all(a <= b for a, b in zip(vals, vals[1:], strict=False))
    assert cosine(0, 100, 0.994, 1.0) == pytest.approx(0.994) and cosine(99, 100, 0.994, 1.0) == pytest.approx(1.0)
    assert cosine(49, 99, 0.04, 0.2) == pytest.approx(0.12)


def test_grid_mask_masks_whole_cells_at_the_ratio():
    g = torch.Generator().manual_seed(0)
    coord = torch.rand(5000, 3)
    offset = torch.tensor([2000, 5000])
    mask = grid_mask(coord, offset, size=0.25, ratio=0.7, gen=g)
    batch = torch.repeat_interleave(torch.arange(2), torch.tensor([2000, 3000]))
    lo = torch.stack([coord[:2000].min(0).values, coord[2000:].min(0).values])
    cells = torch.floor((coord - lo[batch]) / 0.25).long()
    keys = batch * 1000 + cells[:, 0] * 100 + cells[:, 1] * 10 + cells[:, 2]
    uniq, inv = torch.unique(keys, return_inverse=True)
    per_cell = torch.zeros(len(uniq)).index_add_(0, inv, mask.float())
    count = torch.bincount(inv).float()
    assert torch.all((per_cell == 0) | (per_cell == count))  # a cell is masked whole or not at all
    assert int((per_cell > 0).sum()) == int(len(uniq) * 0.7)


def test_match_equals_brute_force_nearest_within_radius():
    rng = np.random.default_rng(1)
    q, r = rng.random((300, 3)), rng.random((250, 3))
    q_off, r_off = torch.tensor([100, 300]), torch.tensor([120, 250])
    rows, partner = match(torch.from_numpy(q), q_off, torch.from_numpy(r), r_off, 0.08)
    expect_rows, expect_partner = [], []
    for i in range(300):
        e = 0 if i < 100 else 1
        lo, hi = (0, 120) if e == 0 else (120, 250)
        d = np.linalg.norm(r[lo:hi] - q[i], axis=1)
        if d.min() < 0.08:
            expect_rows.append(i)
            expect_partner.append(lo + int(d.argmin()))
    assert rows.tolist() == expect_rows and partner.tolist() == expect_partner


def test_layer_decay_scales_lr_by_depth_and_spares_vectors_from_weight_decay():
    from raysvc.models.heads import SegModel
    from raysvc.train.optim import layer_id, param_groups

    student = PandaStudent(preset("tiny"), PandaConfig(**TINY_HEAD))
    depths = student.backbone.cfg.depths
    assert layer_id("backbone.embedding.stem.weight", depths) == 0
    assert layer_id("backbone.enc.0.blocks.0.attn.qkv.weight", depths) == 1
    assert layer_id("backbone.enc.1.down.proj.weight", depths) == 2
    assert layer_id("mask_head.mlp.0.weight", depths) == sum(depths) + 1
    groups = param_groups(student, depths, 1.0, 0.9, 0.05)
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in student.parameters() if p.requires_grad)
    by_param = {id(p): g for g in groups for p in g["params"]}
    named = dict(student.named_parameters())
    assert by_param[id(named["mask_head.mlp.0.weight"])]["lr"] == 1.0
    assert by_param[id(named["backbone.embedding.stem.weight"])]["lr"] == pytest.approx(0.9 ** (sum(depths) + 1))
    assert not by_param[id(named["backbone.embedding.norm.weight"])]["decay"]
    assert by_param[id(named["backbone.embedding.norm.weight"])]["weight_decay"] == 0.0
    assert by_param[id(named["backbone.enc.0.blocks.0.attn.qkv.weight"])]["decay"]
    # the fft protocol: encoder at lr x 0.05 x decay^depth, the decoder and head at lr
    seg = SegModel(preset("tiny"), 5, "dec")
    fft = {id(p): g["lr"] for g in param_groups(seg, depths, 1.0, 0.9, 0.05, backbone_scale=0.05) for p in g["params"]}
    seg_named = dict(seg.named_parameters())
    assert fft[id(seg_named["head.weight"])] == 1.0 and fft[id(seg_named["decoder.dec.0.up.proj.0.weight"])] == 1.0
    top = sum(depths) + 1
    assert fft[id(seg_named["backbone.enc.4.blocks.0.mlp.fc1.weight"])] == pytest.approx(0.05 * 0.9 ** (top - 5))


def test_collapse_monitors_tell_collapse_from_spread():
    k = 64
    collapsed = torch.zeros(1000, k)
    collapsed[:, 3] = 1
    spread = torch.eye(k).repeat(20, 1)
    c = collapse_monitors(collapsed, torch.ones(1000, 8))
    s = collapse_monitors(spread, torch.randn(1280, 8))
    assert c["proto_used_frac"] == 1 / k and c["proto_perplexity"] == pytest.approx(1.0) and c["feat_std"] < 1e-6
    assert s["proto_used_frac"] == 1.0 and s["proto_perplexity"] == pytest.approx(k, rel=1e-4) and s["feat_std"] > 0.1


@pytest.fixture(scope="module")
def view_batch(synthetic_dataset):
    from raysvc.data.streaming.reader import read_preprocessed
    from raysvc.data.streaming.shards import load_manifest
    from raysvc.data.streaming.transforms import PreprocessConfig
    from raysvc.data.streaming.views import ViewConfig, collate_views, table_views

    rec = load_manifest(synthetic_dataset).shards[0]
    table, _, _ = read_preprocessed(synthetic_dataset, rec, PreprocessConfig(), None, True)
    cfg = ViewConfig(grid=1 / 665.1, local_views=2, max_points=1500)
    return collate_views(table_views(table.slice(0, 2), cfg, seed=0, epoch=0))


def test_mask_token_replaces_masked_embeddings_and_learns(view_batch):
    torch.manual_seed(0)
    student = PandaStudent(preset("tiny", drop_path=0.0), PandaConfig(**TINY_HEAD)).eval()
    g = view_batch["global"]
    mask = torch.zeros(len(g["feat"]), dtype=torch.bool)
    mask[::3] = True
    a = student.encode(g, mask).feat
    b = student.encode(g).feat
    assert not torch.allclose(a, b)
    student.encode(g, mask).feat.sum().backward()
    assert student.mask_token.grad is not None and student.mask_token.grad.abs().sum() > 0


def test_panda_loss_falls_on_a_fixed_batch(view_batch):
    torch.manual_seed(0)
    bcfg = preset("tiny", drop_path=0.0)
    cfg = PandaConfig(**TINY_HEAD)
    student = PandaStudent(bcfg, cfg)
    teacher = make_teacher(student, bcfg)
    opt = torch.optim.AdamW(student.parameters(), lr=2e-3)
    g, loc = view_batch["global"], view_batch["local"]
    mask = grid_mask(g["coord"], g["offset"], 0.03, 0.5, torch.Generator().manual_seed(0))
    losses = []
    for _ in range(12):
        t_enc, t_sims = teacher_forward(teacher, g)
        out = panda_losses(student(g, mask, loc), t_enc, t_sims, cfg, 0.04, 2, 2)
        assert {"mask_loss", "roll_mask_loss", "unmask_loss"} <= set(out)
        assert out["mask_matched"] == 1.0  # the masked view and its teacher view share every cell
        assert 0 < out["unmask_matched"] <= 1 and 0 < out["roll_matched"] <= 1
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        ema_update(teacher, student, 0.99)
        losses.append(float(out["loss"]))
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-3:]) < 0.9 * np.mean(losses[:3]), losses


def test_centred_model_inputs_shift_each_event_to_its_mean(synthetic_dataset):
    from raysvc.data.streaming.config import DataConfig
    from raysvc.data.streaming.pipeline import DirectStream
    from raysvc.inference.featurize import model_inputs

    batch = next(DirectStream(DataConfig(uri=synthetic_dataset.uri)).iter_packed(3))
    cpu = torch.device("cpu")
    plain = model_inputs(batch, 384.0, 665.1, 1.0, cpu)
    centred = model_inputs(batch, 384.0, 665.1, 1.0, cpu, center_events=True)
    assert torch.equal(plain["grid_coord"], centred["grid_coord"]) and torch.equal(plain["offset"], centred["offset"])
    starts = [0, *plain["offset"][:-1].tolist()]
    for s, e in zip(starts, plain["offset"].tolist(), strict=True):
        mean = plain["coord"][s:e].double().mean(0)
        assert torch.allclose(centred["coord"][s:e].double(), plain["coord"][s:e].double() - mean, atol=1e-6)
        assert centred["coord"][s:e].double().mean(0).abs().max() < 1e-6
    assert torch.equal(centred["feat"][:, :3], centred["coord"])
    assert torch.equal(centred["feat"][:, 3], plain["feat"][:, 3])


def test_view_swap_equals_the_view_by_view_concatenation():
    from types import SimpleNamespace

    from raysvc.models.panda import _swap_views

    sizes = [3, 0, 5, 2, 4, 4, 1, 6]  # 4 events x 2 global views, one view empty
    offset = torch.cumsum(torch.tensor(sizes), 0)
    rows, offs = _swap_views(SimpleNamespace(offset=offset, feat=torch.zeros(sum(sizes), 1)), 2)
    starts = [0, *offset.tolist()[:-1]]
    swapped = [v ^ 1 for v in range(len(sizes))]  # view 0 <-> view 1 of each event
    assert rows.tolist() == [r for v in swapped for r in range(starts[v], starts[v] + sizes[v])]
    assert offs.tolist() == np.cumsum([sizes[v] for v in swapped]).tolist()
    assert packed._on_host[offs][1] == offs.tolist()  # what the view matching reads instead of the device


def test_principal_rows_are_the_first_global_view_of_each_event():
    from types import SimpleNamespace

    from raysvc.models.panda import principal_rows

    sizes = [3, 0, 5, 2, 0, 4, 1, 6, 2]  # 3 events x 3 global views, one principal view empty
    offset = torch.cumsum(torch.tensor(sizes), 0)
    starts = [0, *offset.tolist()[:-1]]
    got = principal_rows(SimpleNamespace(offset=offset, feat=torch.zeros(sum(sizes), 1)), 3)
    assert got.tolist() == [r for v in (0, 3, 6) for r in range(starts[v], starts[v] + sizes[v])]


def test_view_averaged_cross_entropy_skips_views_without_points():
    from raysvc.models.panda import _ce

    g = torch.Generator().manual_seed(0)
    sims, target = torch.randn(7, 5, generator=g), torch.softmax(torch.randn(7, 5, generator=g), 1)
    batch = torch.tensor([0, 0, 2, 2, 2, 3, 3])  # view 1 has no points
    per_point = -(target * torch.log_softmax(sims / 0.1, 1)).sum(1)
    want = torch.stack([per_point[batch == v].mean() for v in (0, 2, 3)]).mean()
    torch.testing.assert_close(_ce(target, sims, 0.1, batch, 4), want)
    empty = _ce(target[:0], sims[:0].requires_grad_(), 0.1, batch[:0], 4)
    assert empty.item() == 0 and empty.requires_grad


@pytest.mark.parametrize("device_path", [False, True])
def test_teacher_and_masked_student_sharing_the_grid_give_what_separate_passes_give(view_batch, device_path):
    """Kernel maps, orders, patches and pooling cells built by the teacher's pass and reused by the student's give
    the same features as each pass building its own (on the CPU path and on the device path), and are built once."""
    import contextlib
    import random

    from raysvc.models import ptv3
    from raysvc.ops.paths import device_path as replay

    torch.manual_seed(0)
    student = PandaStudent(preset("tiny", drop_path=0.0), PandaConfig(**TINY_HEAD)).eval()
    g = view_batch["global"]
    mask = torch.zeros(len(g["feat"]), dtype=torch.bool)
    mask[::3] = True
    jittered = dict(g, coord=g["coord"] + 0.01)  # a pass may move the points within their cells

    def passes(shared: dict | None) -> list[torch.Tensor]:
        random.seed(0)
        views = (dict(g, geometry=shared), dict(jittered, geometry=shared)) if shared is not None else (g, jittered)
        return [student.encode(views[0]).feat, student.encode(views[1], mask).feat, student.encode(views[1]).origin]

    pools = []
    real = ptv3.unique_cells

    def counting(*args):
        pools.append(1)
        return real(*args)

    with replay() if device_path else contextlib.nullcontext(), torch.no_grad():
        separate = passes(None)
        pools.clear()
        ptv3.unique_cells = counting
        try:
            shared = passes({})
        finally:
            ptv3.unique_cells = real
    for a, b in zip(separate, shared, strict=True):
        assert torch.equal(a, b)
    assert len(pools) == len(student.backbone.enc) - 1  # pooled once per level, not once per pass
    with pytest.raises(ValueError, match="another grid_coord"):
        geometry = {}
        student.encode(dict(g, geometry=geometry))
        student.encode(dict(g, grid_coord=g["grid_coord"].clone(), geometry=geometry))


def test_the_teachers_unmask_head_on_the_principal_rows_gives_the_losses_of_the_whole_view(view_batch):
    """`teacher_forward(..., n_global)` runs the unmask head on the principal views' rows only: those rows' sims and
    every loss equal the whole-view head's, bit for bit, and the monitors' mask sims stay whole."""
    import random

    torch.manual_seed(0)
    bcfg = preset("tiny", drop_path=0.0)
    cfg = PandaConfig(**TINY_HEAD)
    student = PandaStudent(bcfg, cfg)
    teacher = make_teacher(student, bcfg)
    g, loc = view_batch["global"], view_batch["local"]
    mask = grid_mask(g["coord"], g["offset"], 0.03, 0.5, torch.Generator().manual_seed(0))
    random.seed(0)  # each pass draws its order shuffle: the same draw for both
    t_enc, whole = teacher_forward(teacher, g)
    random.seed(0)
    _, part = teacher_forward(teacher, g, 2)
    rows = part["principal_rows"]
    assert 0 < len(rows) < len(t_enc.feat) and bool((t_enc.batch[rows] % 2 == 0).all())
    assert torch.equal(part["unmask"], whole["unmask"][rows]) and torch.equal(part["mask"], whole["mask"])
    random.seed(1)
    out = student(g, mask, loc)
    a, b = (panda_losses(out, t_enc, sims, cfg, 0.04, 2, 2) for sims in (whole, part))
    for key in ("loss", "mask_loss", "roll_mask_loss", "unmask_loss", "unmask_matched"):
        assert torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key])), key


def test_sinkhorn_in_place_equals_the_longhand_iteration():
    """The in-place iteration is the textbook one on fresh arrays, number for number."""
    torch.manual_seed(1)
    scores = (
        torch.nn.functional.normalize(torch.randn(300, 16), dim=1)
        @ torch.nn.functional.normalize(torch.randn(24, 16), dim=1).t()
    )
    q = torch.exp((scores - 1.0) / 0.05).t()
    k, n = q.shape[0], torch.tensor(float(q.shape[1]))
    q = q / q.sum()
    for _ in range(3):
        q = q / q.sum(dim=1, keepdim=True).clamp_min(1e-30) / k
        q = q / q.sum(dim=0, keepdim=True).clamp_min(1e-30) / n
    assert torch.equal(sinkhorn_knopp(scores, 0.05, 3), (q * n).t())
