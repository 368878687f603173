"""The event heads of a water Cherenkov export (task `rings`): the number of rings (1R, 2R, >=3R) and the particle
type of a single-particle event (electron, muon, pi0), from heads on the segmenter's pooled features kept in
`event_heads.safetensors` beside its weights.

Predict columns per event: `rings` / `pid` (the predicted class; -1 for an event with no hit above the threshold)
and `ring_probs` / `pid_probs`, their meaning in the manifest's `event_classes`; the response field `event`;
`raysvc evaluate` the ring-count confusion and the PID working points, as the training run's validation reports them.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch
from pydantic import BaseModel, Field

from raysvc.inference.event_metrics import PID_CLASSES, RING_CLASSES, event_labels, event_scores
from raysvc.inference.outputs.base import Output
from raysvc.inference.record import load_event_heads
from raysvc.models.event_heads import EventHeads

HEADS = {"rings": RING_CLASSES, "pid": PID_CLASSES}
COLUMNS = {"rings": ("rings", "ring_probs"), "pid": ("pid", "pid_probs")}  # head -> (class column, probabilities)


class EventTask(BaseModel):
    classes: list[str]
    probabilities: list[float] = Field(description="softmax over `classes`")
    predicted: str


class EventOutputs(BaseModel):
    rings: EventTask = Field(description="number of rings: 1R, 2R, >=3R")
    pid: EventTask = Field(description="particle type, meaningful for a single-particle event: electron, muon, pi0")


class EventHeadsOutput(Output):
    name = "event_heads"
    field = "event"
    description = "a model with event heads (task rings, water Cherenkov): ring count and PID of the event"
    response_model = EventOutputs

    def __init__(self, seg, loc):
        super().__init__(seg, loc)
        weights = load_event_heads(loc)
        if weights is None:
            raise FileNotFoundError(f"{loc.uri}: the record names event heads, but event_heads.safetensors is missing")
        self.heads = EventHeads.from_weights(seg.model, weights).eval().to(seg.device)

    @classmethod
    def fields(cls, record) -> list[tuple[str, pa.DataType]]:
        return [f for c, p in COLUMNS.values() for f in ((c, pa.int8()), (p, pa.list_(pa.float32())))]

    @classmethod
    def manifest(cls, record) -> dict:
        return {"event_classes": {k: list(v) for k, v in HEADS.items()}}

    @classmethod
    def merge(cls, record, states: list) -> dict:
        rows = [r for s in states for r in s]
        return event_scores(*(np.array(c) for c in zip(*rows, strict=True)) if rows else [np.zeros(0)] * 4)

    def forward(self, x: dict, batch: dict):
        """One forward for the per-point classes and the event outputs."""
        logits, rings, pid = self.heads(x)
        return logits, {"rings": torch.softmax(rings.float(), 1), "pid": torch.softmax(pid.float(), 1)}

    def events(self, raw, x: dict, batch: dict, kept: list[np.ndarray]) -> list[dict]:
        rings, pid = raw["rings"].cpu().numpy(), raw["pid"].cpu().numpy()
        return [{"rings": rings[j], "pid": pid[j]} for j in range(len(kept))]

    def columns(self, results: list) -> dict[str, pa.Array]:
        cols = {}
        for head, (cls, probs) in COLUMNS.items():
            rows = [None if r is None else r[head] for r in results]  # None: no hit above the threshold
            cols[cls] = pa.array([-1 if r is None else int(np.argmax(r)) for r in rows], pa.int8())
            cols[probs] = pa.array([None if r is None else r.tolist() for r in rows], pa.list_(pa.float32()))
        return cols

    def to_json(self, result) -> dict | None:
        """Per head its classes, probabilities and predicted class. The PID head is trained on single-particle
        events, so "pid" means something only for an event with one particle."""
        if result is None:
            return None
        return {
            head: {
                "classes": list(names),
                "probabilities": result[head].tolist(),
                "predicted": names[int(np.argmax(result[head]))],
            }
            for head, names in HEADS.items()
        }

    def score(self, raw, x: dict, batch: dict, pre: pa.Table) -> list:
        """(true ring class, predicted ring class, true PID class, electron score) per scored event: every event of
        `pre` passed the cuts, one output row each, in order."""
        ring, pid = event_labels(pre, tuple(self.seg.detector.labels["pid"].classes))
        ring_pred = raw["rings"].argmax(1).tolist()
        e_score = raw["pid"][:, PID_CLASSES.index("electron")].tolist()
        return list(zip(ring.tolist(), ring_pred, pid.tolist(), e_score, strict=True))

    def model_info(self) -> dict:
        return {"event_heads": True}
