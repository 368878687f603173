"""The instances of a panoptic export (task `panoptic`): per instance task (particle with its PID, interaction) a
per-point instance id and class, and the list of instances with their class, confidence, point count and, from a
head with regression outputs, momentum / direction / start point.

Predict columns: `instance` + `instance_class` (particle), `interaction` (interaction), and `instances` (the first
task's instances); the response field `instances` {task: TaskInstances}; `raysvc evaluate` the instance metrics per
task (PQ / SQ / RQ, ARI, detection, PID accuracy), as the training run's validation reports them.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch
from pydantic import BaseModel, Field

from raysvc.inference.instance_metrics import InstanceScores
from raysvc.inference.instances import (
    EventInstances,
    PostprocessConfig,
    decode_regression,
    instance_classes,
    score_events,
)
from raysvc.inference.instances import postprocess as postprocess_event
from raysvc.inference.outputs.base import Output, points_list

# task -> (per-point instance id column, per-point class column or None)
INSTANCE_COLUMNS = {"particle": ("instance", "instance_class"), "interaction": ("interaction", None)}
INSTANCE_ITEM = pa.struct(
    [
        ("id", pa.int32()),
        ("class", pa.int8()),
        ("confidence", pa.float32()),
        ("points", pa.int32()),
        # a head with regression outputs: |p| (MeV/c), unit direction, start point (voxels); null otherwise
        ("momentum", pa.float32()),
        ("direction", pa.list_(pa.float32(), 3)),
        ("vertex", pa.list_(pa.float32(), 3)),
    ]
)


class Instance(BaseModel):
    id: int = Field(description="the instance's id in `instance` (0 = the highest score)")
    class_id: int = Field(description="its class (index into `classes`)")
    class_name: str
    confidence: float = Field(description="class probability x mean mask probability")
    points: int = Field(description="points assigned to it")
    momentum: float | None = Field(None, description="|p| in MeV/c (a head with regression outputs)")
    direction: list[float] | None = Field(None, description="unit vector the particle starts along")
    vertex: list[float] | None = Field(None, description="where it starts, in voxel coordinates")


class TaskInstances(BaseModel):
    instance: list[int] = Field(description="instance id per point; -1: none (stuff, unclaimed, below threshold)")
    instance_class: list[int] = Field(description="the class of the point's instance; -1: none")
    classes: list[str] = Field(description="the task's instance classes")
    instances: list[Instance]


def _values(values: dict | None) -> dict:
    """An instance's regression outputs as the `instances` struct holds them (None where the head has none)."""
    values = values or {}
    as_list = lambda k: None if k not in values else [float(x) for x in values[k]]  # noqa: E731
    m = values.get("momentum")
    return {"momentum": None if m is None else float(m), "direction": as_list("direction"), "vertex": as_list("vertex")}


def _regressed(got: EventInstances, i: int) -> dict:
    """An instance's momentum / direction / vertex, as JSON numbers, when its head has regression outputs."""
    return {k: (float(v) if k == "momentum" else [float(x) for x in v]) for k, v in got.values.get(i, {}).items()}


class InstancesOutput(Output):
    name = "instances"
    field = "instances"
    description = "a panoptic model's instances per task (particle: with its PID; interaction)"
    response_model = dict[str, TaskInstances]

    def __init__(self, seg, loc):
        super().__init__(seg, loc)
        record = seg.record
        self.tasks = list(record.instances or {})
        # per task, the regression outputs of its head (momentum, direction, vertex), if any
        self.regress = {t: (v["decoder"].get("regress") or []) for t, v in record.instances.items()}
        self.needs_particles = any(self.regress.values())
        self.postprocess = PostprocessConfig(**(record.postprocess or {}))

    @classmethod
    def fields(cls, record) -> list[tuple[str, pa.DataType]]:
        out = []
        for t in record.instances or {}:
            ids, cls_col = INSTANCE_COLUMNS[t]
            out.append((ids, pa.list_(pa.int32())))
            if cls_col:
                out.append((cls_col, pa.list_(pa.int8())))
        return out + [("instances", pa.list_(INSTANCE_ITEM))]

    @classmethod
    def merge(cls, record, states: list) -> dict:
        parts: dict[str, list[InstanceScores]] = {}
        for state in states:
            for t, s in state.items():
                parts.setdefault(t, []).append(InstanceScores.from_state(s))
        return {t: InstanceScores.merged(p).result() for t, p in parts.items()}

    def forward(self, x: dict, batch: dict):
        return self.seg.model(x, batch["offset"].to(self.seg.device))

    def events(self, raw, x: dict, batch: dict, kept: list[np.ndarray]) -> list[dict]:
        pre = self.seg.preprocess
        bounds = [0, *batch["offset"].tolist()]
        out = []
        for j, keep in enumerate(kept):
            a, b = bounds[j], bounds[j + 1]
            per_task = {}
            for t in self.tasks:
                res, stuff = raw[t][j]["layers"][-1], raw[t][j]["stuff"].cpu()
                got = postprocess_event(res["class"].cpu(), res["mask"].cpu(), stuff, self.postprocess)
                full = np.full(len(keep), -1, np.int64)
                full_cls = np.full(len(keep), -1, np.int64)
                full[keep], full_cls[keep] = got.instance.numpy(), got.instance_class.numpy()
                values = {}
                if self.regress.get(t) and "regress" in res:
                    coord = batch["coord"][a:b].numpy()
                    raw_values = res["regress"].float().cpu().numpy()
                    values = decode_regression(raw_values, got, coord, self.regress[t], (pre.center, pre.scale))
                per_task[t] = EventInstances(
                    torch.from_numpy(full),
                    torch.from_numpy(full_cls),
                    got.classes,
                    got.confidence,
                    got.points,
                    got.queries,
                    values,
                )
            out.append(per_task)
        return out

    def empty(self, n_points: int) -> dict:
        none = torch.full((n_points,), -1, dtype=torch.long)
        return {t: EventInstances(none, none.clone(), [], [], []) for t in self.tasks}

    def columns(self, results: list[dict]) -> dict[str, pa.Array]:
        cols = {}
        for t in self.tasks:
            ids, cls = INSTANCE_COLUMNS[t]
            cols[ids] = points_list([e[t].instance.numpy() for e in results], np.int32)
            if cls:
                cols[cls] = points_list([e[t].instance_class.numpy() for e in results], np.int8)
        first = self.tasks[0]
        cols["instances"] = pa.array(
            [
                [
                    {"id": i, "class": c, "confidence": f, "points": n, **_values(e[first].values.get(i))}
                    for i, (c, f, n) in enumerate(
                        zip(e[first].classes, e[first].confidence, e[first].points, strict=True)
                    )
                ]
                for e in results
            ],
            pa.list_(INSTANCE_ITEM),
        )
        return cols

    def to_json(self, result: dict) -> dict:
        out = {}
        for task in self.tasks:
            got, names = result[task], self.seg.record.instances[task]["classes"]
            out[task] = {
                "instance": got.instance.tolist(),
                "instance_class": got.instance_class.tolist(),
                "classes": names,
                "instances": [
                    {"id": i, "class_id": c, "class_name": names[c], "confidence": f, "points": n, **_regressed(got, i)}
                    for i, (c, f, n) in enumerate(zip(got.classes, got.confidence, got.points, strict=True))
                ],
            }
        return out

    def score(self, raw, x: dict, batch: dict, pre: pa.Table) -> dict:
        det = self.seg.detector
        states = {}
        for t in self.tasks:
            scores = InstanceScores(instance_classes(det, t))
            score_events(scores, raw[t], batch, t, det.stuff_class, self.postprocess)
            states[t] = scores.state()
        return states
