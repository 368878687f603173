"""The set-prediction loss of the instance head (`models/mask_decoder.py`), Mask2Former's recipe.

Per event and per decoder layer, queries are matched one-to-one to the true instances by the Hungarian algorithm
(scipy's `linear_sum_assignment`) on a cost of class probability, mask binary cross entropy and mask dice, computed on
a random subset of at most `sample_points` of the event's points. Matched queries learn their instance's class and
mask (sigmoid focal loss + dice loss on the same points); the others learn "no object", down-weighted. A per-point
binary cross entropy trains the stuff logit. Every layer's prediction is scored the same way (auxiliary losses), and
the sum is normalised by the number of true instances in the batch.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from scipy.optimize import linear_sum_assignment


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


def instance_loss(
    outputs: list[dict], ids: torch.Tensor, classes: torch.Tensor, stuff: torch.Tensor, offset: torch.Tensor, cfg
) -> dict:
    """The loss of a batch: `outputs` from MaskDecoder.forward; per point `ids` (instance, -1 none), `classes` (of the
    point's instance) and `stuff` (bool). Returns {"loss", "class", "mask", "dice", "stuff"} (the parts summed over
    layers, each normalised by the batch's instance count)."""
    parts = {k: outputs[0]["stuff"].new_zeros(()) for k in ("class", "mask", "dice", "stuff")}
    total_instances, start = 0, 0
    for out, end in zip(outputs, offset.tolist(), strict=True):
        masks, cls = instance_targets(ids[start:end], classes[start:end])
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
        target_stuff = stuff[start:end].float()
        parts["stuff"] = parts["stuff"] + F.binary_cross_entropy_with_logits(out["stuff"].float(), target_stuff)
        start = end
    norm = max(total_instances, 1)
    parts = {
        "class": parts["class"] * cfg.class_weight / norm,
        "mask": parts["mask"] * cfg.focal_weight / norm,
        "dice": parts["dice"] * cfg.dice_weight / norm,
        "stuff": parts["stuff"] * cfg.stuff_weight / len(outputs),
    }
    return {"loss": sum(parts.values()), **parts}
