"""Reference preprocessing on Arrow event tables, vectorised over flat list values (no per-event Python loop).

Same code for training (inside Ray Data tasks), the direct reader and serving. The coordinate frame (centre, scale,
volume) and the cuts (energy threshold, minimum points, Emax of the log scale) are the dataset's detector's unless a
job sets them: a PreprocessConfig leaves them None until `resolved` against the detector that the manifest (or an
export's record) names. LArTPC's are Panda's (docs/methods.md, "Data"): threshold 0.13, min 1024 points, log-energy
with m = 0.01 and Emax = 20 into [-1, 1] (not clipped above Emax, so the rare very dense voxel keeps its information),
centre 384, scale 768*sqrt(3)/2, volume 768.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field

from raysvc.data.contract.detectors import LARTPC, Detector
from raysvc.data.contract.schema import (
    EVENT_SCHEMA,
    OPTIONAL_POINT_FIELDS,
    POINT_FIELDS,
    EventDataError,
    check_columns,
    find_problems,
    flat_coords,
    flat_values,
)


class PreprocessConfig(BaseModel):
    """Cuts and normalisation applied to every event before it reaches a model. The fields left None take the
    dataset's detector's values (`resolved`); a value set here wins."""

    model_config = ConfigDict(extra="forbid")
    energy_threshold: float | None = Field(
        None, ge=0, description="drop points with energy <= this (the detector's energy unit); None: the detector's"
    )
    min_points: int | None = Field(
        None, ge=1, description="drop events with fewer points after the cuts; None: the detector's"
    )
    remove_led: bool = Field(
        False, description="drop the detector's stuff class, LArTPC's class-4 low-energy depositions (PoLAr-MAE does)"
    )
    center: float | None = Field(None, description="coordinate centre (the detector's units); None: the volume's")
    scale: float | None = Field(None, gt=0, description="coordinate scale; None: the detector's (LArTPC: unit sphere)")
    log_m: float = Field(0.01, gt=0)
    log_emax: float | None = Field(None, gt=0, description="energy mapped to 1 by the log scale; None: the detector's")
    volume: float | None = Field(
        None, gt=0, description="coordinates must lie in [0, volume); None: the detector's extent"
    )
    time_scale_ns: float = Field(50.0, gt=0, description="hit times: log1p(t / this) after the event's first hit")
    time_cap_ns: float = Field(4000.0, gt=0, description="hit times later than this after the first map to 1")
    on_bad: Literal["error", "skip"] = Field("error", description="bad events: raise, or skip and count")

    def resolved(self, detector: Detector) -> PreprocessConfig:
        """This config with every field left None set to `detector`'s value (Detector.preprocess_fields); itself when
        nothing is left to fill, so resolving twice is free."""
        fill = {k: v for k, v in detector.preprocess_fields().items() if getattr(self, k) is None}
        return self.model_validate({**self.model_dump(), **fill}) if fill else self


def check_geometry(cfg: PreprocessConfig, detector: Detector) -> None:
    """The preprocessing's volume is the detector's: a model would otherwise see another detector's coordinates
    squeezed into its frame (a water Cherenkov dataset read with LArTPC's volume). The error says what to set."""
    volume = cfg.resolved(detector).volume
    if volume != detector.extent:
        raise ValueError(
            f"preprocess.volume is {volume:g} but detector {detector.name!r} spans [0, {detector.extent:g}); leave "
            f"preprocess.center, scale and volume unset (the detector's: {detector.center:g}, {detector.scale:g}, "
            f"{detector.extent:g}) or set them for this detector"
        )


def normalize_coord(xyz: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    return ((xyz - cfg.center) / cfg.scale).astype(np.float32)


def log_energy(e: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    m = cfg.log_m
    lo, hi = math.log10(m), math.log10(cfg.log_emax + m)
    return (2.0 * (np.log10(e + m) - lo) / (hi - lo) - 1.0).astype(np.float32)


def log_time(t: np.ndarray, row_of_point: np.ndarray, n_rows: int, cfg: PreprocessConfig) -> np.ndarray:
    """Hit times into [-1, 1]: after each event's first hit, log1p(dt / time_scale_ns) over that of time_cap_ns
    (later hits are capped), so that the prompt light keeps its ns resolution and late light still registers."""
    first = np.full(n_rows, np.inf)
    np.minimum.at(first, row_of_point, t)
    dt = np.clip(t - first[row_of_point], 0, cfg.time_cap_ns)
    scaled = np.log1p(dt / cfg.time_scale_ns) / math.log1p(cfg.time_cap_ns / cfg.time_scale_ns)
    return (2.0 * scaled - 1.0).astype(np.float32)


def _rebuild_lists(
    table: pa.Table,
    point_mask: np.ndarray,
    lengths: np.ndarray,
    replace: dict[str, np.ndarray],
) -> pa.Table:
    """Keep masked points of every per-point list column; `replace` gives new flat values for some columns."""
    row_of_point = np.repeat(np.arange(len(lengths)), lengths)
    new_len = np.bincount(row_of_point[point_mask], minlength=len(lengths)).astype(np.int32)
    offsets = pa.array(np.concatenate([[0], np.cumsum(new_len)]).astype(np.int32))
    idx = pa.array(np.flatnonzero(point_mask))
    for name in POINT_FIELDS:
        col = table.column(name).combine_chunks()
        if name in replace:
            flat = replace[name]
            values = (
                pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), 3) if name == "coord" else pa.array(flat)
            )
        else:
            values = col.flatten().take(idx)
        table = table.set_column(table.schema.get_field_index(name), name, pa.ListArray.from_arrays(offsets, values))
    for name in OPTIONAL_POINT_FIELDS:
        if name not in table.column_names:
            continue
        col = table.column(name).combine_chunks()
        if col.null_count == len(col):  # no such values in these events: the column stays null
            continue
        if col.null_count:  # a dataset holds the column for all of its events or for none (find_problems)
            raise ValueError(f"{name}: null for some events only; cannot cut points of the others")
        values = pa.array(replace[name]) if name in replace else col.flatten().take(idx)
        field = table.schema.field(name)
        table = table.set_column(
            table.schema.get_field_index(name),
            field,
            pa.ListArray.from_arrays(offsets, values.cast(field.type.value_type)),
        )
    return table.set_column(table.schema.get_field_index("num_points"), "num_points", pa.array(new_len))


def preprocess_table(
    table: pa.Table,
    cfg: PreprocessConfig,
    shard: str,
    keep_ids: np.ndarray | None = None,
    row_base: int | None = None,
    detector: Detector = LARTPC,
) -> tuple[pa.Table, Counter]:
    """Validate, cut, normalise. Returns the model-ready table and a Counter of what was removed and why.

    `detector` is the dataset's (its manifest's): it fills the fields `cfg` leaves unset, events whose `detector`
    column names another are bad input, and `remove_led` drops its stuff class (and renumbers the semantic labels
    into `detector.label_classes(True)`).
    Counter keys: `selected_out` (not in the label subset), `bad:<kind>` (bad input skipped under on_bad=skip),
    `cut:min_points` (too few points after the cuts: a physics cut, not an error).
    """
    if cfg.remove_led and detector.stuff_class is None:
        raise ValueError(f"remove_led: detector {detector.name!r} has no stuff class to remove")
    cfg = cfg.resolved(detector)
    check_geometry(cfg, detector)
    counts: Counter = Counter(read=table.num_rows)
    if keep_ids is not None:
        sel = pc.is_in(table.column("event_id"), value_set=pa.array(keep_ids, pa.int64()))
        counts["selected_out"] = table.num_rows - int(pc.sum(sel).as_py() or 0)
        table = table.filter(sel)
    if table.num_rows == 0:
        return table, counts
    try:
        table = check_columns(table, shard)
    except EventDataError as e:
        if cfg.on_bad == "error":
            raise
        counts[f"bad:{e.kind}"] += table.num_rows
        return table.slice(0, 0), counts
    problems = find_problems(table, detector=detector, volume=cfg.volume)
    if problems:
        if cfg.on_bad == "error":
            p = problems[0]
            raise EventDataError(
                shard,
                p.message,
                row=None if row_base is None else row_base + p.row,
                event_id=p.event_id,
                field=p.field,
                kind=p.kind,
            )
        bad_rows = np.array([p.row for p in problems])
        counts.update(f"bad:{p.kind}" for p in problems)
        keep = np.ones(table.num_rows, bool)
        keep[bad_rows] = False
        table = table.filter(pa.array(keep))
    lengths = table.column("num_points").to_numpy().astype(np.int64)
    energy = flat_values(table, "energy")
    mask = energy > cfg.energy_threshold
    replace = {}
    if cfg.remove_led:
        sem = flat_values(table, "semantic")
        mask &= sem != detector.stuff_class
        # the labels of a model without the stuff class are 0 .. C-2 (Detector.label_classes): the classes after
        # the stuff class move down by one
        kept = sem[mask]
        replace["semantic"] = (kept - (kept > detector.stuff_class)).astype(kept.dtype)
    xyz = flat_coords(table)
    replace["coord"] = normalize_coord(xyz[mask], cfg)
    replace["energy"] = log_energy(energy[mask], cfg)
    if detector.has_time:
        row_of_point = np.repeat(np.arange(len(lengths)), lengths)[mask]
        replace["time"] = log_time(flat_values(table, "time")[mask], row_of_point, len(lengths), cfg)
    table = _rebuild_lists(table, mask, lengths, replace)
    enough = table.column("num_points").to_numpy() >= cfg.min_points
    counts["cut:min_points"] += int((~enough).sum())
    table = table.filter(pa.array(enough))
    counts["out"] += table.num_rows
    return table.select([f.name for f in EVENT_SCHEMA if f.name in table.column_names]), counts


def report(counts: Counter) -> dict:
    """A summary of what was read and what was removed, and why: nothing disappears silently."""
    bad = {k.split(":", 1)[1]: v for k, v in counts.items() if k.startswith("bad:") and v}
    return {
        "events_read": counts.get("read", 0),
        "selected_out": counts.get("selected_out", 0),
        "skipped_bad": bad,
        "skipped_bad_total": sum(bad.values()),
        "cut_min_points": counts.get("cut:min_points", 0),
        "events_out": counts.get("out", 0),
        "task_seconds": {k.split(":", 1)[1]: round(v, 4) for k, v in counts.items() if k.startswith("seconds:")},
    }
