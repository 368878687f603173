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

import math
from dataclasses import dataclass, field

import numpy as np
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
    queries: list[int] = field(default_factory=list)  # the query each instance came from (its regression outputs)
    values: dict[int, dict] = field(default_factory=dict)  # per instance id: decoded momentum / direction / vertex


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
        queries=[kept[i] for i in alive],
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


def score_events(
    scores, outs: list[dict], batch: dict, task: str, stuff_class: int | None, cfg=None, frame=None, regress=()
) -> None:
    """Add each event of a packed batch to `scores` (an InstanceScores): the instances post-processed from the head's
    last layer (`outs`, one per event, as the model returns them) against the batch's true instances of `task`; with
    `regress` (the head's regression outputs) and `frame` (center, scale of the coordinates), their momentum,
    direction and start point against the batch's particle truth."""
    ids, cls, _ = instance_labels(batch, task, stuff_class)
    ends = batch["offset"].tolist()
    particles = batch.get("particles") or [None] * len(ends)
    coord = batch["coord"].cpu().numpy()
    for e, (out, start, end) in enumerate(zip(outs, [0, *ends[:-1]], ends, strict=True)):
        last = out["layers"][-1]
        got = postprocess(last["class"].cpu(), last["mask"].cpu(), out["stuff"].cpu(), cfg)
        truth_ids, truth_cls = ids[start:end].cpu().numpy(), cls[start:end].cpu().numpy()
        values = {}
        if regress and particles[e] and "regress" in last:
            pred = decode_regression(last["regress"].float().cpu().numpy(), got, coord[start:end], regress, frame)
            values = {"true_values": truth_values(particles[e], regress), "pred_values": pred}
        scores.update(truth_ids, got.instance.numpy(), truth_cls, got.instance_class.numpy(), **values)


def truth_values(particles: list[dict] | None, names) -> dict[int, dict]:
    """{particle id: {name: its true momentum (MeV/c), direction or start point}} of one event's `particles`."""
    out = {}
    for p in particles or []:
        vals = {"momentum": p["momentum"], "direction": p["direction"], "vertex": p["vertex"]}
        out[int(p["id"])] = {n: np.asarray(vals[n] if vals[n] is not None else np.nan, float) for n in names}
    return out


def regression_targets(batch: dict, names, frame, transforms=None) -> list[dict[int, np.ndarray]]:
    """Per event {particle id: the regression target (D,) in the order of `names`}: log10 |p| (MeV/c), the unit
    direction, and the start point minus the centroid of the particle's points, both in the normalised coordinates
    of the batch ((x - center) / scale, `frame` = (center, scale)); NaN where the truth does not say. Direction and
    offset are turned by the event's augmentation `transforms` (B, 3, 3), as its points were."""
    center, scale = frame
    ends = batch["offset"].tolist()
    particles = batch.get("particles") or [None] * len(ends)
    ids, coord = batch["particle"].cpu().numpy(), batch["coord"].cpu().numpy()
    out = []
    for e, (start, end) in enumerate(zip([0, *ends[:-1]], ends, strict=True)):
        m = None if transforms is None else transforms[e].cpu().numpy()
        targets = {}
        for p in particles[e] or []:
            mine = ids[start:end] == p["id"]
            if not mine.any():
                continue
            vec = []
            for name in names:
                if name == "momentum":
                    mom = p["momentum"]
                    ok = mom is not None and math.isfinite(mom) and mom > 0
                    vec.append([math.log10(mom) if ok else math.nan])
                    continue
                if name == "direction":
                    v = np.asarray(p["direction"], float)
                else:
                    v = (np.asarray(p["vertex"], float) - center) / scale - coord[start:end][mine].mean(0)
                vec.append(v if m is None else m @ v)
            targets[int(p["id"])] = np.concatenate(vec).astype(np.float64)
        out.append(targets)
    return out


def decode_regression(raw: np.ndarray, inst: EventInstances, coord: np.ndarray, names, frame) -> dict[int, dict]:
    """{instance id: {"momentum": MeV/c, "direction": unit (3,), "vertex": (3,) in the event's coordinates}} from the
    regression outputs (Q, D) of the instances' queries; `coord` (n, 3) are the event's normalised coordinates."""
    from raysvc.models.mask_decoder import regress_dims

    center, scale = frame
    dims = regress_dims(names)
    instance = inst.instance.numpy()
    out = {}
    for i, q in enumerate(inst.queries):
        v, vals = raw[q], {}
        if "momentum" in dims:
            # clipped to 1 keV - 1 TeV: an untrained head's output must still be a finite number in the answer
            vals["momentum"] = float(10.0 ** np.clip(v[dims["momentum"]][0], -3.0, 6.0))
        if "direction" in dims:
            d = v[dims["direction"]]
            vals["direction"] = d / max(float(np.linalg.norm(d)), 1e-12)
        if "vertex" in dims:
            vals["vertex"] = (coord[instance == i].mean(0) + v[dims["vertex"]]) * scale + center
        out[i] = vals
    return out
