"""Segmentation losses: class-weighted cross entropy plus the Lovasz-Softmax surrogate of the Jaccard loss.

The point classes are very unbalanced (michel / delta points are rare next to showers and tracks), and the metric we
report is mIoU, so cross entropy is reweighted by inverse class frequency and can be combined with Lovasz-Softmax
(Berman, Rannen Triki & Blaschko, CVPR 2018), which optimises a convex surrogate of 1 - IoU per class directly.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def _jaccard_loss_gradient(fg_sorted: torch.Tensor) -> torch.Tensor:
    """Per-position gradient of the Lovasz extension for each column of a (N, C) 0/1 matrix.

    Rows are sorted by decreasing error. Taking the first i points as mispredicted set M_i, the Jaccard loss is
    Delta(M_i) = |M_i| / |F u M_i| = i / (|F| + #background among the first i), with Delta(M_0) = 0; the Lovasz
    extension's gradient is g_i = Delta(M_i) - Delta(M_{i-1}). The denominator is never 0 for i >= 1: either |F| > 0
    or the first point is background."""
    n = fg_sorted.shape[0]
    i = torch.arange(1, n + 1, dtype=fg_sorted.dtype, device=fg_sorted.device).unsqueeze(1)
    loss_at = i / (fg_sorted.sum(0, keepdim=True) + torch.cumsum(1.0 - fg_sorted, dim=0))
    return torch.diff(loss_at, dim=0, prepend=torch.zeros_like(loss_at[:1]))


def lovasz_softmax(
    probs: torch.Tensor,
    labels: torch.Tensor,
    classes: str | Sequence[int] = "present",
    ignore_index: int = -1,
) -> torch.Tensor:
    """Lovasz-Softmax loss: mean over classes of the Lovasz extension of the Jaccard loss at errors |fg_c - p_c|.

    probs: (N, C) class probabilities (e.g. softmax of logits); labels: (N,) class indices, `ignore_index` skipped.
    classes: "present" (classes occurring in the non-ignored labels; the paper's default, so absent classes cannot
    reward empty predictions), "all", or a list of class indices. With one-hot probs this equals the mean of
    1 - IoU_c exactly. Returns a 0-dim tensor (0 with a graph when nothing is left to average)."""
    if probs.dim() != 2 or labels.shape != probs.shape[:1]:
        raise ValueError(f"expected probs (N, C) and labels (N,), got {tuple(probs.shape)} and {tuple(labels.shape)}")
    c = probs.shape[1]
    # The cumulative counts must stay exact integers: fp16 / bf16 lose them past a few hundred points.
    probs = probs.to(torch.promote_types(probs.dtype, torch.float32))
    valid = labels != ignore_index
    probs, labels = probs[valid], labels[valid]
    fg = (labels.unsqueeze(1) == torch.arange(c, device=labels.device)).to(probs.dtype)  # (N, C) one-hot
    errors = (fg - probs).abs()
    errors_sorted, perm = torch.sort(errors, dim=0, descending=True)
    grad = _jaccard_loss_gradient(torch.gather(fg, 0, perm))
    per_class = (errors_sorted * grad).sum(0)  # (C,)

    if classes == "present":
        use = fg.sum(0) > 0
    elif classes == "all":
        use = torch.ones(c, dtype=torch.bool, device=probs.device)
    elif isinstance(classes, str):
        raise ValueError(f"classes must be 'present', 'all' or a list of class indices, got {classes!r}")
    else:
        use = torch.zeros(c, dtype=torch.bool, device=probs.device)
        use[list(classes)] = True
    use = use.to(per_class.dtype)
    # Divide without a host sync; an empty selection gives 0 but keeps probs in the graph.
    return (per_class * use).sum() / use.sum().clamp_min(1.0)


def class_weights(counts: Sequence[int] | np.ndarray | torch.Tensor, power: float = 1.0) -> torch.Tensor:
    """Inverse-frequency weights counts**-power, scaled to mean 1 over the classes that occur (so the loss scale does
    not depend on the dataset size); classes with zero count get weight 0. power=0.5 is the softer square-root
    variant. Returns float32 (C,)."""
    n = counts.detach().cpu().numpy() if isinstance(counts, torch.Tensor) else np.asarray(counts)
    n = n.astype(np.float64).reshape(-1)
    if (n < 0).any() or not np.isfinite(n).all():
        raise ValueError(f"class counts must be finite and >= 0, got {n.tolist()}")
    present = n > 0
    if not present.any():
        raise ValueError("all class counts are zero")
    w = np.zeros_like(n)
    w[present] = n[present] ** -power
    w *= present.sum() / w.sum()
    return torch.tensor(w, dtype=torch.float32)


class SegLoss(nn.Module):
    """Weighted cross entropy on logits (focal with `focal_gamma` > 0) + lovasz_weight * Lovasz-Softmax on
    softmax(logits).

    Focal loss (Lin et al., ICCV 2017) scales each point's term by (1 - p_true)^gamma, so that points the model already
    gets right weigh less; the class weights play the part of its alpha. It keeps the cross entropy's normalisation
    (sum of the valid points' class weights), so gamma = 0 is exactly the weighted cross entropy."""

    weights: torch.Tensor | None

    def __init__(
        self,
        weights: torch.Tensor | Sequence[float] | None = None,
        lovasz_weight: float = 0.0,
        ignore_index: int = -1,
        focal_gamma: float = 0.0,
    ):
        super().__init__()
        # A buffer follows .to(device) and lands in the state dict with the model.
        self.register_buffer("weights", None if weights is None else torch.as_tensor(weights, dtype=torch.float32))
        self.lovasz_weight = float(lovasz_weight)
        self.ignore_index = ignore_index
        if focal_gamma < 0:
            raise ValueError(f"focal_gamma must be >= 0, got {focal_gamma}")
        self.focal_gamma = float(focal_gamma)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """logits (N, C), labels (N,) -> scalar. Cross entropy is the weight-normalised mean, as in
        F.cross_entropy, but a batch with no weighted valid point gives 0 instead of NaN."""
        labels = labels.long()
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # exact sums under autocast / bf16
        valid = labels != self.ignore_index
        per_point = F.cross_entropy(
            logits, labels, weight=self.weights, ignore_index=self.ignore_index, reduction="none"
        )
        if self.focal_gamma:
            log_p = torch.log_softmax(logits, 1).gather(1, labels.clamp_min(0).unsqueeze(1)).squeeze(1)
            per_point = per_point * (1.0 - log_p.exp()).pow(self.focal_gamma)  # ignored points are 0 already
        if self.weights is None:
            denom = valid.to(logits.dtype).sum()
        else:
            w = self.weights.to(device=logits.device, dtype=logits.dtype)
            denom = (w[labels.clamp(0, logits.shape[1] - 1)] * valid.to(logits.dtype)).sum()
        loss = per_point.sum() / denom.clamp_min(torch.finfo(logits.dtype).tiny)
        if self.lovasz_weight:
            probs = torch.softmax(logits, dim=1)
            loss = loss + self.lovasz_weight * lovasz_softmax(probs, labels, ignore_index=self.ignore_index)
        return loss

    def extra_repr(self) -> str:
        return f"lovasz_weight={self.lovasz_weight}, focal_gamma={self.focal_gamma}, ignore_index={self.ignore_index}"
