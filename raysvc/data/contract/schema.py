"""The event table: one Parquet row per event, Arrow list columns, and its validation.

Validation is vectorised over the flat list values (no per-event Python loop) and, on the first problem, names the
shard, the row, the event id and the field.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raysvc.data.contract.detectors import DEFAULT_DETECTOR, LARTPC, Detector

SCHEMA_VERSION = 1


# Per-point list columns and their Arrow value types.
POINT_FIELDS: dict[str, pa.DataType] = {
    "coord": pa.list_(pa.float32(), 3),
    "energy": pa.float32(),
    "semantic": pa.int8(),
    "pid": pa.int8(),
    "particle": pa.int32(),
    "interaction": pa.int32(),
    "fragment": pa.int32(),
}
LABEL_FIELDS = ("semantic", "pid", "particle", "interaction", "fragment")

# The true particles of an event, one struct each (the column is null where the source has no such truth): `id` is the
# particle's id in the per-point `particle` column, `pid` its class in the detector's pid labels (-1: none), `mass` in
# MeV/c^2, `momentum` |p| in MeV/c, `direction` the unit vector it starts along, `vertex` where it starts (in the
# coordinates of `coord`), `primary` 1 if it comes from the interaction vertex, 0 if from another particle. Floats are
# NaN and `primary` -1 where the source does not say.
PARTICLE_FIELDS: dict[str, pa.DataType] = {
    "id": pa.int32(),
    "interaction": pa.int32(),
    "pid": pa.int8(),
    "mass": pa.float32(),
    "momentum": pa.float32(),
    "direction": pa.list_(pa.float32(), 3),
    "vertex": pa.list_(pa.float32(), 3),
    "primary": pa.int8(),
}
PARTICLE_TYPE = pa.struct(list(PARTICLE_FIELDS.items()))

# Optional per-point columns, null for a whole event where the detector or the source has no such thing: `time` (ns;
# a water Cherenkov PMT's hit time) and `contributors` (the ids of every particle that gave the point its signal,
# where several overlap: a PMT on two rings).
OPTIONAL_POINT_FIELDS: dict[str, pa.DataType] = {
    "time": pa.float32(),
    "contributors": pa.list_(pa.int32()),
}

EVENT_SCHEMA = pa.schema(
    [
        pa.field("event_id", pa.int64(), nullable=False),
        *[pa.field(name, pa.list_(t), nullable=False) for name, t in POINT_FIELDS.items()],
        pa.field("num_points", pa.int32(), nullable=False),
        pa.field("source", pa.string()),
        pa.field("detector", pa.string()),
        pa.field("particles", pa.list_(PARTICLE_TYPE)),  # optional: absent in shards written before it existed
        *[pa.field(name, pa.list_(t)) for name, t in OPTIONAL_POINT_FIELDS.items()],  # optional, as above
        pa.field("rings", pa.int32()),  # optional: Cherenkov rings of the event (water Cherenkov)
    ],
    metadata={b"raysvc.schema_version": str(SCHEMA_VERSION).encode()},
)


class WrongDetector(ValueError):
    """An event that does not fit a model's detector: another detector's, or with hit times that one has none of."""


class EventDataError(ValueError):
    """Bad event data; the message names the shard (or, for a source format, the file: `what="file"`), the row /
    event and field, and what was expected."""

    def __init__(
        self,
        shard: str,
        message: str,
        *,
        row: int | None = None,
        event_id: int | None = None,
        field: str | None = None,
        kind: str = "invalid",
        what: str = "shard",
    ):
        where = [f"{what} {shard}"]
        if row is not None:
            where.append(f"row {row}")
        if event_id is not None:
            where.append(f"event_id {event_id}")
        if field is not None:
            where.append(f"field {field!r}")
        super().__init__(f"{', '.join(where)}: {message}")
        self.shard, self.row, self.event_id, self.field, self.kind = shard, row, event_id, field, kind
        self.detail, self.what = message, what

    def __reduce__(self):
        # Picklable with its fields, so that Ray re-raises it as an EventDataError on the driver.
        args = (self.shard, self.detail, self.row, self.event_id, self.field, self.kind, self.what)
        return (_rebuild_event_error, args)


def _rebuild_event_error(shard, detail, row, event_id, field, kind, what="shard") -> EventDataError:
    return EventDataError(shard, detail, row=row, event_id=event_id, field=field, kind=kind, what=what)


def table_from_events(events: list[dict], source: str | list[str], detector: str = DEFAULT_DETECTOR) -> pa.Table:
    """Build an event table from per-event dicts of numpy arrays (coord (N,3), energy (N,), labels (N,)).

    `source` says where the events came from: one string for all, or one per event; `detector` (a registered name)
    fills the `detector` column, which `find_problems` checks against the dataset's."""
    counts = np.array([len(e["energy"]) for e in events], dtype=np.int64)
    offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
    cols: dict[str, pa.Array] = {"event_id": pa.array([int(e["event_id"]) for e in events], pa.int64())}
    for name, t in POINT_FIELDS.items():
        if name == "coord":
            flat = (
                np.concatenate([np.asarray(e["coord"], np.float32).reshape(-1) for e in events])
                if events
                else np.zeros(0, np.float32)
            )
            values = pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), 3)
        else:
            np_t = t.to_pandas_dtype()
            flat = np.concatenate([np.asarray(e[name]).astype(np_t) for e in events]) if events else np.zeros(0, np_t)
            values = pa.array(flat, t)
        cols[name] = pa.ListArray.from_arrays(offsets, values)
    cols["num_points"] = pa.array(counts.astype(np.int32), pa.int32())
    cols["source"] = pa.array([source] * len(events) if isinstance(source, str) else source, pa.string())
    cols["detector"] = pa.array([detector] * len(events), pa.string())
    cols["particles"] = particles_array([e.get("particles") for e in events])
    for name, t in OPTIONAL_POINT_FIELDS.items():
        cols[name] = _optional_points(events, name, t, counts)
    cols["rings"] = pa.array([None if e.get("rings") is None else int(e["rings"]) for e in events], pa.int32())
    return pa.Table.from_pydict(cols, schema=EVENT_SCHEMA)


def _optional_points(events: list[dict], name: str, t: pa.DataType, counts: np.ndarray) -> pa.Array:
    """An optional per-point column: per event its values (one per point) or null where the event has none."""
    have = [e.get(name) is not None for e in events]
    for e, h, n in zip(events, have, counts, strict=True):
        if h and len(e[name]) != n:
            raise ValueError(f"event {e['event_id']}: {name!r} has {len(e[name])} values for {n} points")
    lengths = np.where(have, counts, 0)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    vals = [e[name] for e, h in zip(events, have, strict=True) if h]
    if pa.types.is_list(t):  # a list per point: ragged
        values = pa.array([list(map(int, v)) for ev in vals for v in ev], t)
    else:
        flat = np.concatenate([np.asarray(v) for v in vals]) if vals else np.zeros(0)
        values = pa.array(flat.astype(t.to_pandas_dtype()), t)
    return pa.ListArray.from_arrays(offsets, values, type=pa.list_(t), mask=pa.array([not h for h in have]))


def particles_array(per_event: list[dict | None]) -> pa.Array:
    """The `particles` column from, per event, None (no truth) or a dict of PARTICLE_FIELDS arrays of one length (K
    particles; `direction` and `vertex` (K, 3))."""
    counts, flat = [], {name: [] for name in PARTICLE_FIELDS}
    for parts in per_event:
        if parts is None:
            counts.append(0)
            continue
        missing = sorted(set(PARTICLE_FIELDS) - set(parts))
        if missing:
            raise ValueError(f"particles: missing field(s) {missing}; expected {list(PARTICLE_FIELDS)}")
        k = len(parts["id"])
        counts.append(k)
        for name in PARTICLE_FIELDS:
            v = np.asarray(parts[name])
            shape = (k, 3) if name in ("direction", "vertex") else (k,)
            if v.shape != shape:
                raise ValueError(f"particles: field {name!r} has shape {v.shape}, expected {shape}")
            flat[name].append(v.reshape(-1))
    children = []
    for name, t in PARTICLE_FIELDS.items():
        vals = np.concatenate(flat[name]) if flat[name] else np.zeros(0)
        if pa.types.is_fixed_size_list(t):
            children.append(pa.FixedSizeListArray.from_arrays(pa.array(vals.astype(np.float32), pa.float32()), 3))
        else:
            children.append(pa.array(vals.astype(t.to_pandas_dtype()), t))
    values = pa.StructArray.from_arrays(children, fields=list(PARTICLE_TYPE))
    offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
    mask = pa.array([p is None for p in per_event])
    return pa.ListArray.from_arrays(offsets, values, type=pa.list_(PARTICLE_TYPE), mask=mask)


OPTIONAL_COLUMNS = ("particles", *OPTIONAL_POINT_FIELDS, "rings")


def with_null_columns(table: pa.Table, names: list[str]) -> pa.Table:
    """`table` with an all-null column of the event schema's type appended for each of `names`."""
    for name in names:
        f = EVENT_SCHEMA.field(name)
        table = table.append_column(f, pa.nulls(table.num_rows, f.type))
    return table


def with_optional_columns(table: pa.Table) -> pa.Table:
    """`table` with null optional columns (`particles`, `time`, `contributors`, `rings`) where it has none (a shard
    written before the column existed, or a reader's table that has no such truth)."""
    table = with_null_columns(table, [n for n in OPTIONAL_COLUMNS if n not in table.column_names])
    # in the schema's order (other columns after), so that tables of old and new shards concatenate
    order = [n for n in EVENT_SCHEMA.names if n in table.column_names]
    return table.select(order + [n for n in table.column_names if n not in order])


def flat_times(table: pa.Table) -> np.ndarray | None:
    """Every point's hit time (float32), or None where the events have none (the column absent or null)."""
    if "time" in table.column_names and table.num_rows and table.column("time").null_count == 0:
        return flat_values(table, "time").astype(np.float32)
    return None


def flat_values(table: pa.Table, name: str) -> np.ndarray:
    """All per-point values of list column `name`, concatenated over rows (respects slices)."""
    return table.column(name).combine_chunks().flatten().to_numpy(zero_copy_only=False)


def flat_coords(table: pa.Table) -> np.ndarray:
    """(N, 3) coordinates of all points of the table's events, concatenated over rows."""
    return table.column("coord").combine_chunks().flatten().flatten().to_numpy(zero_copy_only=False).reshape(-1, 3)


@dataclass
class Problem:
    """One bad event found by `find_problems`."""

    row: int
    event_id: int
    field: str
    kind: str
    message: str


def _list_parts(col: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, pa.Array]:
    """(per-row lengths, flat values) of a list column, respecting slices."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    lengths = pc.list_value_length(arr).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    return lengths, arr.flatten()


def check_columns(table: pa.Table, shard: str) -> pa.Table:
    """Check presence and types of the required columns; cast safe widenings; raise naming the field otherwise."""
    names = set(table.column_names)
    required = ["event_id", *POINT_FIELDS, "num_points"]
    missing = [c for c in required if c not in names]
    if missing:
        raise EventDataError(
            shard, f"missing column(s) {missing}; expected {required}", field=missing[0], kind="schema"
        )
    for field in EVENT_SCHEMA:
        if field.name not in names:
            continue
        have = table.schema.field(field.name).type
        if have == field.type:
            continue
        if field.name == "coord" and pa.types.is_list(have) and pa.types.is_list(have.value_type):
            # list<list<float>>: accept only if every inner list has 3 values (checked after the cast)
            pass
        try:
            casted = table.column(field.name).cast(field.type, safe=True)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as e:
            raise EventDataError(
                shard, f"has type {have}, expected {field.type} ({e})", field=field.name, kind="schema"
            ) from e
        table = table.set_column(table.schema.get_field_index(field.name), field, casted)
    return with_optional_columns(table)  # one schema for old and new shards of a dataset


def find_problems(
    table: pa.Table, *, detector: Detector = LARTPC, volume: float | None = None, num_classes: int | None = None
) -> list[Problem]:
    """All rows that break the data contract (one Problem per row: the first broken rule), in row order.

    Rules: the `detector` column, where present and not null, names `detector` (the dataset's: an event of another
    detector is checked first, since its geometry and labels mean something else); lengths of every per-point list
    (and of an optional one where not null) equal num_points; no empty event; hit times present and finite for a
    detector with a time channel; coordinates finite and inside [0, volume); energy finite and >= 0; semantic in
    [0, num_classes). `volume` and `num_classes` default to the detector's extent and semantic classes.
    """
    volume = detector.extent if volume is None else volume
    num_classes = detector.semantic.num_classes if num_classes is None else num_classes
    n = table.num_rows
    event_ids = table.column("event_id").to_numpy()
    num_points = table.column("num_points").to_numpy().astype(np.int64)
    bad: dict[int, Problem] = {}

    def flag(rows: np.ndarray, field: str, kind: str, message: str) -> None:
        for r in np.unique(rows).tolist():
            if r not in bad:
                bad[r] = Problem(r, int(event_ids[r]), field, kind, message)

    if "detector" in table.column_names:
        names = table.column("detector").combine_chunks()
        other = pc.not_equal(names, detector.name).fill_null(False)
        for name in pc.unique(names.filter(other)).to_pylist():  # one pass per distinct foreign name: a few at most
            rows = np.flatnonzero(pc.equal(names, name).fill_null(False).to_numpy(zero_copy_only=False))
            flag(rows, "detector", "detector", f"detector is {name!r}, expected {detector.name!r} (the dataset's)")
    flag(np.flatnonzero(num_points <= 0), "num_points", "empty", "event has no points")
    for name in POINT_FIELDS:
        lengths, _ = _list_parts(table.column(name))
        wrong = np.flatnonzero(lengths != num_points)
        if wrong.size:
            r = wrong[0]
            flag(wrong, name, "length", f"has {lengths[r]} entries but num_points is {num_points[r]}")

    for name in OPTIONAL_POINT_FIELDS:
        if name not in table.column_names:
            continue
        arr = table.column(name).combine_chunks()
        valid = arr.is_valid().to_numpy(zero_copy_only=False)
        lengths, _ = _list_parts(arr)
        wrong = np.flatnonzero(valid & (lengths != num_points))
        if wrong.size:
            r = wrong[0]
            flag(wrong, name, "length", f"has {lengths[r]} entries but num_points is {num_points[r]}")
        if name == "time" and detector.has_time:
            flag(np.flatnonzero(~valid), "time", "missing", f"no hit times: {detector.name} events need them")
            t = arr.flatten().to_numpy(zero_copy_only=False)
            rows_t = np.repeat(np.arange(n), lengths)
            flag(rows_t[~np.isfinite(t)], "time", "nonfinite", "time contains NaN or inf")

    lengths, coord_vals = _list_parts(table.column("coord"))
    row_of_point = np.repeat(np.arange(n), lengths)
    xyz = coord_vals.flatten().to_numpy(zero_copy_only=False).reshape(-1, 3)
    finite = np.isfinite(xyz).all(axis=1)
    flag(row_of_point[~finite], "coord", "nonfinite", "coordinates contain NaN or inf")
    inside = detector.inside(xyz, volume) | ~finite
    flag(row_of_point[~inside], "coord", "outside", f"coordinates outside the detector volume [0, {volume})")

    lengths, e_vals = _list_parts(table.column("energy"))
    e = e_vals.to_numpy(zero_copy_only=False)
    rows_e = np.repeat(np.arange(n), lengths)
    flag(rows_e[~np.isfinite(e)], "energy", "nonfinite", "energy contains NaN or inf")
    flag(rows_e[e < 0], "energy", "negative", "energy is negative")

    lengths, s_vals = _list_parts(table.column("semantic"))
    s = s_vals.to_numpy(zero_copy_only=False)
    rows_s = np.repeat(np.arange(n), lengths)
    flag(rows_s[(s < 0) | (s >= num_classes)], "semantic", "label", f"semantic class outside [0, {num_classes})")
    if "particles" in table.column_names:
        for rows, message in _particle_problems(table.column("particles")):
            flag(rows, "particles", "label", message)
    return [bad[r] for r in sorted(bad)]


def _particle_problems(col: pa.ChunkedArray) -> list[tuple[np.ndarray, str]]:
    """(rows, message) per broken rule of the per-particle truth: momentum and mass NaN or >= 0, direction NaN or a
    unit vector."""
    lengths, structs = _list_parts(col)
    if not len(structs):
        return []
    row = np.repeat(np.arange(len(lengths)), lengths)
    field = lambda name: structs.field(name).to_numpy(zero_copy_only=False)  # noqa: E731
    out = []
    for name in ("momentum", "mass"):
        bad = field(name) < 0
        out.append((row[bad], f"particle {name} is negative (expected >= 0, or NaN where unknown)"))
    d = structs.field("direction").flatten().to_numpy(zero_copy_only=False).reshape(-1, 3)
    norm = np.linalg.norm(d, axis=1)
    bad = np.isfinite(norm) & (np.abs(norm - 1) > 1e-3)
    out.append((row[bad], "particle direction is not a unit vector (expected |d| = 1, or NaN where unknown)"))
    return [(r, m) for r, m in out if r.size]


def validate_table(table: pa.Table, shard: str, row_base: int | None = 0, **kw) -> pa.Table:
    """check_columns + find_problems (`kw`: its detector, volume, num_classes); raise EventDataError for the first
    bad row.

    `row_base` is the shard row of the table's first row; None when unknown (a streamed batch), in which case the
    error names the event id but no row.
    """
    table = check_columns(table, shard)
    problems = find_problems(table, **kw)
    if problems:
        p = problems[0]
        raise EventDataError(
            shard,
            p.message + (f" ({len(problems)} bad rows in this batch)" if len(problems) > 1 else ""),
            row=None if row_base is None else p.row + row_base,
            event_id=p.event_id,
            field=p.field,
            kind=p.kind,
        )
    return table
