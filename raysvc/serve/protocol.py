"""Request bodies of `POST /v1/segment` -> one event (points, energies, and hit times where the detector has them),
or a RequestError with the HTTP status and a message naming the problem. Pure functions, so every rejection is
testable without a server.

Three encodings, chosen by Content-Type:
- `application/json`: {"points": [[x, y, z], ...], "energies": [...], "times": [...], "detector": "wch",
  "probabilities": false} (times and detector optional)
- `application/x-npz`: a NumPy .npz with arrays `points` (n, 3), `energies` (n,) and optionally `times` (n,)
  (detector and probabilities: query string)
- `application/vnd.apache.arrow.stream`: an Arrow IPC stream of one table with numeric columns x, y, z, energy and
  optionally time (detector and probabilities: query string)

The detector a request names (`detector`; default: the model's own) is checked against the model's by the endpoint,
which refuses an event of another detector by name.

Every encoding takes real numbers only (JSON numbers; NumPy / Arrow integer or floating types of up to 64 bits) and
refuses everything else (strings, booleans, nulls, complex, dates) naming the field and the type. Sizes are checked
from what a body declares before anything is inflated: the count of JSON values from the text, each .npy member's
shape from its header, each Arrow record batch's row count and its compressed buffers' declared sizes from the
message metadata. So no body costs more memory than the point limit allows, however well it compresses.

Only types, shapes and sizes live here; values (finite, energy >= 0, inside the volume, non-empty) are checked by
the data contract's own validation when the event is preprocessed, exactly as for a shard.
"""

from __future__ import annotations

import io
import itertools
import json
import struct
import zipfile
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

JSON = "application/json"
NPZ = "application/x-npz"
ARROW = "application/vnd.apache.arrow.stream"
CONTENT_TYPES = (JSON, NPZ, ARROW)
FIELDS = ("points", "energies")
OPTIONAL_FIELDS = ("times",)  # per point, where the detector has a time channel
COLUMNS = ("x", "y", "z", "energy")
OPTIONAL_COLUMNS = ("time",)
ACCEPTED_DTYPES = "float16/32/64, int8-64 or uint8-64"
JSON_NAMES = {
    bool: "true/false",
    str: "a string",
    type(None): "null",
    list: "an array",
    dict: "an object",
    float: "a number",
}
MAX_INT_DIGITS = 20  # Python parses any integer; ours are coordinates and energies, never 10^20


class RequestError(Exception):
    """A request the endpoint refuses: `status` is the HTTP code, the message says what was wrong."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 64 * 2**20
    max_points: int = 500_000


@dataclass
class Event:
    points: np.ndarray  # (n, 3) float32 coordinates in the detector's units (LArTPC voxels, WCh cm)
    energies: np.ndarray  # (n,) float32 MeV (LArTPC) or photo-electrons (WCh)
    probabilities: bool = False
    times: np.ndarray | None = None  # (n,) float32 ns: hit times, for a detector with a time channel
    detector: str | None = None  # the detector the request says the event is from; None: the model's


def _too_many(n: int, limits: Limits, what: str = "points") -> RequestError:
    return RequestError(413, f"{n} {what}: the endpoint takes at most {limits.max_points} points per event")


def _float32(arr: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # beyond float32 becomes inf, which the data contract refuses by name
        return arr.astype(np.float32, copy=False)


def _check_shape(arr: np.ndarray, name: str) -> None:
    want2 = name == "points"
    if arr.ndim != (2 if want2 else 1) or (want2 and arr.shape[1] != 3):
        want = "(n, 3): a list of [x, y, z]" if want2 else "(n,): a flat list of numbers"
        raise RequestError(422, f"{name}: expected shape {want}, got shape {arr.shape}")


def _check_dtype(dtype: np.dtype, name: str) -> None:
    if dtype.kind not in "iuf" or dtype.itemsize > 8:
        raise RequestError(422, f"{name}: dtype {dtype} is not accepted: expected real numbers ({ACCEPTED_DTYPES})")


def _event(
    points: np.ndarray,
    energies: np.ndarray,
    probabilities,
    limits: Limits,
    times: np.ndarray | None = None,
    detector=None,
) -> Event:
    if len(points) != len(energies):
        raise RequestError(
            422, f"points has {len(points)} rows but energies has {len(energies)} values: one energy per point"
        )
    if times is not None and len(times) != len(points):
        raise RequestError(422, f"points has {len(points)} rows but times has {len(times)} values: one time per point")
    if len(points) > limits.max_points:
        raise _too_many(len(points), limits)
    if not isinstance(probabilities, bool):
        raise RequestError(422, f"probabilities: expected true or false, got {probabilities!r}")
    if detector is not None and (type(detector) is not str or not detector):
        got = JSON_NAMES.get(type(detector), type(detector).__name__)
        raise RequestError(422, f"detector: expected the detector's name as a string (lartpc, wch), got {got}")
    return Event(
        _float32(points), _float32(energies), probabilities, None if times is None else _float32(times), detector
    )


# --- JSON -------------------------------------------------------------------------------------------------------


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object whose keys are unique: parsers disagree on which duplicate wins, so none is guessed."""
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise RequestError(422, f"duplicate key {dup!r} in a JSON object: give each field once")
    return dict(pairs)


def _json_int(text: str) -> float:
    digits = len(text.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        raise RequestError(422, f"an integer of {digits} digits: numbers must fit a float (at most {MAX_INT_DIGITS})")
    return float(text)


def _json_numbers(value, name: str) -> np.ndarray:
    """The JSON array `value` as float64, refusing anything but numbers in the expected nesting."""
    if type(value) is not list:
        raise RequestError(422, f"{name}: expected an array, got {JSON_NAMES.get(type(value), type(value).__name__)}")
    flat = value
    if name == "points":
        rows = set(map(type, value))
        if rows - {list}:
            got = ", ".join(sorted(JSON_NAMES.get(t, t.__name__) for t in rows - {list}))
            raise RequestError(422, f"points: expected a list of [x, y, z] arrays, got elements that are {got}")
        lengths = set(map(len, value))
        if lengths - {3}:
            raise RequestError(
                422,
                f"points: expected shape (n, 3): a list of [x, y, z], got rows of {sorted(lengths - {3})[:3]} values",
            )
        flat = list(itertools.chain.from_iterable(value))
    kinds = set(map(type, flat)) - {float}  # integers arrive as floats (see _json_int)
    if kinds:
        got = ", ".join(sorted(JSON_NAMES.get(t, t.__name__) for t in kinds))
        raise RequestError(422, f"{name}: expected numbers, got {got}")
    arr = np.array(flat, dtype=np.float64)
    return arr.reshape(-1, 3) if name == "points" else arr


def _parse_json(body: bytes, limits: Limits, probabilities: bool, detector: str | None) -> Event:
    # Python holds each parsed number as an object (~10x its text): bound the count of values by the commas, which
    # is cheap, before parsing. An event of n points has about 4n (3n coordinates and n energies).
    values = body.count(b",") + 1
    if values > 4 * limits.max_points + 16:
        raise _too_many(values, limits, "values (about a quarter as many points)")
    try:
        doc = json.loads(body, object_pairs_hook=_unique_keys, parse_int=_json_int)
    except RecursionError as e:
        raise RequestError(400, "malformed JSON: nested too deeply (an event is two flat arrays)") from e
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise RequestError(400, f"malformed JSON: {e}") from e
    if not isinstance(doc, dict):
        raise RequestError(422, f"expected a JSON object with points and energies, got {JSON_NAMES[type(doc)]}")
    missing = [k for k in FIELDS if k not in doc]
    if missing:
        raise RequestError(422, f"missing field(s) {missing}: expected points (n x 3) and energies (n)")
    unknown = sorted(set(doc) - {*FIELDS, *OPTIONAL_FIELDS, "probabilities", "detector"})
    if unknown:
        raise RequestError(
            422, f"unknown field(s) {unknown}: expected points, energies, times, detector, probabilities"
        )
    points, energies = _json_numbers(doc["points"], "points"), _json_numbers(doc["energies"], "energies")
    times = _json_numbers(doc["times"], "times") if "times" in doc else None
    return _event(points, energies, doc.get("probabilities", probabilities), limits, times, doc.get("detector"))


# --- .npz -------------------------------------------------------------------------------------------------------


def _npy_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, name: str, limits: Limits) -> np.ndarray:
    """One .npy member, read only after its header declared an accepted dtype and a shape within the limit; never
    more bytes than that shape needs, whatever the archive says it inflates to."""
    with zf.open(info) as f:
        version = np.lib.format.read_magic(f)
        if version not in ((1, 0), (2, 0)):
            raise RequestError(400, f"{name}: .npy format version {version} (1.0 and 2.0 are read)")
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f, max_header_size=1024)
        _check_dtype(dtype, name)
        if any(s < 0 for s in shape):
            raise RequestError(400, f"{name}: .npy header declares shape {shape}")
        n = shape[0] if shape else 1
        if n > limits.max_points:
            raise _too_many(n, limits)
        if len(shape) > 2 or (len(shape) == 2 and shape[1] > 3):
            raise RequestError(
                422, f"{name}: expected shape {'(n, 3)' if name == 'points' else '(n,)'}, got shape {tuple(shape)}"
            )
        count = int(np.prod(shape, dtype=np.int64))
        data = f.read(count * dtype.itemsize)
    if len(data) != count * dtype.itemsize:
        raise RequestError(
            400,
            f"{name}: the .npy member holds {len(data)} bytes of data, its header declares "
            f"{count * dtype.itemsize} (shape {tuple(shape)}, {dtype})",
        )
    arr = np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C")
    _check_shape(arr, name)
    return arr


def _parse_npz(body: bytes, limits: Limits, probabilities: bool, detector: str | None) -> Event:
    if body.startswith(b"\x93NUMPY"):
        raise RequestError(400, "a single .npy array, not an .npz archive: send np.savez(f, points=..., energies=...)")
    try:
        zf = zipfile.ZipFile(io.BytesIO(body))
        members = {i.filename.removesuffix(".npy"): i for i in zf.infolist()}
        missing = [k for k in FIELDS if k not in members]
        if missing:
            raise RequestError(422, f"npz without array(s) {missing}: expected points and energies")
        unknown = sorted(set(members) - {*FIELDS, *OPTIONAL_FIELDS})
        if unknown:
            raise RequestError(422, f"npz with unknown array(s) {unknown}: expected points, energies and times")
        arrays = [_npy_member(zf, members[k], k, limits) for k in FIELDS]
        times = _npy_member(zf, members["times"], "times", limits) if "times" in members else None
    except (
        zipfile.BadZipFile,
        zipfile.LargeZipFile,
        ValueError,
        OSError,
        EOFError,
        NotImplementedError,
        RuntimeError,
        SyntaxError,
        struct.error,
    ) as e:
        # what zipfile (bad archive, unsupported compression, encryption) and NumPy's header parser raise
        raise RequestError(400, f"malformed .npz body: {type(e).__name__}: {e}") from e
    return _event(*arrays, probabilities, limits, times, detector)


# --- Arrow IPC --------------------------------------------------------------------------------------------------


class _Flat:
    """The few fields of an Arrow IPC Message flatbuffer needed to size a record batch before it is decoded."""

    def __init__(self, buf: bytes):
        self.buf = buf

    def _u(self, fmt: str, pos: int) -> int:
        return struct.unpack_from(fmt, self.buf, pos)[0]

    def field(self, table: int, index: int) -> int | None:
        vtable = table - self._u("<i", table)
        size = self._u("<H", vtable)
        slot = 4 + 2 * index
        off = self._u("<H", vtable + slot) if slot < size else 0
        return table + off if off else None

    def ref(self, pos: int) -> int:
        return pos + self._u("<I", pos)

    def structs(self, pos: int, width: int) -> list[tuple[int, int]]:
        """A vector of (int64, int64) structs, as FieldNode and Buffer are."""
        vec = self.ref(pos)
        count = self._u("<I", vec)
        if count * width > len(self.buf) - vec - 4:
            raise struct.error(f"a vector of {count} entries runs past the message")
        return [struct.unpack_from("<qq", self.buf, vec + 4 + i * width) for i in range(count)]


def _batch_header(metadata: bytes) -> tuple[int, list[tuple[int, int]], list[tuple[int, int]], bool]:
    """(rows, field nodes (length, nulls), buffers (offset, length), compressed) of a RecordBatch message."""
    fb = _Flat(metadata)
    message = fb.ref(0)
    header = fb.field(message, 2)
    if header is None:
        raise struct.error("a record batch message without a header")
    batch = fb.ref(header)
    length_at, nodes_at, buffers_at, compression_at = (fb.field(batch, i) for i in range(4))
    rows = fb._u("<q", length_at) if length_at is not None else 0
    nodes = fb.structs(nodes_at, 16) if nodes_at is not None else []
    buffers = fb.structs(buffers_at, 16) if buffers_at is not None else []
    return rows, nodes, buffers, compression_at is not None


def _arrow_schema(schema: pa.Schema) -> None:
    names = schema.names
    missing = [c for c in COLUMNS if c not in names]
    if missing:
        raise RequestError(422, f"Arrow table without column(s) {missing}: expected x, y, z, energy")
    unknown = sorted(set(names) - {*COLUMNS, *OPTIONAL_COLUMNS})
    if unknown or len(names) != len(set(names)):
        what = f"unknown column(s) {unknown}" if unknown else "a column given twice"
        raise RequestError(422, f"Arrow table with {what}: expected x, y, z, energy and optionally time")
    for f in schema:
        if not (pa.types.is_integer(f.type) or pa.types.is_floating(f.type)):
            raise RequestError(
                422, f"Arrow column {f.name}: type {f.type} is not accepted: expected real numbers ({ACCEPTED_DTYPES})"
            )


def _parse_arrow(body: bytes, limits: Limits, probabilities: bool, detector: str | None) -> Event:
    try:
        reader = pa.ipc.MessageReader.open_stream(pa.py_buffer(body))
        schema_msg = reader.read_next_message()
        if schema_msg.type != "schema":
            raise RequestError(
                400, f"malformed Arrow IPC stream: starts with a {schema_msg.type} message, not a schema"
            )
        schema = pa.ipc.read_schema(schema_msg)
        _arrow_schema(schema)
        batches, rows = [], 0
        for msg in reader:
            if msg.type != "record batch":
                raise RequestError(
                    400,
                    f"Arrow IPC stream with a {msg.type} message: only record batches of plain "
                    "numeric columns are read",
                )
            n, nodes, buffers, compressed = _batch_header(msg.metadata.to_pybytes())
            rows += n
            if n < 0 or rows > limits.max_points:
                raise _too_many(rows, limits, "rows")
            if any(length != n for length, _ in nodes):
                raise RequestError(400, f"malformed Arrow record batch: {n} rows but columns of {nodes} values")
            if compressed:  # each compressed buffer starts with its inflated size (int64; -1: stored as is)
                body_view = memoryview(msg.body)
                for offset, length in buffers:
                    if length >= 8:
                        inflated = struct.unpack_from("<q", body_view, offset)[0]
                        if inflated > 8 * n + 64:
                            raise RequestError(
                                413,
                                f"Arrow record batch of {n} rows with a compressed buffer "
                                f"that inflates to {inflated} bytes (at most {8 * n + 64})",
                            )
            batches.append(pa.ipc.read_record_batch(msg, schema))
        table = pa.Table.from_batches(batches, schema)
    except (pa.ArrowException, ValueError, OSError, struct.error, StopIteration) as e:  # ValueError: also bad UTF-8
        raise RequestError(400, f"malformed Arrow IPC stream: {type(e).__name__}: {e}") from e
    present = [c for c in (*COLUMNS, *OPTIONAL_COLUMNS) if c in table.column_names]
    nulls = {c: table.column(c).null_count for c in present if table.column(c).null_count}
    if nulls:
        raise RequestError(422, f"Arrow column(s) with null values {nulls}: every point needs each column's value")
    cols = [table.column(c).to_numpy() for c in COLUMNS]
    points = np.stack(cols[:3], 1) if len(table) else np.zeros((0, 3))
    times = table.column("time").to_numpy() if "time" in table.column_names else None
    return _event(points, cols[3], probabilities, limits, times, detector)


PARSERS = {JSON: _parse_json, NPZ: _parse_npz, ARROW: _parse_arrow}


def parse(
    body: bytes, content_type: str | None, limits: Limits, probabilities: bool = False, detector: str | None = None
) -> Event:
    """The event in `body`; `probabilities` and `detector` are the query string's (for JSON, the body's own fields
    win; a body and a query naming different detectors is an error)."""
    if len(body) > limits.max_body_bytes:
        raise RequestError(413, f"body of {len(body)} bytes: the limit is {limits.max_body_bytes}")
    kind = (content_type or "").split(";")[0].strip().lower()
    if kind not in PARSERS:
        raise RequestError(415, f"content type {content_type!r} is not accepted: use one of {', '.join(CONTENT_TYPES)}")
    event = PARSERS[kind](body, limits, probabilities, detector)
    if detector is not None and event.detector not in (None, detector):
        raise RequestError(422, f"detector: the body says {event.detector!r}, the query string {detector!r}")
    event.detector = event.detector or detector
    return event
