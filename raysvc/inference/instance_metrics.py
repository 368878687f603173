"""Instance metrics of a panoptic model, accumulated over events: panoptic quality, ARI, detection and PID accuracy.

Per event, each true instance (points with the same id >= 0; -1 = stuff or no instance) and each predicted instance
is a set of points with one class (the majority class of its points). Their IoU is counted over all the event's
points. Matching is greedy and one-to-one, highest IoU first, over pairs with IoU >= `iou_threshold` (0.5; above 0.5 a
match is unique anyway):

- class-aware (pairs of the same class only) for panoptic quality: a match is a true positive, an unmatched
  prediction a false positive, an unmatched true instance a false negative; SQ = mean IoU of the true positives,
  RQ = TP / (TP + FP/2 + FN/2), PQ = SQ x RQ. Pooled over all classes (`pq`, `sq`, `rq`) and per class.
- class-agnostic for detection (precision, recall, F1) and particle ID: for every matched true instance, whether the
  predicted class is its class (per true class: `pid_accuracy`; all pairs: `pid_confusion`).

ARI (sklearn's `adjusted_rand_score`) compares the two partitions of the points the prediction assigns to an
instance (true stuff points form one more cluster), per event, averaged over the events with two or more such
points.

With regression outputs (momentum, direction, start point), every class-agnostic match whose true instance has that
truth adds its error: momentum MAE, RMSE and mean relative error (MeV/c), direction angle (degrees), start-point
distance (in the units of the coordinates).
"""

from __future__ import annotations

import numpy as np


def _instances(ids: np.ndarray, cls: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(instance ids, point index -> instance row or -1, sizes, majority class of each instance)."""
    inst, row = np.unique(ids, return_inverse=True)
    keep = inst >= 0
    rows = np.full(len(inst), -1)
    rows[keep] = np.arange(keep.sum())
    point_row = rows[row]
    n = int(keep.sum())
    sizes = np.bincount(point_row[point_row >= 0], minlength=n)
    classes = np.full(n, -1)
    if n:
        m = point_row >= 0
        votes = np.zeros((n, int(cls[m].max(initial=0)) + 2), np.int64)
        np.add.at(votes, (point_row[m], cls[m] + 1), 1)  # +1: a point with class -1 votes for "none"
        classes = votes.argmax(1) - 1
    return inst[keep], point_row, sizes, classes


def _greedy(iou: np.ndarray, allowed: np.ndarray, threshold: float) -> list[tuple[int, int]]:
    """One-to-one (true, pred) pairs, highest IoU first, among the allowed pairs with IoU >= threshold."""
    t, p = np.nonzero((iou >= threshold) & allowed)
    order = np.argsort(-iou[t, p], kind="stable")
    used_t, used_p, pairs = set(), set(), []
    for i in order:
        a, b = int(t[i]), int(p[i])
        if a not in used_t and b not in used_p:
            used_t.add(a)
            used_p.add(b)
            pairs.append((a, b))
    return pairs


def event_iou(true_ids: np.ndarray, pred_ids: np.ndarray, true_cls: np.ndarray, pred_cls: np.ndarray) -> dict:
    """The instances of one event and their IoU matrix (true x pred)."""
    _, t_row, t_size, t_cls = _instances(true_ids, true_cls)
    _, p_row, p_size, p_cls = _instances(pred_ids, pred_cls)
    inter = np.zeros((len(t_size), len(p_size)), np.int64)
    both = (t_row >= 0) & (p_row >= 0)
    np.add.at(inter, (t_row[both], p_row[both]), 1)
    union = t_size[:, None] + p_size[None, :] - inter
    iou = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
    return {"iou": iou, "true_cls": t_cls, "pred_cls": p_cls}


class InstanceScores:
    """Accumulates `update(...)` over events; `result()` gives the metrics (module doc). `class_names`: the
    instance classes (index = class id); None for class-less instances (interactions: PQ, detection and ARI)."""

    def __init__(self, class_names: list[str] | None = None, iou_threshold: float = 0.5):
        self.names = list(class_names or ["instance"])
        self.threshold = iou_threshold
        k = len(self.names)
        self.tp, self.fp, self.fn = np.zeros(k, np.int64), np.zeros(k, np.int64), np.zeros(k, np.int64)
        self.iou_sum = np.zeros(k)
        self.det_tp = self.n_true = self.n_pred = 0
        self.pid = np.zeros((k, k), np.int64)  # matched true class x predicted class
        self.ari: list[float] = []
        self.events = 0
        self.reg: dict[str, list[float]] = {}  # regression output -> [n, sum |err|, sum err^2, sum |err| / truth]

    def update(
        self,
        true_ids: np.ndarray,
        pred_ids: np.ndarray,
        true_cls: np.ndarray | None = None,
        pred_cls: np.ndarray | None = None,
        true_values: dict[int, dict] | None = None,
        pred_values: dict[int, dict] | None = None,
    ) -> None:
        """One event: per-point true and predicted instance ids (-1 = none) and, with classes, per-point classes
        (an instance's class is the majority of its points'; classes outside the names count as no class).
        `true_values` / `pred_values`: {instance id: {"momentum": p, "direction": (3,), "vertex": (3,)}} (any of
        them; NaN where unknown) of the true and predicted instances, compared over the matched pairs."""
        true_ids, pred_ids = np.asarray(true_ids), np.asarray(pred_ids)
        if true_ids.shape != pred_ids.shape:
            raise ValueError(f"true and predicted instance ids differ in length: {true_ids.shape} vs {pred_ids.shape}")
        zeros = np.zeros(len(true_ids), np.int64)
        true_cls = zeros if true_cls is None else np.asarray(true_cls, np.int64)
        pred_cls = zeros if pred_cls is None else np.asarray(pred_cls, np.int64)
        m = event_iou(true_ids, pred_ids, true_cls, pred_cls)
        iou, tc, pc = m["iou"], m["true_cls"], m["pred_cls"]
        k = len(self.names)
        self.events += 1
        self.n_true += len(tc)
        self.n_pred += len(pc)

        # panoptic quality: class-aware matching
        pairs = _greedy(iou, tc[:, None] == pc[None, :], self.threshold)
        hit_t, hit_p = {a for a, _ in pairs}, {b for _, b in pairs}
        for a, b in pairs:
            if 0 <= tc[a] < k:
                self.tp[tc[a]] += 1
                self.iou_sum[tc[a]] += iou[a, b]
        for a in set(range(len(tc))) - hit_t:
            if 0 <= tc[a] < k:
                self.fn[tc[a]] += 1
        for b in set(range(len(pc))) - hit_p:
            if 0 <= pc[b] < k:
                self.fp[pc[b]] += 1

        # detection and particle ID: class-agnostic matching
        det = _greedy(iou, np.ones_like(iou, bool), self.threshold)
        self.det_tp += len(det)
        for a, b in det:
            if 0 <= tc[a] < k and 0 <= pc[b] < k:
                self.pid[tc[a], pc[b]] += 1
        if true_values and pred_values:
            t_ids, p_ids = np.unique(true_ids[true_ids >= 0]), np.unique(pred_ids[pred_ids >= 0])
            for a, b in det:
                self._regression(true_values.get(int(t_ids[a]), {}), pred_values.get(int(p_ids[b]), {}))

        assigned = pred_ids >= 0
        if assigned.sum() >= 2:
            from sklearn.metrics import adjusted_rand_score  # here: ~1 s at import, see train/probe.py

            self.ari.append(float(adjusted_rand_score(true_ids[assigned], pred_ids[assigned])))

    def _regression(self, truth: dict, pred: dict) -> None:
        for name, got in pred.items():
            want = truth.get(name)
            if want is None or not np.all(np.isfinite(want)) or not np.all(np.isfinite(got)):
                continue
            want, got = np.asarray(want, float), np.asarray(got, float)
            if name == "momentum":
                err, rel = abs(float(got) - float(want)), abs(float(got) - float(want)) / max(float(want), 1e-9)
            elif name == "direction":
                cos = float(got @ want / max(np.linalg.norm(got) * np.linalg.norm(want), 1e-12))
                err, rel = float(np.degrees(np.arccos(np.clip(cos, -1, 1)))), 0.0
            else:
                err, rel = float(np.linalg.norm(got - want)), 0.0
            acc = self.reg.setdefault(name, [0, 0.0, 0.0, 0.0])
            acc[0] += 1
            acc[1] += err
            acc[2] += err * err
            acc[3] += rel

    @classmethod
    def merged(cls, parts: list[InstanceScores]) -> InstanceScores:
        """One accumulator holding the events of all `parts` (e.g. every rank's)."""
        out = cls(parts[0].names, parts[0].threshold)
        for p in parts:
            for k in ("tp", "fp", "fn", "iou_sum", "pid"):
                setattr(out, k, getattr(out, k) + getattr(p, k))
            out.det_tp, out.n_true, out.n_pred = out.det_tp + p.det_tp, out.n_true + p.n_true, out.n_pred + p.n_pred
            out.ari += p.ari
            out.events += p.events
            for name, acc in p.reg.items():
                mine = out.reg.setdefault(name, [0, 0.0, 0.0, 0.0])
                out.reg[name] = [x + y for x, y in zip(mine, acc, strict=True)]
        return out

    def state(self) -> dict:
        """The accumulated counts as plain JSON values (`from_state` reads them back)."""
        arrays = {k: getattr(self, k).tolist() for k in ("tp", "fp", "fn", "iou_sum", "pid")}
        plain = {k: getattr(self, k) for k in ("det_tp", "n_true", "n_pred", "ari", "events", "reg")}
        return {"names": self.names, "threshold": self.threshold, **arrays, **plain}

    @classmethod
    def from_state(cls, state: dict) -> InstanceScores:
        out = cls(state["names"], state["threshold"])
        for k in ("tp", "fp", "fn", "iou_sum", "pid"):
            setattr(out, k, np.asarray(state[k], getattr(out, k).dtype))
        for k in ("det_tp", "n_true", "n_pred", "ari", "events"):
            setattr(out, k, state[k])
        out.reg = {name: list(acc) for name, acc in state.get("reg", {}).items()}
        return out

    def result(self) -> dict:
        def quality(tp, fp, fn, iou_sum) -> dict:
            sq = iou_sum / tp if tp else 0.0
            denom = tp + fp / 2 + fn / 2
            rq = tp / denom if denom else None
            return {"pq": None if rq is None else sq * rq, "sq": sq if tp else None, "rq": rq}

        pooled = quality(self.tp.sum(), self.fp.sum(), self.fn.sum(), self.iou_sum.sum())
        per_class = {n: quality(self.tp[i], self.fp[i], self.fn[i], self.iou_sum[i]) for i, n in enumerate(self.names)}
        precision = self.det_tp / self.n_pred if self.n_pred else None
        recall = self.det_tp / self.n_true if self.n_true else None
        f1 = None
        if precision is not None and recall is not None and precision + recall > 0:
            f1 = 2 * precision * recall / (precision + recall)
        matched = self.pid.sum(1)
        regression = {}
        for name, (n, s_abs, s_sq, s_rel) in self.reg.items():
            unit = {"momentum": "", "direction": "_deg"}.get(name, "")
            regression[name] = {"n": n, f"mae{unit}": s_abs / n, f"rmse{unit}": (s_sq / n) ** 0.5}
            if name == "momentum":
                regression[name]["mean_relative"] = s_rel / n
        extra = {"regression": regression} if regression else {}
        return {
            **pooled,
            "per_class": per_class,
            "ari": float(np.mean(self.ari)) if self.ari else None,
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "pid_accuracy": {
                n: float(self.pid[i, i] / matched[i]) if matched[i] else None for i, n in enumerate(self.names)
            },
            "pid_confusion": self.pid.tolist(),
            "counts": {
                "events": self.events,
                "true": self.n_true,
                "pred": self.n_pred,
                "tp": int(self.tp.sum()),
                "fp": int(self.fp.sum()),
                "fn": int(self.fn.sum()),
                "ari_events": len(self.ari),
            },
            **extra,
        }
