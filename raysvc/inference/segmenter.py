"""Inference with an exported segmentation model: `raysvc predict`, `raysvc evaluate` and the Serve endpoint.

Predictions cover every point of every input event. Preprocessing is the training code with two differences that
inference needs: no event is cut for having few points, and points at or below the energy threshold, which the
model never saw, get the class -1. Output: one Parquet file per input shard with `event_id`, `num_points` and
`pred` (list<int8>, aligned with the input's `coord`).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from raysvc.data.contract.detectors import DETECTORS, get_detector
from raysvc.data.contract.schema import LABEL_FIELDS, WrongDetector, flat_values, table_from_events, validate_table
from raysvc.data.streaming.collate import collate_packed
from raysvc.data.streaming.transforms import preprocess_table
from raysvc.inference.event_metrics import PID_CLASSES, RING_CLASSES
from raysvc.inference.featurize import model_inputs, usable_device
from raysvc.inference.instances import EventInstances, PostprocessConfig, decode_regression, postprocess
from raysvc.inference.record import load_event_heads, load_export
from raysvc.models.event_heads import EventHeads
from raysvc.storage import Location


class Segmenter:
    """An exported model ready for inference (eval mode, no gradients)."""

    def __init__(self, loc: Location, device: str | torch.device = "cpu"):
        device = usable_device(device)
        state, self.record = load_export(loc)
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
        self.instance_tasks = list(self.record.instances or {})  # a panoptic model's: particle, interaction
        # per task, the regression outputs of its head (momentum, direction, vertex), if any
        self.regress = {t: (v["decoder"].get("regress") or []) for t, v in (self.record.instances or {}).items()}
        self.postprocess = PostprocessConfig(**(self.record.postprocess or {}))
        # a `rings` export: ring-count and PID heads on the segmenter's features (water Cherenkov)
        heads = load_event_heads(loc)
        self.event_heads = None if heads is None else EventHeads.from_weights(self.model, heads).eval().to(device)

    def point_logits(self, batch: dict) -> tuple[torch.Tensor, dict]:
        """(logits of every point of a packed batch, the model inputs): grid sampling, forward, cells -> points. A
        panoptic model's instance-head outputs go into the inputs' dict as "instances" {task: per event}."""
        pre = self.preprocess
        x = model_inputs(batch, pre.center, pre.scale, self.grid_voxels, self.device, self.center_events)
        if self.instance_tasks:
            logits, x["instances"] = self.model(x, batch["offset"].to(self.device))
            return logits, x
        if self.event_heads is not None:  # one forward for the per-point classes and the event outputs
            logits, rings, pid = self.event_heads(x)
            x["events"] = {"rings": torch.softmax(rings.float(), 1), "pid": torch.softmax(pid.float(), 1)}
            return logits, x
        return self.model(x["feat"], x["coord"], x["grid_coord"], x["offset"])[x["inverse"]], x

    @torch.no_grad()
    def predict_panoptic(self, table: pa.Table, source: str = "request", probabilities: bool = False) -> list[dict]:
        """Per event {"pred": int8 classes, task: EventInstances} of a panoptic model, aligned with the input points:
        points at or below the energy threshold get class -1 and no instance. With `probabilities`, also "prob":
        (n, classes) float32 softmax rows (NaN below the threshold)."""
        if not self.instance_tasks:
            raise ValueError(f"{self.model_id} is a {self.record.kind} model: it predicts no instances")
        lengths = table.column("num_points").to_numpy().astype(np.int64)
        keep = flat_values(table, "energy") > self.preprocess.energy_threshold
        pre, _ = preprocess_table(table, self.preprocess, source, detector=self.detector)
        kept = np.split(keep, np.cumsum(lengths)[:-1])
        out = [{"pred": np.full(n, -1, np.int8)} for n in lengths]
        if probabilities:
            for o, n in zip(out, lengths, strict=True):
                o["prob"] = np.full((n, len(self.class_names)), np.nan, np.float32)
        if not pre.num_rows:
            return out
        batch = collate_packed(pre)
        logits, x = self.point_logits(batch)
        pred = logits.argmax(1).to(torch.int8).cpu().numpy()
        prob = torch.softmax(logits.float(), 1).cpu().numpy() if probabilities else None
        bounds = [0, *batch["offset"].tolist()]
        rows = [i for i, k in enumerate(kept) if k.any()]  # events with points above the threshold, in order
        for j, i in enumerate(rows):
            a, b = bounds[j], bounds[j + 1]
            out[i]["pred"][kept[i]] = pred[a:b]
            if probabilities:
                out[i]["prob"][kept[i]] = prob[a:b]
            for t in self.instance_tasks:
                res = x["instances"][t][j]["layers"][-1]
                got = postprocess(
                    res["class"].cpu(), res["mask"].cpu(), x["instances"][t][j]["stuff"].cpu(), self.postprocess
                )
                full = np.full(len(kept[i]), -1, np.int64)
                full_cls = np.full(len(kept[i]), -1, np.int64)
                full[kept[i]], full_cls[kept[i]] = got.instance.numpy(), got.instance_class.numpy()
                values = {}
                if self.regress.get(t) and "regress" in res:
                    coord = batch["coord"][a:b].numpy()
                    raw = res["regress"].float().cpu().numpy()
                    frame = (self.preprocess.center, self.preprocess.scale)
                    values = decode_regression(raw, got, coord, self.regress[t], frame)
                out[i][t] = EventInstances(
                    torch.from_numpy(full),
                    torch.from_numpy(full_cls),
                    got.classes,
                    got.confidence,
                    got.points,
                    got.queries,
                    values,
                )
        return out

    @torch.no_grad()
    def predict_table(
        self,
        table: pa.Table,
        source: str = "request",
        probabilities: bool = False,
    ) -> list[np.ndarray] | tuple[list[np.ndarray], list[np.ndarray]]:
        """Per-event int8 class arrays aligned with the input points (-1: below the energy threshold); with
        `probabilities`, also per-event (n, classes) float32 softmax rows (NaN below the threshold)."""
        classes, probs, _ = self.predict_with_events(table, source, probabilities)
        return (classes, probs) if probabilities else classes

    @torch.no_grad()
    def predict_with_events(
        self, table: pa.Table, source: str = "request", probabilities: bool = False
    ) -> tuple[list, list | None, list]:
        """(classes, probabilities or None, event outputs) per event; the event outputs are {"rings", "pid"}
        probability rows for a model with event heads (None for an event with no point above the threshold),
        otherwise None."""
        lengths = table.column("num_points").to_numpy().astype(np.int64)
        keep = flat_values(table, "energy") > self.preprocess.energy_threshold
        pre, _ = preprocess_table(table, self.preprocess, source, detector=self.detector)
        out_flat = np.full(int(lengths.sum()), -1, np.int8)
        prob_flat = np.full((int(lengths.sum()), len(self.class_names)), np.nan, np.float32) if probabilities else None
        events: list = [None] * len(lengths)
        if pre.num_rows:
            logits, x = self.point_logits(collate_packed(pre))
            out_flat[keep] = logits.argmax(1).to(torch.int8).cpu().numpy()
            if probabilities:
                prob_flat[keep] = torch.softmax(logits.float(), 1).cpu().numpy()
            if "events" in x:
                has_points = np.flatnonzero([k.any() for k in np.split(keep, np.cumsum(lengths)[:-1])])
                rings, pid = x["events"]["rings"].cpu().numpy(), x["events"]["pid"].cpu().numpy()
                for j, i in enumerate(has_points):  # preprocessing keeps the events with points, in order
                    events[i] = {"rings": rings[j], "pid": pid[j]}
        splits = np.cumsum(lengths)[:-1]
        probs = np.split(prob_flat, splits) if probabilities else None
        return np.split(out_flat, splits), probs, events

    def predict_events_with_heads(
        self, events: list[tuple], probabilities: bool = False, source: str = "request"
    ) -> list[tuple]:
        """(classes, probabilities or None, event outputs) per event of a model with event heads: the event
        outputs are {"rings": {"classes", "probabilities", "predicted"}, "pid": {...}} (None for an event with no
        point above the threshold). The ring and PID heads are trained on every event and on single-particle
        events respectively, so "pid" means something only for an event with one particle."""
        if self.event_heads is None:
            raise ValueError(f"{self.model_id} has no event heads ({self.record.kind} without event_heads.safetensors)")
        classes, probs, outs = self.predict_with_events(self._events_table(events, source), source, probabilities)
        named = []
        for o in outs:
            if o is None:
                named.append(None)
                continue
            named.append(
                {
                    task: {
                        "classes": list(names),
                        "probabilities": o[task].tolist(),
                        "predicted": names[int(np.argmax(o[task]))],
                    }
                    for task, names in (("rings", RING_CLASSES), ("pid", PID_CLASSES))
                }
            )
        return list(zip(classes, probs if probabilities else [None] * len(classes), named, strict=True))

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
            known = ", ".join(sorted(DETECTORS))
            what = f"a {detector} event" if detector in DETECTORS else f"an event of unknown detector {detector!r}"
            raise WrongDetector(
                f"detector mismatch: the model {self.model_id} serves {self.detector.name} events, this request is "
                f"{what} (detectors: {known}); send it to a model trained on {detector} events"
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

    def predict_events_panoptic(
        self, events: list[tuple], probabilities: bool = False, source: str = "request"
    ) -> list[dict]:
        """`predict_panoptic` on events given as `predict_events` takes them, checked as it checks them."""
        return self.predict_panoptic(self._events_table(events, source), source, probabilities)

    def predict_events(self, events: list[tuple], probabilities: bool = False, source: str = "request"):
        """`predict_table` on events given as (points (n, 3) in the detector's units, energies (n,)) or (points,
        energies, hit times (n,) or None). They pass the same data-contract checks as a shard (EventDataError names
        the event's position and the field); the label columns the contract requires are zero-filled, as inference
        never reads them."""
        return self.predict_table(self._events_table(events, source), source, probabilities)
