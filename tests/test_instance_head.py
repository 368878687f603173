"""The instance head, its loss and its post-processing: the Hungarian match is the cheapest assignment (all
assignments enumerated), the focal and dice losses equal their closed forms, post-processing of hand-made logits gives
the instances worked out by hand, and head + loss + post-processing learn a small set of events to PQ ~ 1."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from raysvc.inference.instance_metrics import InstanceScores
from raysvc.inference.instances import PostprocessConfig, postprocess
from raysvc.models.mask_decoder import MaskDecoder, MaskDecoderConfig
from raysvc.train.instance_loss import (
    InstanceLossConfig,
    dice_loss,
    hungarian_match,
    instance_loss,
    instance_targets,
    sigmoid_focal,
)


def _pair_cost(cls_logits, mask_logits, classes, masks) -> list[list[float]]:
    """cost[query][target] from the definitions, one pair at a time."""
    out = []
    for a in range(len(cls_logits)):
        row = []
        for b in range(len(classes)):
            p = torch.softmax(cls_logits[a], 0)[classes[b]].item()
            bce = F.binary_cross_entropy_with_logits(mask_logits[a], masks[b]).item()
            s, m = torch.sigmoid(mask_logits[a]).numpy(), masks[b].numpy()
            dice = 1 - (2 * (s * m).sum() + 1) / (s.sum() + m.sum() + 1)
            row.append(-p + bce + dice)
        out.append(row)
    return out


def test_hungarian_match_is_the_cheapest_of_all_assignments():
    g = torch.Generator().manual_seed(0)
    cfg = InstanceLossConfig()
    for _ in range(5):
        cls_logits, mask_logits = torch.randn(5, 4, generator=g), torch.randn(5, 30, generator=g) * 3
        masks = (torch.rand(3, 30, generator=g) < 0.4).float()
        classes = torch.tensor([0, 2, 1])
        q, t = hungarian_match(cls_logits, mask_logits, classes, masks, cfg)

        cost = _pair_cost(cls_logits, mask_logits, classes, masks)
        best = min(sum(cost[a][b] for b, a in enumerate(perm)) for perm in itertools.permutations(range(5), 3))
        assert sorted(t.tolist()) == [0, 1, 2]
        assert sum(cost[a][b] for a, b in zip(q, t, strict=True)) == pytest.approx(best, abs=1e-5)


def test_focal_and_dice_losses_equal_their_closed_forms():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(3, 40, generator=g) * 2, (torch.rand(3, 40, generator=g) < 0.3).float()
    p, t = 1 / (1 + np.exp(-x.double().numpy())), y.double().numpy()
    pt = np.where(t == 1, p, 1 - p)
    alpha = np.where(t == 1, 0.25, 0.75)
    want = (-alpha * (1 - pt) ** 2 * np.log(pt)).mean(1)
    np.testing.assert_allclose(sigmoid_focal(x, y, 0.25, 2.0).numpy(), want, rtol=1e-5)
    dice = 1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)
    np.testing.assert_allclose(dice_loss(x, y).numpy(), dice, rtol=1e-5)


def test_instance_targets_group_points_by_id_and_take_their_class():
    masks, cls = instance_targets(torch.tensor([3, -1, 3, 7, 7, -1]), torch.tensor([1, -1, 1, 4, 4, -1]))
    assert masks.tolist() == [[1, 0, 1, 0, 0, 0], [0, 0, 0, 1, 1, 0]] and cls.tolist() == [1, 4]


def test_postprocess_of_hand_made_logits():
    big = 8.0
    cls = torch.tensor(
        [
            [big, 0, 0],  # q0: class 0, sure
            [big / 2, 0, 0],  # q1: class 0, less sure, same points as q0: suppressed by NMS
            [0, 0, big],  # q2: no object
            [0, big, 0],  # q3: class 1
        ]
    )
    mask = torch.full((4, 10), -big)
    mask[0, 0:5] = big
    mask[1, 0:5] = big
    mask[2, :] = big
    mask[3, 5:10] = big
    stuff = torch.full((10,), -big)
    stuff[9] = big  # the stuff head claims point 9
    out = postprocess(cls, mask, stuff, PostprocessConfig())
    assert out.instance.tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 1, -1]
    assert out.instance_class.tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 1, -1]
    assert out.classes == [0, 1] and out.points == [5, 4]
    assert out.confidence[0] == pytest.approx(
        torch.softmax(cls[0], 0)[0].item() * torch.sigmoid(torch.tensor(big)).item()
    )
    # min_points: an instance of 4 points goes when 5 are asked for
    out = postprocess(cls, mask, stuff, PostprocessConfig(min_points=5))
    assert out.classes == [0] and out.instance.tolist() == [0] * 5 + [-1] * 5


def _toy_events(g: torch.Generator, events: int = 3, n: int = 60, channels: int = 8):
    """Point features that carry their instance (a random signature per instance plus noise), 2-4 instances of
    classes 0 / 1 per event, the rest stuff."""
    feats, ids, classes, stuff, offset = [], [], [], [], []
    for _ in range(events):
        k = int(torch.randint(2, 5, (1,), generator=g))
        inst = torch.randint(-1, k, (n,), generator=g)
        sig = torch.randn(k + 1, channels, generator=g) * 2
        feats.append(sig[inst + 1] + 0.1 * torch.randn(n, channels, generator=g))
        cls_of = torch.randint(0, 2, (k,), generator=g)
        ids.append(inst)
        classes.append(torch.where(inst >= 0, cls_of[inst.clamp_min(0)], -1))
        stuff.append(inst < 0)
        offset.append(n * (len(offset) + 1))
    return torch.cat(feats), torch.cat(ids), torch.cat(classes), torch.cat(stuff), torch.tensor(offset)


def test_head_loss_and_postprocess_learn_a_small_set_to_full_panoptic_quality():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    feats, ids, classes, stuff, offset = _toy_events(g)
    head = MaskDecoder(8, 2, MaskDecoderConfig(width=32, heads=4, depth=2, queries=8))
    opt = torch.optim.AdamW(head.parameters(), lr=3e-3)
    cfg = InstanceLossConfig()
    losses = []
    for _ in range(250):
        out = instance_loss(head(feats, offset), ids, classes, stuff, offset, cfg)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(float(out["loss"].detach()))
    assert losses[-1] < losses[0] / 5
    head.eval()
    scores, start = InstanceScores(["a", "b"]), 0
    with torch.no_grad():
        for pred, end in zip(head(feats, offset), offset.tolist(), strict=True):
            last = pred["layers"][-1]
            got = postprocess(last["class"], last["mask"], pred["stuff"])
            scores.update(
                ids[start:end].numpy(), got.instance.numpy(), classes[start:end].numpy(), got.instance_class.numpy()
            )
            start = end
    r = scores.result()
    assert r["pq"] > 0.9 and r["ari"] > 0.9, r


def test_an_event_without_instances_still_gives_every_weight_a_gradient():
    # under DDP a weight without a gradient stops the step: the mask branch must stay in the graph
    torch.manual_seed(0)
    head = MaskDecoder(8, 2, MaskDecoderConfig(width=16, heads=2, depth=1, queries=4))
    offset = torch.tensor([20])
    none = torch.full((20,), -1)
    out = instance_loss(
        head(torch.randn(20, 8), offset), none, none, torch.ones(20, dtype=torch.bool), offset, InstanceLossConfig()
    )
    out["loss"].backward()
    assert [n for n, p in head.named_parameters() if p.grad is None] == []


def _particles_batch(rng, transforms=None):
    """A packed batch of 2 events with particle ids and truth, normalised coordinates (frame: center 10, scale 5)."""
    coord = torch.tensor(rng.uniform(-1, 1, (30, 3)), dtype=torch.float32)
    ids = torch.tensor(np.r_[np.repeat([0, 1, -1], [8, 6, 1]), np.repeat([4, 7], [9, 6])])
    parts = []
    for event_ids in ([0, 1], [4, 7]):
        parts.append(
            [
                {
                    "id": i,
                    "momentum": float(rng.uniform(10, 2000)),
                    "direction": _unit3(rng).tolist(),
                    "vertex": rng.uniform(0, 20, 3).tolist(),
                }
                for i in event_ids
            ]
        )
    parts[1][1]["momentum"] = float("nan")  # unknown truth
    return {"coord": coord, "particle": ids, "offset": torch.tensor([15, 30]), "particles": parts}


def _unit3(rng) -> np.ndarray:
    v = rng.normal(size=3)
    return v / np.linalg.norm(v)


def test_regression_targets_and_decoding_invert_each_other():
    from raysvc.inference.instances import EventInstances, decode_regression, regression_targets

    rng = np.random.default_rng(0)
    batch = _particles_batch(rng)
    names, frame = ["momentum", "direction", "vertex"], (10.0, 5.0)
    targets = regression_targets(batch, names, frame)
    coord = batch["coord"].numpy()
    for e, (start, end) in enumerate([(0, 15), (15, 30)]):
        for p in batch["particles"][e]:
            t = targets[e][p["id"]]
            mine = batch["particle"].numpy()[start:end] == p["id"]
            centroid = coord[start:end][mine].mean(0)
            want_log = np.log10(p["momentum"]) if np.isfinite(p["momentum"]) else np.nan
            np.testing.assert_allclose(t[0], want_log)
            np.testing.assert_allclose(t[1:4], p["direction"])
            np.testing.assert_allclose(t[4:7], (np.array(p["vertex"]) - 10.0) / 5.0 - centroid, rtol=1e-6)
        # the head outputting exactly the targets decodes back to the truth (vertex in voxel units)
        inst_ids = batch["particle"].numpy()[start:end]
        order = sorted(targets[e])
        relabel = np.array([order.index(i) if i >= 0 else -1 for i in inst_ids])
        raw = np.stack([targets[e][i] for i in order])
        inst = EventInstances(torch.from_numpy(relabel), torch.zeros(15), [0] * 2, [1.0] * 2, [1] * 2, [0, 1])
        got = decode_regression(raw, inst, coord[start:end], names, frame)
        for k, i in enumerate(order):
            p = next(q for q in batch["particles"][e] if q["id"] == i)
            np.testing.assert_allclose(got[k]["vertex"], p["vertex"], rtol=1e-5)
            np.testing.assert_allclose(got[k]["direction"], p["direction"], rtol=1e-6)
            if np.isfinite(p["momentum"]):
                assert got[k]["momentum"] == pytest.approx(p["momentum"], rel=1e-6)
    # an event's augmentation turns its direction and offset targets as it turns its points
    turn = torch.eye(3, dtype=torch.float64).repeat(2, 1, 1)
    turn[1] = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    turned = regression_targets(batch, names, frame, turn)
    for i in (4, 7):
        np.testing.assert_allclose(turned[1][i][1:4], turn[1].numpy() @ targets[1][i][1:4])
        np.testing.assert_allclose(turned[1][i][4:7], turn[1].numpy() @ targets[1][i][4:7])
    np.testing.assert_allclose(turned[0][0], targets[0][0])


def test_regression_loss_equals_its_closed_form_and_skips_unknown_targets():
    from raysvc.models.mask_decoder import regress_dims
    from raysvc.train.instance_loss import regression_loss

    dims = regress_dims(["momentum", "direction"])
    pred = torch.tensor([[2.0, 1.0, 0.0, 0.0], [1.0, 0.0, 2.0, 0.0]])
    target = torch.tensor([[2.5, 0.0, 1.0, 0.0], [float("nan"), 0.0, 1.0, 0.0]])
    # momentum: smooth L1 (beta 0.1) of |0.5| on the first row only = 0.5 - 0.05; direction: 1 - cos = 1 and 0
    assert float(regression_loss(pred, target, dims)) == pytest.approx(0.45 + 1.0 + 0.0)


def test_the_regression_head_learns_each_instance_s_values():
    from raysvc.models.mask_decoder import regress_dims

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    feats, ids, classes, stuff, offset = _toy_events(g)
    names = ["momentum", "direction"]
    rng = np.random.default_rng(0)
    targets, start = [], 0
    for end in offset.tolist():
        targets.append({int(i): np.r_[rng.uniform(1, 3), _unit3(rng)] for i in ids[start:end].unique() if i >= 0})
        start = end
    head = MaskDecoder(8, 2, MaskDecoderConfig(width=32, heads=4, depth=2, queries=8, regress=names))
    opt = torch.optim.AdamW(head.parameters(), lr=3e-3)
    dims = regress_dims(names)
    for _ in range(300):
        out = instance_loss(head(feats, offset), ids, classes, stuff, offset, InstanceLossConfig(), targets, dims)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    head.eval()
    errors, start = [], 0
    with torch.no_grad():
        for e, (pred, end) in enumerate(zip(head(feats, offset), offset.tolist(), strict=True)):
            last = pred["layers"][-1]
            got = postprocess(last["class"], last["mask"], pred["stuff"])
            true = ids[start:end].numpy()
            for k, q in enumerate(got.queries):  # each found instance: the true particle most of its points carry
                owner = np.bincount(true[(got.instance.numpy() == k) & (true >= 0)]).argmax()
                raw, want = last["regress"][q].numpy(), targets[e][int(owner)]
                cos = raw[1:4] @ want[1:4] / np.linalg.norm(raw[1:4])
                errors.append((abs(raw[0] - want[0]), cos))
            start = end
    errors = np.array(errors)
    assert len(errors) >= 8 and errors[:, 0].max() < 0.15 and errors[:, 1].min() > 0.95, errors
