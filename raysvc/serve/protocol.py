"""Request bodies of `POST /v1/segment` -> one event (points, energies), or a RequestError with the HTTP status and
a message naming the problem. Pure functions, so every rejection is testable without a server.

Three encodings, chosen by Content-Type:
- `application/json`: {"points": [[x, y, z], ...], "energies": [...], "probabilities": false}
- `application/x-npz`: a NumPy .npz with arrays `points` (n, 3) and `energies` (n,) (probabilities: query string)
- `application/vnd.apache.arrow.stream`: an Arrow IPC stream of one table with float columns x, y, z, energy

Only the shape and size checks live here; values (finite, energy >= 0, inside the volume, non-empty) are checked by
the data contract's own validation when the event is preprocessed, exactly as for a shard.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

JSON = "application/json"
NPZ = "application/x-npz"
ARROW = "application/vnd.apache.arrow.stream"
CONTENT_TYPES = (JSON, NPZ, ARROW)


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
    points: np.ndarray  # (n, 3) float32 voxel coordinates
    energies: np.ndarray  # (n,) float32 MeV
    probabilities: bool = False


def _as_array(value, name: str, ndim: int) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise RequestError(422, f"{name}: expected numbers, got {type(value).__name__} ({e})") from e
    if ndim == 2 and arr.size == 0:
        arr = arr.reshape(0, 3)  # [] is an empty event, refused by the data contract with its own message
    if arr.ndim != ndim or (ndim == 2 and arr.shape[1] != 3):
        want = "(n, 3): a list of [x, y, z]" if ndim == 2 else "(n,): a flat list of numbers"
        raise RequestError(422, f"{name}: expected shape {want}, got shape {arr.shape}")
    return arr


def _event(points, energies, probabilities, limits: Limits) -> Event:
    p = _as_array(points, "points", 2)
    e = _as_array(energies, "energies", 1)
    if len(p) != len(e):
        raise RequestError(422, f"points has {len(p)} rows but energies has {len(e)} values: one energy per point")
    if len(p) > limits.max_points:
        raise RequestError(413, f"{len(p)} points: the endpoint takes at most {limits.max_points} per event")
    if not isinstance(probabilities, bool):
        raise RequestError(422, f"probabilities: expected true or false, got {probabilities!r}")
    return Event(p, e, probabilities)


def parse(body: bytes, content_type: str | None, limits: Limits, probabilities: bool = False) -> Event:
    """The event in `body`; `probabilities` is the query-string default for the binary encodings."""
    if len(body) > limits.max_body_bytes:
        raise RequestError(413, f"body of {len(body)} bytes: the limit is {limits.max_body_bytes}")
    kind = (content_type or "").split(";")[0].strip().lower()
    if kind == JSON:
        try:
            doc = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RequestError(400, f"malformed JSON: {e}") from e
        if not isinstance(doc, dict):
            raise RequestError(422, f"expected a JSON object with points and energies, got {type(doc).__name__}")
        missing = [k for k in ("points", "energies") if k not in doc]
        if missing:
            raise RequestError(422, f"missing field(s) {missing}: expected points (n x 3) and energies (n)")
        unknown = sorted(set(doc) - {"points", "energies", "probabilities"})
        if unknown:
            raise RequestError(422, f"unknown field(s) {unknown}: expected points, energies, probabilities")
        return _event(doc["points"], doc["energies"], doc.get("probabilities", probabilities), limits)
    if kind == NPZ:
        try:
            with np.load(io.BytesIO(body), allow_pickle=False) as z:
                missing = [k for k in ("points", "energies") if k not in z.files]
                if missing:
                    raise RequestError(422, f"npz without array(s) {missing}: expected points and energies")
                return _event(z["points"], z["energies"], probabilities, limits)
        except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
            raise RequestError(400, f"malformed .npz body: {e}") from e
    if kind == ARROW:
        try:
            table = pa.ipc.open_stream(body).read_all()
        except (pa.ArrowInvalid, OSError) as e:
            raise RequestError(400, f"malformed Arrow IPC stream: {e}") from e
        missing = [c for c in ("x", "y", "z", "energy") if c not in table.column_names]
        if missing:
            raise RequestError(422, f"Arrow table without column(s) {missing}: expected x, y, z, energy")
        cols = [table.column(c).to_numpy() for c in ("x", "y", "z")]
        return _event(np.stack(cols, 1) if len(table) else np.zeros((0, 3)), table.column("energy").to_numpy(),
                      probabilities, limits)  # fmt: skip
    raise RequestError(415, f"content type {content_type!r} is not accepted: use one of {', '.join(CONTENT_TYPES)}")
