"""The set-prediction loss of the instance head (`models/mask_decoder.py`), Mask2Former's recipe.

Per event and per decoder layer, queries are matched one-to-one to the true instances by the Hungarian algorithm
(scipy's `linear_sum_assignment`) on a cost of class probability, mask binary cross entropy and mask dice, computed on
a random subset of at most `sample_points` of the event's points. Matched queries learn their instance's class and
mask (sigmoid focal loss + dice loss on the same points); the others learn "no object", down-weighted. A per-point
binary cross entropy trains the stuff logit. With regression outputs, matched queries also learn their particle's
log10 |p|, direction and start-point offset where the truth is known (`regression_loss`). Every layer's prediction is
scored the same way (auxiliary losses), and the sum is normalised by the number of true instances in the batch.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field


class InstanceLossConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cost_class: float = Field(1.0, ge=0)
    cost_mask: float = Field(1.0, ge=0)
    cost_dice: float = Field(1.0, ge=0)
    class_weight: float = Field(2.0, ge=0)
    focal_weight: float = Field(2.0, ge=0)
    dice_weight: float = Field(5.0, ge=0)
    stuff_weight: float = Field(1.0, ge=0)
    no_object_weight: float = Field(0.5, ge=0, description="class-loss weight of unmatched queries")
    focal_alpha: float = Field(0.25, ge=0, le=1)
    focal_gamma: float = Field(2.0, ge=0)
    sample_points: int = Field(20000, gt=0, description="points per event for matching and mask losses")
    regress_weight: float = Field(1.0, ge=0, description="weight of the regression losses of matched queries")


def instance_targets(ids: torch.Tensor, classes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(masks (M, n) float, classes (M,)) of one event's instances: points sharing an id >= 0; an instance's class is
    that of its first point (all its points carry it)."""
    inst, first = np.unique(ids.cpu().numpy(), return_index=True)
    keep = inst >= 0
    inst, first = torch.as_tensor(inst[keep], device=ids.device), torch.as_tensor(first[keep], device=ids.device)
    return (ids[None, :] == inst[:, None]).float(), classes[first]


def _pair_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(Q, M) mean binary cross entropy of every query's mask against every target mask."""
    pos, neg = F.softplus(-logits), F.softplus(logits)
    return (pos @ targets.T + neg @ (1 - targets).T) / logits.shape[1]


def _pair_dice(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    p = logits.sigmoid()
    return 1 - (2 * p @ targets.T + 1) / (p.sum(1)[:, None] + targets.sum(1)[None, :] + 1)


@torch.no_grad()
def hungarian_match(
    class_logits: torch.Tensor, mask_logits: torch.Tensor, classes: torch.Tensor, masks: torch.Tensor, cfg
) -> tuple[np.ndarray, np.ndarray]:
    """(query indices, target indices) of the assignment with the lowest total cost (masks on the same points)."""
    if len(classes) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    from scipy.optimize import linear_sum_assignment  # here: scipy.optimize is ~0.4 s at import, rarely needed

    prob = class_logits.float().softmax(-1)[:, classes]
    m = mask_logits.float()
    cost = -cfg.cost_class * prob + cfg.cost_mask * _pair_bce(m, masks) + cfg.cost_dice * _pair_dice(m, masks)
    q, t = linear_sum_assignment(cost.cpu().numpy())
    return q, t


def sigmoid_focal(logits: torch.Tensor, targets: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """Per-row mean of the sigmoid focal loss (Lin et al. 2017)."""
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    w = alpha * targets + (1 - alpha) * (1 - targets)
    return (w * ce * (1 - p_t) ** gamma).mean(1)


def dice_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    p = logits.sigmoid()
    return 1 - (2 * (p * targets).sum(1) + 1) / (p.sum(1) + targets.sum(1) + 1)


def regression_loss(pred: torch.Tensor, target: torch.Tensor, dims: dict[str, slice]) -> torch.Tensor:
    """Summed over the matched queries (rows) and outputs, each where its target is known (not NaN): smooth L1 on
    log10 |p| and on the start-point offset, 1 - cos on the direction."""
    total = pred.new_zeros(())
    for name, sl in dims.items():
        p, t = pred[:, sl].float(), target[:, sl]
        known = torch.isfinite(t).all(1)
        if not known.any():
            total = total + 0.0 * p.sum()  # keeps the head in the graph (DDP)
            continue
        p, t = p[known], t[known]
        if name == "direction":
            total = total + (1 - F.cosine_similarity(p, t, dim=1)).sum()
        else:
            total = total + F.smooth_l1_loss(p, t, reduction="none", beta=0.1).sum(1).sum()
    return total


def instance_loss(
    outputs: list[dict],
    ids: torch.Tensor,
    classes: torch.Tensor,
    stuff: torch.Tensor,
    offset: torch.Tensor,
    cfg,
    targets: list[dict] | None = None,
    dims: dict[str, slice] | None = None,
) -> dict:
    """The loss of a batch: `outputs` from MaskDecoder.forward; per point `ids` (instance, -1 none), `classes` (of the
    point's instance) and `stuff` (bool); with regression outputs, per event {instance id: target (D,)} (`targets`,
    see inference.instances.regression_targets) and the head's output columns (`dims`). Returns {"loss", "class",
    "mask", "dice", "stuff"[, "regress"]} (the parts summed over layers, each normalised by the batch's instance
    count)."""
    regress = bool(dims) and targets is not None
    names = ("class", "mask", "dice", "stuff") + (("regress",) if regress else ())
    parts = {k: outputs[0]["stuff"].new_zeros(()) for k in names}
    total_instances, start = 0, 0
    for e, (out, end) in enumerate(zip(outputs, offset.tolist(), strict=True)):
        masks, cls = instance_targets(ids[start:end], classes[start:end])
        if regress:
            width = max(sl.stop for sl in dims.values())
            uniq = np.unique(ids[start:end].cpu().numpy())
            uniq = uniq[uniq >= 0]
            rows = [targets[e].get(int(i), np.full(width, np.nan)) for i in uniq]
            reg_target = torch.as_tensor(np.array(rows).reshape(-1, width), dtype=torch.float32, device=ids.device)
        total_instances += len(cls)
        n = end - start
        pick = torch.randperm(n, device=ids.device)[: cfg.sample_points] if n > cfg.sample_points else None
        sampled = masks if pick is None else masks[:, pick]
        for pred in out["layers"]:
            logits = pred["mask"] if pick is None else pred["mask"][:, pick]
            q, t = hungarian_match(pred["class"], logits, cls, sampled, cfg)
            num_q, k = pred["class"].shape
            target = torch.full((num_q,), k - 1, dtype=torch.long, device=ids.device)  # "no object"
            target[q] = cls[t]
            weight = pred["class"].new_ones(k)
            weight[-1] = cfg.no_object_weight
            # summed (not averaged) over queries, like the mask terms: normalised by the instance count below
            parts["class"] = parts["class"] + F.cross_entropy(pred["class"].float(), target, weight, reduction="sum")
            if len(q):
                lq, tq = logits[q].float(), sampled[t]
                parts["mask"] = parts["mask"] + sigmoid_focal(lq, tq, cfg.focal_alpha, cfg.focal_gamma).sum()
                parts["dice"] = parts["dice"] + dice_loss(lq, tq).sum()
            else:  # no instance: a zero that keeps the mask branch in the graph (DDP wants a gradient for every weight)
                parts["mask"] = parts["mask"] + 0.0 * logits.sum()
            if regress:
                qi = torch.as_tensor(q, dtype=torch.long, device=ids.device)
                ti = torch.as_tensor(t, dtype=torch.long, device=ids.device)
                parts["regress"] = parts["regress"] + regression_loss(pred["regress"][qi], reg_target[ti], dims)
        target_stuff = stuff[start:end].float()
        parts["stuff"] = parts["stuff"] + F.binary_cross_entropy_with_logits(out["stuff"].float(), target_stuff)
        start = end
    norm = max(total_instances, 1)
    parts = {
        "class": parts["class"] * cfg.class_weight / norm,
        "mask": parts["mask"] * cfg.focal_weight / norm,
        "dice": parts["dice"] * cfg.dice_weight / norm,
        "stuff": parts["stuff"] * cfg.stuff_weight / len(outputs),
        **({"regress": parts["regress"] * cfg.regress_weight / norm} if regress else {}),
    }
    return {"loss": sum(parts.values()), **parts}
