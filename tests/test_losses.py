"""Lovasz-Softmax against a brute-force Jaccard loss and finite differences; class weights; SegLoss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from raysvc.train.losses import SegLoss, class_weights, lovasz_softmax


def brute_jaccard_loss(pred: list[int], labels: list[int], classes: list[int]) -> float:
    """Mean over `classes` of 1 - |P_c & Y_c| / |P_c | Y_c|, counted point by point (0 when both sets are empty)."""
    losses = []
    for c in classes:
        p_set = {i for i, v in enumerate(pred) if v == c}
        y_set = {i for i, v in enumerate(labels) if v == c}
        union = p_set | y_set
        losses.append(1.0 - len(p_set & y_set) / len(union) if union else 0.0)
    return sum(losses) / len(losses)


@pytest.mark.parametrize("seed", range(8))
def test_lovasz_equals_jaccard_loss_for_hard_predictions(seed):
    rng = np.random.default_rng(seed)
    n, c = int(rng.integers(1, 60)), 5
    labels = rng.integers(0, c - 1, n)  # class 4 never in the labels
    labels[rng.random(n) < 0.15] = -1
    pred = np.where(rng.random(n) < 0.5, labels, rng.integers(0, c, n))  # class 4 sometimes predicted
    pred = np.where(labels == -1, rng.integers(0, c, n), pred)
    probs = F.one_hot(torch.from_numpy(pred), c).double()
    lab = torch.from_numpy(labels)

    keep = labels != -1
    kept_pred, kept_labels = pred[keep].tolist(), labels[keep].tolist()
    present = sorted(set(kept_labels))
    got = lovasz_softmax(probs, lab)
    if present:
        assert got.item() == pytest.approx(brute_jaccard_loss(kept_pred, kept_labels, present), abs=1e-12)
    else:
        assert got.item() == 0.0
    got_all = lovasz_softmax(probs, lab, classes="all")
    assert got_all.item() == pytest.approx(brute_jaccard_loss(kept_pred, kept_labels, list(range(c))), abs=1e-12)
    got_some = lovasz_softmax(probs, lab, classes=[1, 4])
    assert got_some.item() == pytest.approx(brute_jaccard_loss(kept_pred, kept_labels, [1, 4]), abs=1e-12)


def test_lovasz_exact_for_low_precision_inputs():
    """bf16 counts stop at 256; the loss must still be the exact Jaccard loss on thousands of points."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 3000)
    pred = np.where(rng.random(3000) < 0.7, labels, rng.integers(0, 3, 3000))
    probs = F.one_hot(torch.from_numpy(pred), 3).to(torch.bfloat16)
    got = lovasz_softmax(probs, torch.from_numpy(labels))
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(brute_jaccard_loss(pred.tolist(), labels.tolist(), [0, 1, 2]), abs=1e-6)

    logits = torch.from_numpy(rng.normal(size=(3000, 3))).float()
    weights = class_weights([1, 2, 3])
    got = SegLoss(weights)(logits.bfloat16(), torch.from_numpy(labels))
    expected = F.cross_entropy(logits.bfloat16().float(), torch.from_numpy(labels), weight=weights)
    torch.testing.assert_close(got, expected)


def test_lovasz_zero_only_for_perfect_predictions():
    labels = torch.tensor([0, 1, 1, 2, 2, 2, -1])
    perfect = F.one_hot(labels.clamp(min=0), 4).float()
    perfect[-1] = torch.tensor([0.0, 0.0, 0.0, 1.0])  # the ignored point may predict anything
    assert lovasz_softmax(perfect, labels).item() == 0.0
    assert lovasz_softmax(perfect, labels, classes="all").item() == 0.0

    one_wrong = perfect.clone()
    one_wrong[0] = torch.tensor([0.0, 1.0, 0.0, 0.0])
    assert lovasz_softmax(one_wrong, labels).item() > 0.0

    # Right argmax everywhere but not confident: still penalised, less than when hard-wrong.
    soft = 0.7 * perfect + 0.3 / 4
    assert 0.0 < lovasz_softmax(soft, labels).item() < lovasz_softmax(one_wrong, labels).item()

    # Ignored / empty inputs give 0 that is still differentiable.
    empty = torch.rand(3, 4, requires_grad=True)
    loss = lovasz_softmax(empty, torch.full((3,), -1))
    assert loss.item() == 0.0
    loss.backward()
    assert empty.grad is not None and torch.all(empty.grad == 0)


@pytest.mark.parametrize("seed", range(4))
def test_lovasz_gradient_matches_finite_differences(seed):
    gen = torch.Generator().manual_seed(seed)
    n, c = 7, 3
    labels = torch.randint(0, c, (n,), generator=gen)
    labels[0] = -1
    probs = torch.rand(n, c, generator=gen, dtype=torch.float64).requires_grad_(True)
    # Piecewise linear: finite differences are exact away from ties in the sorted errors (probability 0 here).
    assert torch.autograd.gradcheck(lambda p: lovasz_softmax(p, labels), (probs,), eps=1e-7, atol=1e-8)

    # Same through a softmax, with an explicit central difference on every logit.
    logits = torch.randn(n, c, generator=gen, dtype=torch.float64, requires_grad=True)
    f = lambda z: lovasz_softmax(torch.softmax(z, dim=1), labels, classes="all")  # noqa: E731
    (grad,) = torch.autograd.grad(f(logits), logits)
    fd = torch.zeros_like(logits)
    h = 1e-7
    with torch.no_grad():
        for idx in np.ndindex(n, c):
            z = logits.detach().clone()
            z[idx] += h
            up = f(z)
            z[idx] -= 2 * h
            fd[idx] = (up - f(z)) / (2 * h)
    assert fd.abs().max() > 1e-3  # not trivially zero
    torch.testing.assert_close(grad, fd, atol=1e-6, rtol=1e-5)
    assert grad[0].abs().max() == 0.0  # the ignored point gets no gradient


def test_class_weights_known_counts():
    w = class_weights([100, 300, 0, 600])
    assert w.dtype == torch.float32
    torch.testing.assert_close(w, torch.tensor([2.0, 2.0 / 3.0, 0.0, 1.0 / 3.0]))  # 1/n scaled by 3 / 0.015 = 200

    w_sqrt = class_weights(np.array([100, 400, 0, 2500]), power=0.5)
    inv = np.array([1 / 10, 1 / 20, 1 / 50])
    expected = inv * 3 / inv.sum()
    torch.testing.assert_close(w_sqrt, torch.tensor([expected[0], expected[1], 0.0, expected[2]], dtype=torch.float32))
    assert w_sqrt[w_sqrt > 0].mean().item() == pytest.approx(1.0)

    torch.testing.assert_close(class_weights(torch.tensor([5, 7, 0]), power=0.0), torch.tensor([1.0, 1.0, 0.0]))
    with pytest.raises(ValueError):
        class_weights([0, 0])
    with pytest.raises(ValueError):
        class_weights([3, -1])


def test_segloss_without_lovasz_is_weighted_cross_entropy():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 5, generator=gen)
    labels = torch.randint(0, 5, (50,), generator=gen)
    labels[:6] = -1
    weights = class_weights([10, 200, 30, 5, 1000])
    got = SegLoss(weights)(logits, labels)
    expected = F.cross_entropy(logits, labels, weight=weights, ignore_index=-1)
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(expected, F.cross_entropy(logits, labels, ignore_index=-1))  # weights matter here
    torch.testing.assert_close(SegLoss()(logits, labels), F.cross_entropy(logits, labels, ignore_index=-1))

    with_lovasz = SegLoss(weights, lovasz_weight=0.5)(logits, labels)
    torch.testing.assert_close(with_lovasz, expected + 0.5 * lovasz_softmax(torch.softmax(logits, 1), labels))

    # All points ignored: 0, not NaN (F.cross_entropy would give NaN).
    assert SegLoss(weights, lovasz_weight=1.0)(logits, torch.full((50,), -1)).item() == 0.0
    # The weights travel with the module.
    assert "weights" in SegLoss(weights).state_dict()


def test_segloss_trains_a_linear_model():
    gen = torch.Generator().manual_seed(0)
    c, d, n = 5, 8, 400
    centers = torch.randn(c, d, generator=gen) * 2
    labels = torch.randint(0, c, (n,), generator=gen)
    x = centers[labels] + torch.randn(n, d, generator=gen)
    labels[:20] = -1
    torch.manual_seed(0)
    model = torch.nn.Linear(d, c)
    counts = torch.bincount(labels[labels >= 0], minlength=c)
    criterion = SegLoss(class_weights(counts), lovasz_weight=1.0)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = criterion(model(x), labels)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert all(np.isfinite(losses))
    with torch.no_grad():
        final_lovasz = lovasz_softmax(torch.softmax(model(x), 1), labels).item()
        initial = lovasz_softmax(torch.softmax(torch.nn.Linear(d, c)(x), 1), labels).item()
    assert final_lovasz < initial


def test_focal_loss_against_a_per_point_reference():
    """SegLoss(focal_gamma=g) = sum_i w_yi (1 - p_i)^g (-log p_i) / sum_i w_yi over valid points, written out in
    float64 numpy; g = 0 is the weighted cross entropy."""
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(60, 4, generator=gen) * 3
    labels = torch.randint(0, 4, (60,), generator=gen)
    labels[::7] = -1
    weights = class_weights([400, 300, 20, 8], 0.5)

    def reference(gamma: float) -> float:
        x, y, w = logits.double().numpy(), labels.numpy(), weights.double().numpy()
        num = den = 0.0
        for row, label in zip(x, y, strict=True):
            if label < 0:
                continue
            p = np.exp(row - row.max()) / np.exp(row - row.max()).sum()
            num += w[label] * (1 - p[label]) ** gamma * -np.log(p[label])
            den += w[label]
        return num / den

    for gamma in (0.0, 0.5, 2.0):
        got = SegLoss(weights, focal_gamma=gamma)(logits, labels).item()
        assert got == pytest.approx(reference(gamma), rel=1e-5)
    torch.testing.assert_close(SegLoss(weights, focal_gamma=0.0)(logits, labels), SegLoss(weights)(logits, labels))
    assert SegLoss(weights, focal_gamma=2.0)(logits, labels) < SegLoss(weights)(logits, labels)  # easy points fade
    with pytest.raises(ValueError, match="focal_gamma"):
        SegLoss(weights, focal_gamma=-1.0)


def test_focal_loss_gradient_favours_the_hard_points():
    """The point the model gets wrong keeps its gradient under focal loss; the one it already gets right loses
    nearly all of it (the reason the loss exists)."""
    logits = torch.tensor([[4.0, 0.0], [0.0, 4.0]], requires_grad=True)  # point 0 right, point 1 wrong
    labels = torch.tensor([0, 0])
    grads = {}
    for gamma in (0.0, 2.0):
        logits.grad = None
        SegLoss(focal_gamma=gamma)(logits, labels).backward()
        grads[gamma] = logits.grad.norm(dim=1)
    easy_kept, hard_kept = (grads[2.0] / grads[0.0]).tolist()
    assert easy_kept < 0.01 and hard_kept > 0.9
