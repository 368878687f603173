"""Inference with an exported segmentation model: `raysvc predict`, `raysvc evaluate` and the Serve endpoint.

Predictions cover every point of every input event. Preprocessing is the training code with two differences that
inference needs: no event is cut for having few points, and points at or below the energy threshold, which the
model never saw, get the class -1. What an export predicts beyond a class per point comes from its output adapters
(inference/outputs): the segmenter runs them and never branches on a head.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from raysvc.data.contract.detectors import detector_names, get_detector
from raysvc.data.contract.schema import LABEL_FIELDS, WrongDetector, flat_values, table_from_events, validate_table
from raysvc.data.streaming.collate import collate_packed
from raysvc.data.streaming.transforms import preprocess_table
from raysvc.hub import read_model
from raysvc.inference.featurize import model_inputs, usable_device
from raysvc.inference.outputs import Output, get_output
from raysvc.inference.record import output_names
from raysvc.storage import Location


class Segmenter:
    """An exported model ready for inference (eval mode, no gradients): a class per point, and what its outputs
    (`record.outputs`, adapters in inference/outputs) add per event."""

    def __init__(self, loc: Location, device: str | torch.device = "cpu"):
        device = usable_device(device)
        state, self.record = read_model(loc)  # a raysvc export, or a pimm / Sonata model that states its preprocessing
        self.model = self.record.build()
        self.model.load_state_dict(state)
        self.model.eval().to(device)
        self.device = torch.device(device)
        # classify every event; bad input is an error
        self.preprocess = self.record.preprocess.model_copy(
            update={"min_points": 1, "remove_led": False, "on_bad": "error"}
        )
        self.grid_voxels = self.record.model.grid_voxels
        self.center_events = self.record.model.center_events
        self.class_names = list(self.record.class_names)
        self.detector = get_detector(self.record.detector)
        self.model_id = loc.uri
        self.outputs: list[Output] = [get_output(name)(self, loc) for name in output_names(self.record, loc)]
        owners = [o.name for o in self.outputs if type(o).forward is not Output.forward]
        if len(owners) > 1:
            raise ValueError(f"{loc.uri}: outputs {owners} each run the network; an export can have one such")

    def point_logits(self, batch: dict) -> tuple[torch.Tensor, dict]:
        """(logits of every point of a packed batch, the model inputs): grid sampling, forward, cells -> points. The
        raw batch results of the outputs go into the inputs' dict as "outputs" {name: raw}."""
        pre = self.preprocess
        x = model_inputs(batch, pre.center, pre.scale, self.grid_voxels, self.device, self.center_events)
        x["outputs"] = {}
        logits = None
        for o in self.outputs:
            got = o.forward(x, batch)
            if got is not None:
                logits, x["outputs"][o.name] = got
        if logits is None:
            logits = self.model(x["feat"], x["coord"], x["grid_coord"], x["offset"])[x["inverse"]]
        return logits, x

    @torch.no_grad()
    def predict(self, table: pa.Table, source: str = "request", probabilities: bool = False) -> list[dict]:
        """Per event {"pred": int8 classes aligned with the input points (-1: at or below the energy threshold, which
        the model never saw), each output's name: its result}; with `probabilities`, also "prob": (n, classes)
        float32 softmax rows (NaN below the threshold)."""
        lengths = table.column("num_points").to_numpy().astype(np.int64)
        keep = flat_values(table, "energy") > self.preprocess.energy_threshold
        pre, _ = preprocess_table(table, self.preprocess, source, detector=self.detector)
        kept = np.split(keep, np.cumsum(lengths)[:-1])
        out = [{"pred": np.full(n, -1, np.int8)} for n in lengths]
        for o, n in zip(out, lengths, strict=True):
            if probabilities:
                o["prob"] = np.full((n, len(self.class_names)), np.nan, np.float32)
            o.update({r.name: r.empty(int(n)) for r in self.outputs})
        if not pre.num_rows:
            return out
        batch = collate_packed(pre)
        logits, x = self.point_logits(batch)
        pred = logits.argmax(1).to(torch.int8).cpu().numpy()
        prob = torch.softmax(logits.float(), 1).cpu().numpy() if probabilities else None
        bounds = [0, *batch["offset"].tolist()]
        rows = [i for i, k in enumerate(kept) if k.any()]  # preprocessing keeps the events with points, in order
        for j, i in enumerate(rows):
            out[i]["pred"][kept[i]] = pred[bounds[j] : bounds[j + 1]]
            if probabilities:
                out[i]["prob"][kept[i]] = prob[bounds[j] : bounds[j + 1]]
        for o in self.outputs:
            for i, res in zip(rows, o.events(x["outputs"].get(o.name), x, batch, [kept[i] for i in rows]), strict=True):
                out[i][o.name] = res
        return out

    def predict_table(
        self, table: pa.Table, source: str = "request", probabilities: bool = False
    ) -> list[np.ndarray] | tuple[list[np.ndarray], list[np.ndarray]]:
        """Per-event int8 class arrays aligned with the input points (-1: below the energy threshold); with
        `probabilities`, also per-event (n, classes) float32 softmax rows (NaN below the threshold)."""
        events = self.predict(table, source, probabilities)
        classes = [e["pred"] for e in events]
        return (classes, [e["prob"] for e in events]) if probabilities else classes

    def _events_table(self, events: list[tuple], source: str) -> pa.Table:
        """Events given as (points, energies) or (points, energies, times or None) -> an event table of this model's
        detector (times only where given)."""
        recs = []
        for i, ev in enumerate(events):
            p, e, t = (*ev, None)[:3]
            rec = {"event_id": i, "coord": p, "energy": e, **{f: np.zeros(len(e), np.int8) for f in LABEL_FIELDS}}
            if t is not None:
                rec["time"] = t
            recs.append(rec)
        return table_from_events(recs, source, self.detector.name)

    def check_detector(self, detector: str | None, times_given: bool = False) -> None:
        """An event said to be from `detector` (None: from this model's) with or without hit times: WrongDetector
        naming both detectors when it is another detector's, or when it brings times this detector has none of."""
        if detector is not None and detector != self.detector.name:
            names = detector_names()
            what = f"a {detector} event" if detector in names else f"an event of unknown detector {detector!r}"
            raise WrongDetector(
                f"detector mismatch: the model {self.model_id} serves {self.detector.name} events, this request is "
                f"{what} (detectors: {', '.join(names)}); send it to a model trained on {detector} events"
            )
        if times_given and not self.detector.has_time:
            raise WrongDetector(f"times: {self.detector.name} events carry no hit times; send points and energies only")

    def check_dataset(self, manifest, data: Location) -> None:
        """A dataset of another detector's events is an error naming both, before any event is read."""
        if manifest.detector != self.detector.name:
            raise ValueError(
                f"{data.uri} holds {manifest.detector} events; the model {self.model_id} was trained on "
                f"{self.detector.name} events"
            )

    def check_event(
        self, points: np.ndarray, energies: np.ndarray, source: str = "request", times: np.ndarray | None = None
    ) -> None:
        """The data contract's checks on one event; EventDataError (naming the field) when it breaks one (a water
        Cherenkov event without times breaks the contract's `time` rule)."""
        validate_table(
            self._events_table([(points, energies, times)], source),
            source,
            row_base=None,
            detector=self.detector,
            volume=self.preprocess.volume,
        )

    def predict_events(self, events: list[tuple], probabilities: bool = False, source: str = "request"):
        """`predict_table` on events given as (points (n, 3) in the detector's units, energies (n,)) or (points,
        energies, hit times (n,) or None). They pass the same data-contract checks as a shard (EventDataError names
        the event's position and the field); the label columns the contract requires are zero-filled, as inference
        never reads them."""
        return self.predict_table(self._events_table(events, source), source, probabilities)

    def predict_events_full(self, events: list[tuple], probabilities: bool = False, source: str = "request"):
        """`predict` (classes, probabilities and every output's result per event) on events given as
        `predict_events` takes them."""
        return self.predict(self._events_table(events, source), source, probabilities)
