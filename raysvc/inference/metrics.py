"""Semantic-segmentation metrics from a confusion matrix that can be accumulated in chunks and summed across workers.

Everything is derived from one (C, C) int64 count matrix (rows = true class, columns = predicted class), so per-batch
updates, merging between evaluation shards and a DDP all-reduce are all plain integer sums and give exactly the same
result as one pass over all the points.

Undefined values. Definitions otherwise follow scikit-learn (`precision_recall_fscore_support`, `jaccard_score`,
`accuracy_score`), but where sklearn substitutes `zero_division` we report None (JSON null) and leave the class out of
the means, so a class that simply did not occur cannot drag mIoU down or pad it up:

- IoU and F1 are None for a class absent from both target and prediction (tp + fp + fn == 0).
- Precision is None for such a class; if the class is in the target but never predicted, precision is 0.0.
- Recall is None when the class has no true points (support 0), even if it was predicted (its IoU / F1 are then 0.0).
- `miou` / `mf1` average only the classes whose IoU / F1 is defined; `accuracy` is None for an empty matrix.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


class ConfusionMatrix:
    """Running (C, C) int64 confusion counts; rows are true classes, columns predicted classes."""

    def __init__(self, num_classes: int, ignore_index: int = -1, matrix: np.ndarray | None = None):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        if matrix is None:
            self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
        else:
            m = np.asarray(matrix)
            if m.shape != (num_classes, num_classes):
                raise ValueError(f"matrix shape {m.shape} != ({num_classes}, {num_classes})")
            self.matrix = m.astype(np.int64, copy=True)

    def reset(self) -> None:
        self.matrix[...] = 0

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> ConfusionMatrix:
        """Add one batch of per-point labels; points whose target is `ignore_index` are skipped (their pred may be
        anything). Counting happens on the tensors' device; only the C*C result is copied to the host."""
        pred = torch.as_tensor(pred).reshape(-1)
        target = torch.as_tensor(target, device=pred.device).reshape(-1)
        if pred.numel() != target.numel():
            raise ValueError(f"pred has {pred.numel()} entries, target {target.numel()}")
        if pred.is_floating_point() or target.is_floating_point():
            raise TypeError("pred and target must be integer class indices (take argmax of logits first)")
        keep = target != self.ignore_index
        p, t = pred[keep].long(), target[keep].long()
        c = self.num_classes
        # Out-of-range labels would silently land in another cell of the flattened bincount.
        if p.numel() and bool(((p < 0) | (p >= c) | (t < 0) | (t >= c)).any()):
            raise ValueError(f"labels outside [0, {c}) (other than ignore_index={self.ignore_index})")
        counts = torch.bincount(t * c + p, minlength=c * c)
        self.matrix += counts.reshape(c, c).cpu().numpy()
        return self

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add another matrix's counts in place (e.g. from another evaluation shard)."""
        if other.matrix.shape != self.matrix.shape:
            raise ValueError(f"cannot merge {other.matrix.shape} into {self.matrix.shape}")
        self.matrix += other.matrix
        return self

    def __add__(self, other: ConfusionMatrix) -> ConfusionMatrix:
        return ConfusionMatrix(self.num_classes, self.ignore_index, self.matrix).merge(other)

    def all_reduce_(self, group: Any = None) -> ConfusionMatrix:
        """Sum the counts over all DDP ranks in place (every rank ends with the total); no-op outside DDP."""
        if not (dist.is_available() and dist.is_initialized()):
            return self
        device = torch.device("cpu")
        if dist.get_backend(group) == "nccl":  # NCCL only reduces CUDA tensors
            device = torch.device("cuda", torch.cuda.current_device())
        t = torch.tensor(self.matrix, dtype=torch.int64, device=device)  # a copy, never a view of self.matrix
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
        self.matrix = t.cpu().numpy().astype(np.int64, copy=True)
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "ignore_index": self.ignore_index, "matrix": self.matrix.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ConfusionMatrix:
        return cls(int(d["num_classes"]), int(d["ignore_index"]), np.asarray(d["matrix"], dtype=np.int64))

    def compute(self, class_names: Sequence[str] | None = None) -> dict[str, Any]:
        return compute(self.matrix, class_names)


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def _mean(values: dict[str, float | None]) -> float | None:
    defined = [v for v in values.values() if v is not None]
    return float(np.mean(defined)) if defined else None


def compute(matrix: np.ndarray | torch.Tensor, class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Per-class IoU / precision / recall / F1 / support, their defined-class means and accuracy, as JSON-ready
    Python values (None = undefined; see the module docstring). Classes are keyed by `class_names` (the label
    space's names, e.g. a Detector's), or by their index when None."""
    m = matrix.cpu().numpy() if isinstance(matrix, torch.Tensor) else np.asarray(matrix)
    names = [str(i) for i in range(len(m))] if class_names is None else list(class_names)
    if m.shape != (len(names), len(names)):
        raise ValueError(f"matrix shape {m.shape} does not match {len(names)} class names")
    m = m.astype(np.int64)
    tp = np.diag(m)
    support = m.sum(axis=1)  # true points per class
    predicted = m.sum(axis=0)
    fp, fn = predicted - tp, support - tp

    iou, precision, recall, f1 = {}, {}, {}, {}
    for i, name in enumerate(names):
        t, p_, s = int(tp[i]), int(predicted[i]), int(support[i])
        union = int(tp[i] + fp[i] + fn[i])
        iou[name] = _ratio(t, union)
        precision[name] = _ratio(t, p_) if p_ else (0.0 if s else None)
        recall[name] = _ratio(t, s)
        f1[name] = _ratio(2 * t, 2 * t + int(fp[i]) + int(fn[i]))  # = 2PR/(P+R), and 0.0 when tp == 0 < union
    total = int(m.sum())
    return {
        "iou": iou,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "miou": _mean(iou),
        "mf1": _mean(f1),
        "accuracy": _ratio(int(tp.sum()), total),
        "support": {name: int(s) for name, s in zip(names, support, strict=True)},
        "confusion": m.tolist(),
    }
