"""Instance metrics against independent references: a hand-made event worked out on paper, a brute-force PQ (every
one-to-one matching enumerated, IoU from Python sets) on random small events, and ARI from its closed form."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy.special import comb

from raysvc.inference.instance_metrics import InstanceScores


def test_a_hand_made_event_gives_the_figures_worked_out_by_hand():
    # truth: A = points 0-4 (class 0), B = 5-9 (class 1), points 10-11 stuff
    true_ids = np.array([0] * 5 + [1] * 5 + [-1, -1])
    true_cls = np.array([0] * 5 + [1] * 5 + [-1, -1])
    # prediction: X = 0-3 (class 0): IoU(A, X) = 4/5; Y = 4-9 + 10 (class 0): IoU(B, Y) = 5/7, wrong class
    pred_ids = np.array([7] * 4 + [3] * 6 + [3, -1])
    pred_cls = np.array([0] * 4 + [0] * 6 + [0, -1])
    s = InstanceScores(["a", "b"])
    s.update(true_ids, pred_ids, true_cls, pred_cls)
    r = s.result()
    # class-aware: TP = A-X, FP = Y, FN = B
    assert r["sq"] == pytest.approx(0.8) and r["rq"] == pytest.approx(1 / (1 + 0.5 + 0.5))
    assert r["pq"] == pytest.approx(0.4)
    assert r["per_class"]["a"] == pytest.approx({"pq": 0.8 * (1 / (1 + 0.5)), "sq": 0.8, "rq": 1 / 1.5})
    assert r["per_class"]["b"] == {"pq": 0.0, "sq": None, "rq": 0.0}
    # class-agnostic: both matched; B was called class a
    assert r["precision"] == 1.0 and r["recall"] == 1.0 and r["f1"] == 1.0
    assert r["pid_accuracy"] == {"a": 1.0, "b": 0.0} and r["pid_confusion"] == [[1, 0], [1, 0]]
    # ARI over the 11 assigned points: truth labels there 0x5, 1x5, -1x1
    t = np.array([0] * 5 + [1] * 5 + [-1])
    p = np.array([7] * 4 + [3] * 7)
    assert r["ari"] == pytest.approx(_ari(t, p))


def test_iou_of_exactly_one_half_matches_and_below_does_not():
    true_ids = np.array([0, 0, 0, 0])
    s = InstanceScores()
    s.update(true_ids, np.array([5, 5, -1, -1]))  # IoU 2/4
    assert s.result()["counts"]["tp"] == 1
    s = InstanceScores()
    s.update(true_ids, np.array([5, -1, -1, -1]))  # IoU 1/4
    r = s.result()
    assert (r["counts"]["tp"], r["counts"]["fp"], r["counts"]["fn"]) == (0, 1, 1) and r["pq"] == 0.0


def _ari(a: np.ndarray, b: np.ndarray) -> float:
    """Hubert and Arabie's adjusted Rand index from the contingency table."""
    _, ia = np.unique(a, return_inverse=True)
    _, ib = np.unique(b, return_inverse=True)
    table = np.zeros((ia.max() + 1, ib.max() + 1), np.int64)
    np.add.at(table, (ia, ib), 1)
    pairs = comb(table, 2).sum()
    rows, cols, n = comb(table.sum(1), 2).sum(), comb(table.sum(0), 2).sum(), comb(len(a), 2)
    expected = rows * cols / n
    top = (rows + cols) / 2
    return 1.0 if top == expected else (pairs - expected) / (top - expected)


def _max_matching(T: dict, P: dict, iou: dict, same_class: bool) -> list:
    """The partial one-to-one matching of true to predicted instances with the most pairs at IoU >= 0.5."""
    ok = {(a, b) for (a, b), v in iou.items() if v >= 0.5 and (not same_class or T[a][1] == P[b][1])}
    top: list = []
    for perm in itertools.permutations(list(P) + [None] * len(T), len(T)):
        pairs = [(a, b) for a, b in zip(T, perm, strict=True) if b is not None and (a, b) in ok]
        if len(pairs) > len(top):
            top = pairs
    return top


def _brute_force(events, k: int) -> dict:
    """PQ / SQ / RQ pooled and per class, detection and PID accuracy: instances as sets, every partial one-to-one
    matching tried, the one with the most pairs at IoU >= 0.5 kept (class-aware for PQ, class-agnostic for the rest)."""
    tp, fp, fn, iou_sum = np.zeros(k), np.zeros(k), np.zeros(k), np.zeros(k)
    det, n_true, n_pred = 0, 0, 0
    pid = np.zeros((k, k))
    for ti, pi, tc, pc in events:
        T = {i: ({j for j in range(len(ti)) if ti[j] == i}, tc[ti == i][0]) for i in set(ti.tolist()) - {-1}}
        P = {
            i: ({j for j in range(len(pi)) if pi[j] == i}, np.bincount(pc[pi == i]).argmax())
            for i in set(pi.tolist()) - {-1}
        }
        n_true, n_pred = n_true + len(T), n_pred + len(P)
        iou = {(a, b): len(T[a][0] & P[b][0]) / len(T[a][0] | P[b][0]) for a in T for b in P}

        pairs = _max_matching(T, P, iou, same_class=True)
        for a, b in pairs:
            tp[T[a][1]] += 1
            iou_sum[T[a][1]] += iou[(a, b)]
        for a in set(T) - {a for a, _ in pairs}:
            fn[T[a][1]] += 1
        for b in set(P) - {b for _, b in pairs}:
            fp[P[b][1]] += 1
        agnostic = _max_matching(T, P, iou, same_class=False)
        det += len(agnostic)
        for a, b in agnostic:
            pid[T[a][1], P[b][1]] += 1
    sq = iou_sum.sum() / tp.sum()
    rq = tp.sum() / (tp.sum() + fp.sum() / 2 + fn.sum() / 2)
    return {
        "pq": sq * rq,
        "sq": sq,
        "rq": rq,
        "class_pq": [iou_sum[c] / tp[c] * tp[c] / (tp[c] + fp[c] / 2 + fn[c] / 2) if tp[c] else 0.0 for c in range(k)],
        "precision": det / n_pred,
        "recall": det / n_true,
        "pid": [pid[c, c] / pid[c].sum() if pid[c].sum() else None for c in range(k)],
    }


def _random_event(rng: np.random.Generator, k: int):
    """12-20 points in 2-4 true instances plus stuff; the prediction relabels, splits and merges some of them."""
    n = int(rng.integers(12, 21))
    nt = int(rng.integers(2, 5))
    ti = rng.integers(-1, nt, n)
    tcls = rng.integers(0, k, nt)
    tc = np.where(ti >= 0, tcls[np.maximum(ti, 0)], -1)
    pi = ti.copy()
    flip = rng.random(n) < 0.25
    pi[flip] = rng.integers(-1, nt + 2, flip.sum())
    # predicted instance j + 10 grows from true instance j (j < nt) and mostly keeps its class; nt, nt + 1 are new
    pcls = np.r_[np.where(rng.random(nt) < 0.7, tcls, rng.integers(0, k, nt)), rng.integers(0, k, 2)]
    pc = np.where(pi >= 0, pcls[np.maximum(pi, 0)], 0)
    pi = np.where(pi >= 0, pi + 10, -1)
    return ti, pi, tc, pc


def test_pq_detection_and_pid_equal_brute_force_on_random_events():
    rng = np.random.default_rng(0)
    k = 3
    events = [_random_event(rng, k) for _ in range(60)]
    s = InstanceScores(["x", "y", "z"])
    for ti, pi, tc, pc in events:
        s.update(ti, pi, tc, pc)
    got, want = s.result(), _brute_force(events, k)
    assert 0 < got["counts"]["tp"] < got["counts"]["true"]  # a mix of hits and misses, not a degenerate case
    for key in ("pq", "sq", "rq", "precision", "recall"):
        assert got[key] == pytest.approx(want[key]), key
    assert [got["per_class"][n]["pq"] for n in "xyz"] == pytest.approx(want["class_pq"])
    assert [got["pid_accuracy"][n] for n in "xyz"] == pytest.approx(want["pid"])
    aris = [_ari(ti[pi >= 0], pi[pi >= 0]) for ti, pi, _, _ in events if (pi >= 0).sum() >= 2]
    assert got["ari"] == pytest.approx(np.mean(aris))


def test_a_perfect_prediction_scores_one_and_a_shuffled_one_does_not():
    rng = np.random.default_rng(1)
    ti, _, tc, _ = _random_event(rng, 3)
    s = InstanceScores(["x", "y", "z"])
    s.update(ti, np.where(ti >= 0, ti + 100, -1), tc, tc)
    r = s.result()
    assert r["pq"] == 1.0 and r["ari"] == pytest.approx(1.0) and r["f1"] == 1.0
    s = InstanceScores(["x", "y", "z"])
    s.update(ti, rng.permutation(ti), tc, tc)
    assert s.result()["pq"] < 1.0
    with pytest.raises(ValueError, match="differ in length"):
        s.update(ti, ti[:-1])


def test_regression_errors_of_matched_particles_equal_a_numpy_recount():
    rng = np.random.default_rng(3)
    scores, ref = InstanceScores(["a", "b"]), {"momentum": [], "rel": [], "direction": [], "vertex": []}
    for _ in range(5):
        true = np.repeat(np.arange(4), 10)  # 4 particles of 10 points
        pred = true.copy()
        pred[true == 3] = -1  # particle 3 is missed: its values are not compared
        tv = {
            i: {"momentum": rng.uniform(10, 1000), "direction": _unit(rng), "vertex": rng.uniform(0, 700, 3)}
            for i in range(4)
        }
        tv[1]["momentum"] = np.nan  # unknown truth: skipped for that output only
        pv = {
            i: {"momentum": rng.uniform(10, 1000), "direction": _unit(rng), "vertex": rng.uniform(0, 700, 3)}
            for i in range(3)
        }
        scores.update(true, pred, true_values=tv, pred_values=pv)
        for i in range(3):
            if np.isfinite(tv[i]["momentum"]):
                ref["momentum"].append(abs(pv[i]["momentum"] - tv[i]["momentum"]))
                ref["rel"].append(ref["momentum"][-1] / tv[i]["momentum"])
            ref["direction"].append(np.degrees(np.arccos(np.clip(pv[i]["direction"] @ tv[i]["direction"], -1, 1))))
            ref["vertex"].append(np.linalg.norm(pv[i]["vertex"] - tv[i]["vertex"]))
    r = InstanceScores.from_state(InstanceScores.merged([scores]).state()).result()["regression"]
    m = np.array(ref["momentum"])
    assert r["momentum"]["n"] == 10 and r["momentum"]["mae"] == pytest.approx(m.mean())
    assert r["momentum"]["rmse"] == pytest.approx(np.sqrt((m**2).mean()))
    assert r["momentum"]["mean_relative"] == pytest.approx(np.mean(ref["rel"]))
    assert r["direction"]["n"] == 15 and r["direction"]["mae_deg"] == pytest.approx(np.mean(ref["direction"]))
    assert r["vertex"]["rmse"] == pytest.approx(np.sqrt(np.mean(np.square(ref["vertex"]))))
    assert "regression" not in InstanceScores(["a"]).result()  # nothing regressed, no key


def _unit(rng) -> np.ndarray:
    v = rng.normal(size=3)
    return v / np.linalg.norm(v)
