"""The output adapter: the inference half of a head. Every export predicts a class per point; a head that gives more
(instances, event classes, a regressed number) declares it here, once, and batch inference, the segmenter, the
endpoint, its OpenAPI schema and `raysvc evaluate` ask it instead of knowing the head.

It lives beside inference, not beside the head's training code, because serving never imports training: a built-in
head's adapter is a module of `inference/outputs/`, a plug-in's sits in the plug-in's own file next to its Task.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pyarrow as pa
import torch
from pydantic import BaseModel

from raysvc.storage import Location

if TYPE_CHECKING:  # the record and the segmenter import this module
    from raysvc.inference.record import ExportedModel
    from raysvc.inference.segmenter import Segmenter


def points_list(arrays: list[np.ndarray], dtype) -> pa.Array:
    """Per-event arrays -> one list column (what every per-point predict column is)."""
    lengths = np.array([len(a) for a in arrays], np.int32)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    flat = pa.array(np.concatenate(arrays).astype(dtype) if arrays else np.zeros(0, dtype))
    return pa.ListArray.from_arrays(offsets, flat)


class Output:
    """One kind of extra output of an export, named in its record's `outputs`.

    Class level (no model loaded; what a predictions file, a manifest and the OpenAPI schema need):
    `name`, `field` (the endpoint's response key), `response_model` (its OpenAPI schema; None: free-form),
    `description`, `fields(record)` (the predict columns), `manifest(record)` (keys for the predict manifest),
    `merge(record, states)` (`raysvc evaluate`'s keys from the per-chunk states).

    Instance level (`__init__(seg, loc)` with the export's segmenter loaded): `forward` (at most one output per
    export replaces the segmenter's forward), `events` (the per-event results of a batch), `empty` (the result of
    an event with no point above the threshold), `columns` (predict columns of a chunk), `to_json` (the response
    field of one event), `score` (a chunk's evaluation state), `model_info` (keys for /v1/models).
    """

    name: ClassVar[str]
    field: ClassVar[str]
    description: ClassVar[str] = ""
    response_model: ClassVar[type[BaseModel] | None] = None
    needs_particles: ClassVar[bool] = False  # evaluation reads the events' `particles` truth

    def __init__(self, seg: Segmenter, loc: Location):
        self.seg = seg

    # --- class level ---
    @classmethod
    def fields(cls, record: ExportedModel) -> list[tuple[str, pa.DataType]]:
        """The columns this output adds to a predictions shard, after `event_id`, `num_points`, `pred`."""
        return []

    @classmethod
    def manifest(cls, record: ExportedModel) -> dict:
        """Keys this output adds to the predictions' manifest.json (what its columns' numbers mean)."""
        return {}

    @classmethod
    def merge(cls, record: ExportedModel, states: list[Any]) -> dict:
        """`raysvc evaluate`'s keys for this output from its `score` states of every chunk."""
        return {}

    # --- with the model loaded ---
    def forward(self, x: dict, batch: dict) -> tuple[torch.Tensor, Any] | None:
        """(per-point logits, this output's raw batch result) when this output runs the network itself; None: the
        segmenter's own forward, and `events` reads what it needs from `x`."""
        return None

    def events(self, raw: Any, x: dict, batch: dict, kept: list[np.ndarray]) -> list:
        """One result per event of the batch (the events with a point above the threshold, in order); `kept[j]`
        marks which of event j's input points reached the model."""
        raise NotImplementedError

    def empty(self, n_points: int) -> Any:
        """The result of an event none of whose `n_points` points reached the model."""
        return None

    def columns(self, results: list) -> dict[str, pa.Array]:
        """This output's predict columns (as `fields` names them) from the results of a chunk's events."""
        return {}

    def to_json(self, result: Any) -> Any:
        """The response field of one event (None: the field is left out)."""
        return result

    def score(self, raw: Any, x: dict, batch: dict, pre: pa.Table) -> Any:
        """This output's evaluation state of one labelled chunk (JSON-serialisable; `merge` combines them)."""
        return None

    def model_info(self) -> dict:
        """Keys this output adds to its model's entry in /v1/models."""
        return {}
