"""Segmentation metrics against scikit-learn, chunked accumulation, merging and the DDP all-reduce."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from sklearn.metrics import accuracy_score, confusion_matrix, jaccard_score, precision_recall_fscore_support

from raysvc.data.contract.detectors import LARTPC
from raysvc.inference.metrics import ConfusionMatrix, compute

CLASS_NAMES = LARTPC.class_names
C = len(CLASS_NAMES)
LABELS = list(range(C))


def make_labels(seed: int, scenario: str, n: int = 4000) -> tuple[np.ndarray, np.ndarray]:
    """Random (pred, target) with ~10% ignored targets (whose preds are garbage, even out of range).

    "uniform": every class everywhere. "gaps": class 3 never occurs anywhere, class 2 is only ever predicted
    (support 0), class 4 is only ever true (never predicted)."""
    rng = np.random.default_rng(seed)
    if scenario == "uniform":
        target = rng.integers(0, C, n)
        pred = np.where(rng.random(n) < 0.5, target, rng.integers(0, C, n))
    else:
        target = rng.choice([0, 1, 4], n, p=[0.5, 0.4, 0.1])
        correct = (rng.random(n) < 0.6) & (target != 4)
        pred = np.where(correct, target, rng.choice([0, 1, 2], n))
    ignored = rng.random(n) < 0.1
    target = np.where(ignored, -1, target)
    pred = np.where(ignored, rng.integers(-3, 9, n), pred)
    return pred.astype(np.int64), target.astype(np.int64)


def close(ours: float | None, expected: float) -> bool:
    return ours is not None and math.isclose(ours, expected, rel_tol=1e-12, abs_tol=1e-12)


@pytest.mark.parametrize("scenario", ["uniform", "gaps"])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_matches_sklearn(seed, scenario):
    pred, target = make_labels(seed, scenario)
    cm = ConfusionMatrix(C).update(torch.from_numpy(pred), torch.from_numpy(target))
    res = compute(cm.matrix, CLASS_NAMES)
    keep = target != -1
    yt, yp = target[keep], pred[keep]

    np.testing.assert_array_equal(cm.matrix, confusion_matrix(yt, yp, labels=LABELS))
    assert res["confusion"] == confusion_matrix(yt, yp, labels=LABELS).tolist()
    assert close(res["accuracy"], accuracy_score(yt, yp))

    # zero_division=nan marks exactly the undefined entries.
    p, r, f, s = precision_recall_fscore_support(yt, yp, labels=LABELS, zero_division=np.nan)
    # jaccard_score only accepts zero_division 0 or 1: an entry that differs between the two is undefined.
    j0 = jaccard_score(yt, yp, labels=LABELS, average=None, zero_division=0)
    j1 = jaccard_score(yt, yp, labels=LABELS, average=None, zero_division=1)
    for i, name in enumerate(CLASS_NAMES):
        assert res["support"][name] == s[i]
        assert isinstance(res["support"][name], int)
        if np.isnan(p[i]):  # never predicted: 0.0 if the class is in the target, else undefined
            assert res["precision"][name] == (0.0 if s[i] > 0 else None)
        else:
            assert close(res["precision"][name], p[i])
        assert res["recall"][name] is None if np.isnan(r[i]) else close(res["recall"][name], r[i])
        assert res["f1"][name] is None if np.isnan(f[i]) else close(res["f1"][name], f[i])
        assert res["iou"][name] is None if j0[i] != j1[i] else close(res["iou"][name], j0[i])

    defined_iou = j0[j0 == j1]
    assert close(res["miou"], float(np.mean(defined_iou)))
    assert close(res["mf1"], float(np.nanmean(f)))
    json.dumps(res)  # plain Python values only

    if scenario == "gaps":  # the documented conventions, spelled out
        shower, michel, delta, led = CLASS_NAMES[0], CLASS_NAMES[2], CLASS_NAMES[3], CLASS_NAMES[4]
        assert all(res[k][delta] is None for k in ("iou", "precision", "recall", "f1"))
        assert res["support"][delta] == 0
        assert res["recall"][michel] is None and res["precision"][michel] == 0.0
        assert res["iou"][michel] == 0.0 and res["f1"][michel] == 0.0
        assert res["precision"][led] == 0.0 and res["recall"][led] == 0.0 and res["iou"][led] == 0.0
        assert res["iou"][shower] > 0.0
        # delta is left out of the mean, michel (predicted but absent) is in it with IoU 0.
        assert close(res["miou"], sum(v for v in res["iou"].values() if v is not None) / (C - 1))


def test_chunked_updates_and_merge_equal_one_pass():
    pred, target = make_labels(7, "gaps", n=5000)
    whole = ConfusionMatrix(C).update(torch.from_numpy(pred), torch.from_numpy(target))
    assert whole.matrix.sum() == (target != -1).sum()

    chunked = ConfusionMatrix(C)
    for idx in np.array_split(np.arange(len(pred)), [1, 2, 700, 701, 3000]):  # includes tiny and empty-ish chunks
        chunked.update(torch.from_numpy(pred[idx]), torch.from_numpy(target[idx]))
    np.testing.assert_array_equal(chunked.matrix, whole.matrix)

    a = ConfusionMatrix(C).update(torch.from_numpy(pred[:1234]), torch.from_numpy(target[:1234]))
    b = ConfusionMatrix(C).update(torch.from_numpy(pred[1234:]), torch.from_numpy(target[1234:]))
    a_before, b_before = a.matrix.copy(), b.matrix.copy()
    total = a + b
    np.testing.assert_array_equal(total.matrix, whole.matrix)
    np.testing.assert_array_equal(a.matrix, a_before)  # + does not mutate its operands
    np.testing.assert_array_equal(b.matrix, b_before)
    assert a.merge(b) is a
    np.testing.assert_array_equal(a.matrix, whole.matrix)
    assert a.compute() == whole.compute()

    restored = ConfusionMatrix.from_dict(json.loads(json.dumps(whole.to_dict())))
    np.testing.assert_array_equal(restored.matrix, whole.matrix)
    assert restored.matrix.dtype == np.int64 and restored.ignore_index == -1


def test_update_details():
    cm = ConfusionMatrix(num_classes=3, ignore_index=2)
    cm.update(torch.tensor([[0, 1], [2, 2]]), torch.tensor([[0, 0], [2, 1]]))  # any shape, flattened
    np.testing.assert_array_equal(cm.matrix, [[1, 1, 0], [0, 0, 1], [0, 0, 0]])  # target 2 ignored, pred 2 counted
    with pytest.raises(ValueError, match="outside"):
        cm.update(torch.tensor([3]), torch.tensor([0]))
    with pytest.raises(ValueError, match="outside"):
        cm.update(torch.tensor([0]), torch.tensor([-1]))  # -1 is not the ignore_index here
    with pytest.raises(ValueError, match="entries"):
        cm.update(torch.tensor([0, 1]), torch.tensor([0]))
    with pytest.raises(TypeError):
        cm.update(torch.tensor([0.0]), torch.tensor([0]))
    np.testing.assert_array_equal(cm.matrix, [[1, 1, 0], [0, 0, 1], [0, 0, 0]])  # failed updates add nothing
    cm.reset()
    assert cm.matrix.sum() == 0


def test_empty_matrix_is_all_undefined():
    res = compute(np.zeros((C, C), dtype=np.int64))
    assert res["miou"] is None and res["mf1"] is None and res["accuracy"] is None
    assert all(v is None for k in ("iou", "precision", "recall", "f1") for v in res[k].values())
    with pytest.raises(ValueError):
        compute(np.zeros((C, C)), CLASS_NAMES[:-1])


def test_all_reduce_is_noop_without_process_group():
    assert not dist.is_initialized()
    cm = ConfusionMatrix(C).update(torch.tensor([0, 1]), torch.tensor([0, 0]))
    before = cm.matrix.copy()
    assert cm.all_reduce_() is cm
    np.testing.assert_array_equal(cm.matrix, before)


def _all_reduce_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        cm = ConfusionMatrix(C)
        # Rank r sees (r + 1) points of class r predicted as class (r + 1) % C.
        cm.update(torch.full((rank + 1,), (rank + 1) % C), torch.full((rank + 1,), rank))
        cm.all_reduce_()
        np.save(f"{out_dir}/rank{rank}.npy", cm.matrix)
    finally:
        dist.destroy_process_group()


def test_all_reduce_sums_over_ranks(tmp_path):
    world_size = 3
    mp.spawn(_all_reduce_worker, args=(world_size, str(tmp_path / "init"), str(tmp_path)), nprocs=world_size)
    expected = np.zeros((C, C), dtype=np.int64)
    for r in range(world_size):
        expected[r, (r + 1) % C] = r + 1
    for r in range(world_size):
        got = np.load(tmp_path / f"rank{r}.npy")
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, expected)
