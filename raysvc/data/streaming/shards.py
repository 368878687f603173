"""A dataset = a directory of Parquet shards + `manifest.json` (shard list, counts, schema version, provenance, sha256,
and the detector its events come from).

Shards are written atomically (see storage.write_bytes_atomic) and the manifest last, so readers, who go by the
manifest, never see a half-written dataset. Shard names sort in event order: `events-00000.parquet`, ...
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context

import pyarrow as pa
import pyarrow.parquet as pq

from raysvc import __version__
from raysvc.data.contract.detectors import DEFAULT_DETECTOR, PLUGINS_ENV, Detector, detector_names, get_detector
from raysvc.data.contract.schema import (
    EVENT_SCHEMA,
    OPTIONAL_COLUMNS,
    SCHEMA_VERSION,
    EventDataError,
    check_columns,
    table_from_events,
    validate_table,
    with_null_columns,
    with_optional_columns,
)
from raysvc.storage import (
    Location,
    StorageError,
    explained,
    read_bytes,
    resolve,
    retried,
    sha256_hex,
    write_bytes_atomic,
)

MANIFEST = "manifest.json"
FORMAT = "raysvc.events"
ROW_GROUP_EVENTS = 64  # streaming granularity inside a shard


def shard_name(index: int) -> str:
    return f"events-{index:05d}.parquet"


@dataclass
class ShardRecord:
    name: str
    events: int
    points: int
    bytes: int
    sha256: str
    first_event_id: int | None = None


@dataclass
class Manifest:
    shards: list[ShardRecord]
    created_by: dict = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    format: str = FORMAT
    created_at: str = ""
    detector: str = DEFAULT_DETECTOR  # a registered detector name; manifests from before it: LArTPC
    units: dict = field(default_factory=dict)  # column -> unit, from the detector (empty in older manifests)

    @property
    def detector_spec(self) -> Detector:
        """The Detector record of the dataset's events: what readers normalise, check and label them by."""
        return get_detector(self.detector)

    @property
    def events(self) -> int:
        return sum(s.events for s in self.shards)

    @property
    def points(self) -> int:
        return sum(s.points for s in self.shards)

    def to_json(self) -> str:
        d = asdict(self)
        d["events"], d["points"] = self.events, self.points
        return json.dumps(d, indent=1)


def table_to_parquet_bytes(table: pa.Table) -> bytes:
    """Serialise an event table (schema enforced) into Parquet bytes."""
    table = with_optional_columns(table)
    table = table.cast(EVENT_SCHEMA) if table.schema != EVENT_SCHEMA else table
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", row_group_size=ROW_GROUP_EVENTS, write_statistics=["event_id"])
    return buf.getvalue()


def write_shard(root: Location, name: str, table: pa.Table) -> ShardRecord:
    """Write one shard atomically and return its manifest record."""
    data = table_to_parquet_bytes(table)
    write_bytes_atomic(root.join(name), data)
    first = int(table.column("event_id")[0].as_py()) if table.num_rows else None
    points = int(pa.compute.sum(table.column("num_points")).as_py() or 0)
    return ShardRecord(name, table.num_rows, points, len(data), sha256_hex(data), first)


def write_manifest(
    root: Location, shards: list[ShardRecord], created_by: dict, detector: str = DEFAULT_DETECTOR
) -> Manifest:
    get_detector(detector)  # an unknown name fails here, not when the dataset is next read
    m = Manifest(
        shards=sorted(shards, key=lambda s: s.name),
        created_by=created_by,
        created_at=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        detector=detector,
        units=get_detector(detector).units,
    )
    write_bytes_atomic(root.join(MANIFEST), m.to_json().encode())
    return m


class EventShardWriter:
    """Event records (dicts of the event table's columns, with `event_id` and `source`) -> validated shards of
    `shard_events` under `root`, then the manifest: what a converter of another format writes with.

    Shards are staged in a local temporary folder and published to `root` (shards, then the manifest) only by
    `close()`, so a conversion that fails leaves `root` as it was, on S3 too. Use it as a context manager: leaving
    the block, by an error or not, removes the staging folder."""

    def __init__(self, root: Location, shard_events: int, detector: Detector):
        self.root, self.shard_events, self.detector = root, shard_events, detector
        self.records: list[ShardRecord] = []
        self._buf: list[dict] = []
        self._staging = tempfile.mkdtemp(prefix="raysvc-convert-")
        self._stage = resolve(self._staging)

    def __enter__(self) -> EventShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self._staging, ignore_errors=True)

    def add(self, event: dict) -> None:
        self._buf.append(event)
        if len(self._buf) == self.shard_events:
            self._flush()

    def _flush(self) -> None:
        buf = self._buf
        table = table_from_events(buf, source=[e["source"] for e in buf], detector=self.detector.name)
        validate_table(table, f"{buf[0]['source']}..{buf[-1]['source']}", detector=self.detector)
        self.records.append(write_shard(self._stage, shard_name(len(self.records)), table))
        self._buf = []

    def close(self, created_by: dict) -> Manifest:
        """Write the last shard, publish every shard to `root`, then the manifest that makes them a dataset."""
        if self._buf:
            self._flush()
        for rec in self.records:
            write_bytes_atomic(self.root.join(rec.name), read_bytes(self._stage.join(rec.name)))
        return write_manifest(self.root, self.records, created_by, detector=self.detector.name)


def load_manifest(root: Location) -> Manifest:
    """Read and check a dataset's manifest; errors name the URI and the field."""
    where = root.join(MANIFEST)
    raw = read_bytes(where)
    try:
        d = json.loads(raw)
    except json.JSONDecodeError as e:
        raise EventDataError(where.uri, f"manifest is not valid JSON ({e})", kind="manifest") from e
    if d.get("format") != FORMAT:
        raise EventDataError(
            where.uri, f"format is {d.get('format')!r}, expected {FORMAT!r}", field="format", kind="manifest"
        )
    if d.get("schema_version") != SCHEMA_VERSION:
        raise EventDataError(
            where.uri,
            f"schema_version {d.get('schema_version')!r}; this raysvc reads {SCHEMA_VERSION}",
            field="schema_version",
            kind="manifest",
        )
    detector = d.get("detector", DEFAULT_DETECTOR)  # absent: written before manifests named their detector
    if not isinstance(detector, str) or detector not in detector_names():
        known = detector_names()
        raise EventDataError(
            where.uri,
            f"unknown detector {detector!r}; known detectors: {known} (a detector of another package: install it, "
            f"or name its module in {PLUGINS_ENV})",
            field="detector",
            kind="manifest",
        )
    try:
        shards = [ShardRecord(**s) for s in d["shards"]]
    except (KeyError, TypeError) as e:
        raise EventDataError(where.uri, f"bad shard list ({e})", field="shards", kind="manifest") from e
    created_by, created_at = d.get("created_by", {}), d.get("created_at", "")
    units = d.get("units", {})
    return Manifest(shards=shards, created_by=created_by, created_at=created_at, detector=detector, units=units)


def read_shard(
    root: Location,
    rec: ShardRecord,
    *,
    verify_checksum: bool = True,
    columns: list[str] | None = None,
    check: bool = True,
) -> pa.Table:
    """Read one whole shard, checking its size, checksum and row count against the manifest, and (if `check` and
    no column projection) its columns' types."""
    loc = root.join(rec.name)
    try:
        data = read_bytes(loc)
    except StorageError as e:
        if isinstance(e.__cause__, FileNotFoundError):  # deleted after the manifest (or the preflight) saw it
            raise EventDataError(loc.uri, "listed in the manifest but missing", kind="missing") from e
        raise
    if len(data) != rec.bytes:
        raise EventDataError(
            loc.uri, f"truncated or replaced: {len(data)} bytes, manifest says {rec.bytes}", kind="corrupt"
        )
    if verify_checksum and sha256_hex(data) != rec.sha256:
        raise EventDataError(loc.uri, "sha256 does not match the manifest (corrupt shard)", kind="corrupt")
    try:
        if columns is not None:  # optional columns a shard written before them lacks come back null
            names = set(pq.read_schema(pa.BufferReader(data)).names)
            missing = [c for c in columns if c not in names and c in OPTIONAL_COLUMNS]
            columns = [c for c in columns if c not in missing]
        table = pq.read_table(pa.BufferReader(data), columns=columns)
        if columns is not None:
            table = with_null_columns(table, missing)
    except (pa.ArrowInvalid, OSError) as e:
        raise EventDataError(loc.uri, f"not a readable Parquet file ({e})", kind="corrupt") from e
    if table.num_rows != rec.events:
        raise EventDataError(loc.uri, f"{table.num_rows} rows, manifest says {rec.events}", kind="corrupt")
    return check_columns(table, loc.uri) if check and not columns else table


def preflight(root: Location, manifest: Manifest) -> list[tuple[ShardRecord, EventDataError]]:
    """Cheap checks before streaming: every shard exists with the manifest's size and a readable Parquet footer.

    Returns (record, error) per bad shard (the caller raises the first, or skips those shards and counts their events).
    """
    problems = []
    for rec in manifest.shards:
        loc = root.join(rec.name)
        with explained(loc, "checking shard"):
            info = retried(loc, "checking shard", lambda loc=loc: loc.fs.get_file_info(loc.path))
        if info.type.name == "NotFound":
            problems.append((rec, EventDataError(loc.uri, "listed in the manifest but missing", kind="missing")))
            continue
        if info.size != rec.bytes:
            problems.append(
                (
                    rec,
                    EventDataError(
                        loc.uri, f"truncated or replaced: {info.size} bytes, manifest says {rec.bytes}", kind="corrupt"
                    ),
                )
            )
            continue
        try:
            with loc.fs.open_input_file(loc.path) as f:
                meta = pq.ParquetFile(f).metadata
        except (pa.ArrowInvalid, OSError) as e:
            problems.append((rec, EventDataError(loc.uri, f"unreadable Parquet footer ({e})", kind="corrupt")))
            continue
        if meta.num_rows != rec.events:
            problems.append(
                (rec, EventDataError(loc.uri, f"{meta.num_rows} rows, manifest says {rec.events}", kind="corrupt"))
            )
    return problems


def iter_tables(root: Location, manifest: Manifest, **kw) -> Iterator[tuple[ShardRecord, pa.Table]]:
    for rec in manifest.shards:
        yield rec, read_shard(root, rec, **kw)


def write_dataset(
    root: Location,
    n_shards: int,
    make_shard: Callable[[int], pa.Table],
    created_by: dict,
    workers: int = 1,
    progress: Callable[[Iterable], Iterable] | None = None,
    detector: str = DEFAULT_DETECTOR,
) -> Manifest:
    """Build shards 0..n_shards-1 with `make_shard(i)` (in `workers` processes), write each, then the manifest
    (naming `detector`, whose events `make_shard` must write).

    `make_shard` must be a picklable top-level callable when workers > 1.
    """
    records: list[ShardRecord] = []
    progress = progress or (lambda it: it)
    if workers <= 1 or n_shards <= 1:
        for i in progress(range(n_shards)):
            records.append(write_shard(root, shard_name(i), make_shard(i)))
    else:
        # spawn: never fork a process that may hold Arrow / BLAS thread pools
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
            futs = [pool.submit(_build_and_write, root, i, make_shard) for i in range(n_shards)]
            for fut in progress(as_completed(futs)):
                records.append(fut.result())
    created_by = {"raysvc_version": __version__, **created_by}
    return write_manifest(root, records, created_by, detector)


def _build_and_write(root: Location, i: int, make_shard: Callable[[int], pa.Table]) -> ShardRecord:
    return write_shard(root, shard_name(i), make_shard(i))
