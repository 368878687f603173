"""Interactive event display (`raysvc display`): one self-contained HTML file (plotly.js inline, nothing fetched)
with the first N events of a dataset, optionally beside `raysvc predict`'s output. The page's own script
(display_page.html) builds the plotly traces from the events embedded as JSON, so that switching the colouring (truth,
prediction, error, instances, energy, time) or the event is a redraw in the browser, not a trace per choice in the
file. A water Cherenkov event also gets its tank unrolled (display_tank.unroll)."""

from __future__ import annotations

import json
from importlib.resources import files

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raysvc.data.contract.detectors.base import Detector
from raysvc.data.contract.schema import flat_coords, flat_values
from raysvc.data.streaming.shards import load_manifest, read_shard
from raysvc.storage import Location, explained, read_bytes, write_bytes_atomic

MAX_POINTS = 20_000  # per event: more makes the 3D view sluggish and the file tens of MB
SEED = 0


def _preds_tables(preds: Location, shards: int) -> list[pa.Table]:
    """`raysvc predict`'s files in shard order (its preds-NNNNN.parquet mirror the dataset's shards one to one)."""
    manifest = json.loads(read_bytes(preds.join("manifest.json")))
    names = manifest["files"]
    if len(names) != shards:
        raise ValueError(f"{preds.uri}: {len(names)} prediction files for a dataset of {shards} shards")
    out = []
    for name in names:
        loc = preds.join(name)
        with explained(loc, "reading"):
            out.append(pq.read_table(pa.BufferReader(read_bytes(loc))))
    return out


def _rounded(a: np.ndarray, digits: int = 2) -> list:
    return np.round(a.astype(np.float64), digits).tolist()  # float32 -> JSON without 7 digits of noise


def _event_json(row: pa.Table, pred: dict | None, detector: Detector, cap: int, rng: np.random.Generator) -> dict:
    xyz = flat_coords(row)
    n = len(xyz)
    # a seeded subsample, kept in input order so that the points match the shard's (and the predictions') order
    keep = np.sort(rng.choice(n, cap, replace=False)) if n > cap else np.arange(n)
    ev: dict = {
        "id": int(row.column("event_id")[0].as_py()),
        "total": n,
        "x": _rounded(xyz[keep, 0]),
        "y": _rounded(xyz[keep, 1]),
        "z": _rounded(xyz[keep, 2]),
        "energy": _rounded(flat_values(row, "energy")[keep], 3),
    }
    for col in ("semantic", "particle", "interaction", "pid"):
        ev[col] = flat_values(row, col)[keep].astype(np.int64).tolist()
    if detector.has_time and "time" in row.column_names and row.column("time").null_count == 0:
        ev["time"] = _rounded(flat_values(row, "time")[keep], 2)
    if detector.cylinder is not None:
        from raysvc.data.tools.display_tank import unroll

        flat, _ = unroll(xyz[keep], detector)
        flat = flat * detector.unit_mm / 1000  # metres, as display_tank draws it
        ev["u"], ev["v"] = _rounded(flat[:, 0], 3), _rounded(flat[:, 1], 3)
    if pred is not None:
        if pred["event_id"] != ev["id"] or pred["num_points"] != n:
            raise ValueError(
                f"predictions do not match the dataset: event {ev['id']} ({n} points) against predicted event "
                f"{pred['event_id']} ({pred['num_points']} points)"
            )
        ev["pred"] = np.asarray(pred["pred"], np.int64)[keep].tolist()
        for src, dst in (("instance", "pred_particle"), ("interaction", "pred_interaction")):
            if pred.get(src) is not None:
                ev[dst] = np.asarray(pred[src], np.int64)[keep].tolist()
    return ev


def build_display(
    data: Location,
    out: Location,
    events: int = 5,
    predictions: Location | None = None,
    max_points: int = MAX_POINTS,
    seed: int = SEED,
) -> dict:
    """Write the HTML display of the first `events` events of `data` to `out`; returns what it drew (per event: id,
    points in the event, points drawn)."""
    if events <= 0 or max_points <= 0:
        raise ValueError(f"events ({events}) and max_points ({max_points}) must be positive")
    manifest = load_manifest(data)
    detector = manifest.detector_spec
    preds = _preds_tables(predictions, len(manifest.shards)) if predictions is not None else None
    rng = np.random.default_rng(seed)
    chosen: list[dict] = []
    for i, rec in enumerate(manifest.shards):
        if len(chosen) >= events or not rec.events:
            continue
        table = read_shard(data, rec)
        if preds is not None and preds[i].num_rows != table.num_rows:
            raise ValueError(f"{predictions.uri}: {preds[i].num_rows} predicted events for {rec.name}'s {rec.events}")
        for r in range(min(table.num_rows, events - len(chosen))):
            pred = preds[i].slice(r, 1).to_pylist()[0] if preds is not None else None
            chosen.append(_event_json(table.slice(r, 1), pred, detector, max_points, rng))
    if not chosen:
        raise ValueError(f"{data.uri}: no events to display")
    meta = {
        "source": data.uri,
        "predictions": predictions.uri if predictions is not None else None,
        "detector": detector.name,
        "classes": list(detector.class_names),
        "colors": list(detector.class_colors),
        "pids": list(detector.labels["pid"].classes) if "pid" in detector.labels else [],
        "length_unit": detector.length_unit,
        "energy_unit": detector.feature_units[0] if detector.feature_units else "",
        "cylinder": [float(v) * detector.unit_mm / 1000 for v in detector.cylinder] if detector.cylinder else None,
        "cap": max_points,
        "seed": seed,
    }
    write_bytes_atomic(out, render(meta, chosen).encode())
    return {"out": out.uri, "events": [{"id": e["id"], "points": e["total"], "drawn": len(e["x"])} for e in chosen]}


def _script_json(obj) -> str:
    """JSON safe inside a <script> element: no `</script>` or `<!--` can close or confuse it."""
    return json.dumps(obj, separators=(",", ":")).replace("<", "\\u003c")


def render(meta: dict, events: list[dict]) -> str:
    from plotly.offline import get_plotlyjs

    page = files("raysvc.data.tools").joinpath("display_page.html").read_text()
    # plain replacement, not str.format: the page is full of braces
    return (
        page.replace("/*PLOTLY_JS*/", get_plotlyjs())
        .replace("/*META*/null", _script_json(meta))
        .replace("/*EVENTS*/null", _script_json(events))
    )
