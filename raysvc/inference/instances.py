"""The instance tasks' labels (`instance_labels`), and the instances of one event from the instance head's last
prediction (`postprocess`): per point an instance id and class, per instance its class, confidence and point count.

1. A query's mask: the points whose mask probability exceeds `mask_threshold`, minus the points the stuff head
   claims (stuff probability above `stuff_threshold`).
2. Queries whose most likely class is "no object", whose best instance-class probability is below
   `min_confidence`, or whose mask holds fewer than `min_points` points are dropped.
3. Score = class probability x mean mask probability over the mask. Greedy mask-IoU NMS, best score first: a query
   whose mask overlaps a kept one by IoU above `nms_iou` is dropped.
4. Each point goes to the kept query that claims it with the highest score x mask probability; points no kept query
   claims get -1. Instances are numbered by score (0 = best); one left with fewer than `min_points` points after the
   assignment is dropped and its points get -1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field


class PostprocessConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mask_threshold: float = Field(0.5, gt=0, lt=1)
    stuff_threshold: float = Field(0.5, gt=0, lt=1)
    min_confidence: float = Field(0.5, ge=0, le=1)
    min_points: int = Field(2, ge=1)
    nms_iou: float = Field(0.5, gt=0, le=1)


@dataclass
class EventInstances:
    instance: torch.Tensor  # (n,) int64: instance id per point, -1 = none (stuff or unclaimed)
    instance_class: torch.Tensor  # (n,) int64: the class of the point's instance, -1 = none
    classes: list[int]  # per instance id
    confidence: list[float]
    points: list[int]


@torch.no_grad()
def postprocess(class_logits: torch.Tensor, mask_logits: torch.Tensor, stuff_logits: torch.Tensor, cfg=None):
    """EventInstances of one event from (Q, K + 1) class logits, (Q, n) mask logits and (n,) stuff logits."""
    cfg = cfg or PostprocessConfig()
    n = mask_logits.shape[1]
    prob = class_logits.float().softmax(-1)
    conf, cls = prob[:, :-1].max(1)
    mask_p = mask_logits.float().sigmoid()
    stuff = stuff_logits.float().sigmoid() > cfg.stuff_threshold
    masks = (mask_p > cfg.mask_threshold) & ~stuff[None, :]
    size = masks.sum(1)
    keep = (prob.argmax(1) != prob.shape[1] - 1) & (conf >= cfg.min_confidence) & (size >= cfg.min_points)
    score = conf * (mask_p * masks).sum(1) / size.clamp_min(1)
    kept: list[int] = []
    for q in torch.argsort(score, descending=True, stable=True).tolist():
        if not keep[q]:
            continue
        if kept:
            inter = (masks[kept] & masks[q]).sum(1)
            union = (masks[kept] | masks[q]).sum(1)
            if (inter / union.clamp_min(1) > cfg.nms_iou).any():
                continue
        kept.append(q)
    instance = torch.full((n,), -1, dtype=torch.long)
    if kept:
        claim = torch.where(masks[kept], score[kept, None] * mask_p[kept], torch.zeros(()))
        best = claim.argmax(0)
        instance = torch.where(claim.max(0).values > 0, best, instance)
    counts = torch.bincount(instance[instance >= 0], minlength=len(kept))
    # renumber: instances that kept at least min_points after the assignment, in score order
    alive = [i for i in range(len(kept)) if counts[i] >= cfg.min_points]
    new_id = torch.full((len(kept) + 1,), -1, dtype=torch.long)
    new_id[alive] = torch.arange(len(alive))
    instance = new_id[instance]  # index -1 reads the last entry, which is -1
    classes = [int(cls[kept[i]]) for i in alive]
    lookup = torch.tensor(classes + [-1], dtype=torch.long)
    return EventInstances(
        instance=instance,
        instance_class=lookup[instance],
        classes=classes,
        confidence=[float(score[kept[i]]) for i in alive],
        points=[int(counts[i]) for i in alive],
    )


def instance_labels(batch: dict, task: str, stuff_class: int | None) -> tuple[torch.Tensor, ...]:
    """(instance id, instance class, stuff) per point of a packed batch for one instance task."""
    ids = batch[task].clone()
    stuff = ids < 0
    if stuff_class is not None:
        stuff |= batch["semantic"] == stuff_class
    if task == "particle":
        cls = batch["pid"].clone()
        stuff |= cls < 0  # a particle without a PID cannot be scored as one
    else:
        cls = torch.zeros_like(ids)
    ids[stuff], cls[stuff] = -1, -1
    return ids, cls, stuff


def instance_classes(detector, task: str) -> list[str]:
    return list(detector.labels["pid"].classes) if task == "particle" else ["interaction"]


def score_events(scores, outs: list[dict], batch: dict, task: str, stuff_class: int | None, cfg=None) -> None:
    """Add each event of a packed batch to `scores` (an InstanceScores): the instances post-processed from the head's
    last layer (`outs`, one per event, as the model returns them) against the batch's true instances of `task`."""
    ids, cls, _ = instance_labels(batch, task, stuff_class)
    ends = batch["offset"].tolist()
    for out, start, end in zip(outs, [0, *ends[:-1]], ends, strict=True):
        last = out["layers"][-1]
        got = postprocess(last["class"].cpu(), last["mask"].cpu(), out["stuff"].cpu(), cfg)
        truth_ids, truth_cls = ids[start:end].cpu().numpy(), cls[start:end].cpu().numpy()
        scores.update(truth_ids, got.instance.numpy(), truth_cls, got.instance_class.numpy())
