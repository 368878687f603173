"""The endpoint's body parsers (raysvc.serve.protocol) against hostile input, without a server: every parse path
answers a RequestError with a 4xx (never another exception), refuses types the contract does not name, and sizes a
body from what it declares before inflating it (peak memory measured in a fresh process)."""

from __future__ import annotations

import io
import json
import os
import random
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

import raysvc
from raysvc.serve.protocol import ARROW, JSON, NPZ, Limits, RequestError, parse

LIMITS = Limits(max_body_bytes=16 * 2**20, max_points=200_000)
RNG = np.random.default_rng(0)
POINTS = RNG.uniform(0, 700, (40, 3)).astype(np.float32)
ENERGIES = RNG.uniform(0, 5, 40).astype(np.float32)


def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _arrow(table: pa.Table, compression: str | None = None) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema, options=pa.ipc.IpcWriteOptions(compression=compression)) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


def _columns(points=POINTS, energies=ENERGIES) -> dict:
    return {"x": points[:, 0], "y": points[:, 1], "z": points[:, 2], "energy": energies}


def _body(**extra) -> bytes:
    return json.dumps({"points": POINTS.tolist(), "energies": ENERGIES.tolist(), **extra}).encode()


def _refused(body: bytes, content_type: str, status: int, words: str) -> str:
    with pytest.raises(RequestError) as e:
        parse(body, content_type, LIMITS)
    assert e.value.status == status, (e.value.status, str(e.value))
    assert words in str(e.value), str(e.value)
    return str(e.value)


def test_every_encoding_parses_the_same_event_from_each_accepted_dtype():
    want = (POINTS, ENERGIES)
    bodies = {
        "json": (json.dumps({"points": POINTS.tolist(), "energies": ENERGIES.tolist()}).encode(), JSON),
        "json ints": (json.dumps({"points": POINTS.astype(int).tolist(), "energies": [1] * 40}).encode(), JSON),
        "npz f4": (_npz(points=POINTS, energies=ENERGIES), NPZ),
        "npz big-endian f8 + u2": (_npz(points=POINTS.astype(">f8"), energies=ENERGIES.astype(np.uint16)), NPZ),
        "npz fortran f2": (_npz(points=np.asfortranarray(POINTS.astype(np.float16)), energies=ENERGIES), NPZ),
        "arrow": (_arrow(pa.table(_columns())), ARROW),
        "arrow zstd int32": (_arrow(pa.table(_columns(POINTS.astype(np.int32))), "zstd"), ARROW),
        "arrow lz4 half": (_arrow(pa.table(_columns(energies=ENERGIES.astype(np.float16))), "lz4"), ARROW),
    }
    for name, (body, ctype) in bodies.items():
        ev = parse(body, ctype, LIMITS)
        assert ev.points.dtype == np.float32 and ev.energies.dtype == np.float32, name
        source_points = {
            "json ints": POINTS.astype(int),
            "arrow zstd int32": POINTS.astype(np.int32),
            "npz fortran f2": POINTS.astype(np.float16),
        }.get(name, want[0])
        np.testing.assert_array_equal(ev.points, source_points.astype(np.float32), err_msg=name)
        if name not in ("json ints", "npz big-endian f8 + u2", "arrow lz4 half"):
            np.testing.assert_array_equal(ev.energies, ENERGIES, err_msg=name)
    assert (
        parse(bodies["npz big-endian f8 + u2"][0], NPZ, LIMITS).energies.tolist() == ENERGIES.astype(np.uint16).tolist()
    )


def test_hit_times_and_the_detector_travel_in_every_encoding():
    """A water Cherenkov event: times as a JSON field, an .npz member or an Arrow column, the detector in the body or
    the query string; each encoding gives the same event."""
    times = RNG.uniform(900, 1100, 40).astype(np.float32)
    bodies = {
        "json": (_body(times=times.tolist(), detector="wch"), JSON, None),
        "json + query": (_body(times=times.tolist()), JSON, "wch"),
        "npz": (_npz(points=POINTS, energies=ENERGIES, times=times.astype(np.float64)), NPZ, "wch"),
        "arrow": (_arrow(pa.table({**_columns(), "time": times})), ARROW, "wch"),
    }
    for name, (body, ctype, query) in bodies.items():
        ev = parse(body, ctype, LIMITS, detector=query)
        assert ev.detector == "wch", name
        assert ev.times.dtype == np.float32 and np.array_equal(ev.times, times), name
        assert np.array_equal(ev.points, POINTS) and np.array_equal(ev.energies, ENERGIES), name
    plain = parse(_body(), JSON, LIMITS)
    assert plain.times is None and plain.detector is None  # the model's own detector, no times


@pytest.mark.parametrize(
    "body, ctype, query, words",
    [
        (_body(times=[1.0] * 39), JSON, None, "points has 40 rows but times has 39 values"),
        (_body(times=[[1.0]] * 40), JSON, None, "times: expected numbers, got an array"),
        (_body(detector=3), JSON, None, "detector: expected the detector's name as a string"),
        (_body(detector="wch"), JSON, "lartpc", "the body says 'wch', the query string 'lartpc'"),
        (_npz(points=POINTS, energies=ENERGIES, times=np.ones((40, 2))), NPZ, None, "times: expected shape (n,)"),
        (_npz(points=POINTS, energies=ENERGIES, time=np.ones(40)), NPZ, None, "unknown array(s) ['time']"),
        (_arrow(pa.table({**_columns(), "time": ["a"] * 40})), ARROW, None, "column time: type string"),
        (_arrow(pa.table({**_columns(), "times": np.ones(40)})), ARROW, None, "unknown column(s) ['times']"),
    ],
)
def test_bad_times_or_detectors_get_a_422_naming_them(body, ctype, query, words):
    with pytest.raises(RequestError) as e:
        parse(body, ctype, LIMITS, detector=query)
    assert e.value.status == 422 and words in str(e.value), str(e.value)


@pytest.mark.parametrize(
    "body, status, words",
    [
        (b"[" * 100_000, 400, "nested too deeply"),
        (b'{"points": ' + b"[" * 5000 + b"]" * 5000 + b', "energies": []}', 400, "nested too deeply"),
        (b'{"points": [[' + b"9" * 5000 + b", 1, 1]], " + b'"energies": [1]}', 422, "5000 digits"),
        (b'{"points": [[' + b"9" * 400 + b", 1, 1]], " + b'"energies": [1]}', 422, "400 digits"),
        (b'{"points": [[1, 1, 1]], "energies": [1], "points": [[2, 2, 2]]}', 422, "duplicate key 'points'"),
        (b'{"points": [[1, 1, 1]], "energies": [1], "probabilities": {"a": 1, "a": 2}}', 422, "duplicate key 'a'"),
        (b'{"points": [["1", "2", "3"]], "energies": [1]}', 422, "points: expected numbers, got a string"),
        (b'{"points": [[1, true, 3]], "energies": [1]}', 422, "points: expected numbers, got true/false"),
        (b'{"points": [[1, 2, 3]], "energies": [false]}', 422, "energies: expected numbers, got true/false"),
        (b'{"points": [[1, null, 3]], "energies": [1]}', 422, "got null"),
        (b'{"points": [[1, [2], 3]], "energies": [1]}', 422, "got an array"),
        (b'{"points": [1, 2, 3], "energies": [1]}', 422, "list of [x, y, z] arrays, got elements that are a number"),
        (b'{"points": "1,2,3", "energies": [1]}', 422, "points: expected an array, got a string"),
        (b'{"points": [[1, 2, 3]], "energies": {"0": 1}}', 422, "energies: expected an array, got an object"),
        (b'{"points": [[1, 2, 3]], "energies": [1], "probabilities": 1}', 422, "probabilities: expected true"),
        (b'{"points": [[1, 2, 3]], "energies": [1]', 400, "malformed JSON"),
        (b"\xff\xfe\x00garbage", 400, "malformed JSON"),
        (b'"just a string"', 422, "got a string"),
    ],
)
def test_json_bodies_that_crash_a_parser_or_carry_wrong_types_get_a_named_4xx(body, status, words):
    _refused(body, JSON, status, words)


def test_json_overflowing_float_reaches_the_contract_as_inf():
    ev = parse(b'{"points": [[1e400, 1, 1]], "energies": [1]}', JSON, LIMITS)
    assert np.isinf(ev.points[0, 0])  # the data contract refuses it by name ("coordinates contain NaN or inf")
    ev = parse(b'{"points": [[1e39, 1, 1]], "energies": [1]}', JSON, LIMITS)  # a float64 beyond float32
    assert np.isinf(ev.points[0, 0])


@pytest.mark.parametrize(
    "arrays, status, words",
    [
        ({"points": POINTS.astype(str), "energies": ENERGIES}, 422, "points: dtype <U"),
        ({"points": POINTS.astype(np.complex64), "energies": ENERGIES}, 422, "points: dtype complex64"),
        ({"points": POINTS, "energies": ENERGIES > 1}, 422, "energies: dtype bool"),
        ({"points": POINTS, "energies": np.zeros(40, "datetime64[s]")}, 422, "energies: dtype datetime64"),
        ({"points": POINTS, "energies": np.zeros(40, [("a", "f4")])}, 422, "energies: dtype"),
        ({"points": POINTS.astype(np.longdouble), "energies": ENERGIES}, 422, "points: dtype float128"),
        ({"points": POINTS, "energies": ENERGIES.astype(object)}, 422, "energies: dtype object"),
        ({"points": POINTS, "energies": ENERGIES, "extra": ENERGIES}, 422, "unknown array(s) ['extra']"),
        ({"points": POINTS}, 422, "without array(s) ['energies']"),
        ({"points": POINTS[:, :2], "energies": ENERGIES}, 422, "expected shape (n, 3)"),
        ({"points": POINTS[None], "energies": ENERGIES}, 422, "expected shape"),
        ({"points": POINTS, "energies": ENERGIES[:, None]}, 422, "expected shape (n,)"),
        ({"points": POINTS, "energies": ENERGIES[:-1]}, 422, "one energy per point"),
    ],
)
def test_npz_arrays_of_types_or_shapes_the_contract_does_not_name_get_a_422(arrays, status, words):
    allow_pickle = any(a.dtype == object for a in arrays.values())
    buf = io.BytesIO()
    np.savez(buf, **arrays) if not allow_pickle else np.savez(buf, **arrays, allow_pickle=True)
    _refused(buf.getvalue(), NPZ, status, words)


def test_npz_that_is_not_an_archive_or_lies_about_its_members_gets_a_400():
    npy = io.BytesIO()
    np.save(npy, POINTS)
    _refused(npy.getvalue(), NPZ, 400, "a single .npy array, not an .npz")
    _refused(b"PK\x03\x04" + b"\x00" * 40, NPZ, 400, "malformed .npz")
    good = _npz(points=POINTS, energies=ENERGIES)
    _refused(good[: len(good) // 2], NPZ, 400, "malformed .npz")
    # a member whose header declares more data than it holds
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (1000, 3)})
        zf.writestr("points.npy", header.getvalue() + POINTS.tobytes())
        zf.writestr("energies.npy", _npy(ENERGIES))
    _refused(buf.getvalue(), NPZ, 400, "header declares 12000")


def _npy(arr: np.ndarray) -> bytes:
    b = io.BytesIO()
    np.save(b, arr)
    return b.getvalue()


@pytest.mark.parametrize(
    "table, words",
    [
        (pa.table({**_columns(), "x": pa.array(np.zeros(40, "datetime64[ms]"))}), "column x: type timestamp[ms]"),
        (pa.table({**_columns(), "energy": pa.array(["1"] * 40)}), "column energy: type string"),
        (pa.table({**_columns(), "y": pa.array([True] * 40)}), "column y: type bool"),
        (pa.table({**_columns(), "z": pa.array(np.zeros(40)).dictionary_encode()}), "column z: type dictionary"),
        (pa.table({**_columns(), "x": pa.array([[1.0]] * 40)}), "column x: type list"),
        (pa.table({**_columns(), "energy": pa.array([1] * 40, pa.decimal128(5, 2))}), "type decimal128"),
        (pa.table({**_columns(), "t": ENERGIES}), "unknown column(s) ['t']"),
        (pa.table({k: v for k, v in _columns().items() if k != "z"}), "without column(s) ['z']"),
        (pa.table({**_columns(), "x": pa.array([None] + [1.0] * 39)}), "null values {'x': 1}"),
    ],
)
def test_arrow_columns_of_types_the_contract_does_not_name_get_a_422(table, words):
    _refused(_arrow(table), ARROW, 422, words)


def test_arrow_streams_that_are_broken_get_a_400():
    good = _arrow(pa.table(_columns()), "zstd")
    _refused(good[: len(good) - 30], ARROW, 400, "malformed Arrow")
    _refused(b"\xff\xff\xff\xff" + b"\x00" * 20, ARROW, 400, "malformed Arrow")
    _refused(b"", ARROW, 400, "malformed Arrow")


def test_mutated_bodies_of_every_encoding_never_raise_anything_but_a_4xx():
    """Bit flips, truncations and spliced bytes of valid bodies: whatever the parser underneath raises must come out
    as a RequestError with a 4xx (a 500 is a bug), or the body still parses."""
    rng = random.Random(7)
    bodies = {
        JSON: json.dumps({"points": POINTS[:8].tolist(), "energies": ENERGIES[:8].tolist()}).encode(),
        NPZ: _npz(points=POINTS[:8], energies=ENERGIES[:8]),
        ARROW: _arrow(pa.table(_columns(POINTS[:8], ENERGIES[:8])), "zstd"),
    }
    outcomes = {}
    for ctype, good in bodies.items():
        for _ in range(600):
            b = bytearray(good)
            kind = rng.randrange(3)
            if kind == 0:
                for _ in range(rng.randint(1, 4)):
                    b[rng.randrange(len(b))] = rng.randrange(256)
            elif kind == 1:
                b = b[: rng.randrange(len(b))]
            else:
                at = rng.randrange(len(b))
                b[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
            try:
                parse(bytes(b), ctype, LIMITS)
                outcomes[ctype, "parsed"] = outcomes.get((ctype, "parsed"), 0) + 1
            except RequestError as e:
                assert 400 <= e.status < 500, (ctype, e.status, str(e))
                outcomes[ctype, e.status] = outcomes.get((ctype, e.status), 0) + 1
    for ctype in bodies:  # the mutations reached the parsers' error paths, not only the happy path
        assert sum(v for (c, s), v in outcomes.items() if c == ctype and s != "parsed") > 100, outcomes


# --- bombs: declared sizes checked before inflating, memory measured in a fresh process ---------------------------

MEASURE = """
import sys
from raysvc.serve.protocol import Limits, RequestError, parse

def hwm():  # this process's peak RSS in KiB (ru_maxrss would carry the forking parent's peak over exec)
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])

body, ctype = open(sys.argv[1], "rb").read(), sys.argv[2]
parse(b'{"points": [[1, 1, 1]], "energies": [1]}', "application/json", Limits())  # warm the code paths
before = hwm()
try:
    parse(body, ctype, Limits(max_body_bytes=16 * 2**20, max_points=200_000))
    status = 200
except RequestError as e:
    status = e.status
print(status, (hwm() - before) / 1024)
"""


def _grown(tmp_path, body: bytes, ctype: str) -> tuple[int, float]:
    """(status, peak RSS growth in MiB) of parsing `body` in a fresh interpreter."""
    path = tmp_path / "body"
    path.write_bytes(body)
    env = {**os.environ, "PYTHONPATH": str(Path(raysvc.__file__).parents[1])}  # this raysvc, whatever the cwd
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, str(path), ctype], capture_output=True, text=True, timeout=120, env=env
    )
    assert out.returncode == 0, out.stderr[-2000:]
    status, mib = out.stdout.split()
    return int(status), float(mib)


def _npz_bomb(points: int) -> bytes:
    """An .npz whose points member inflates to `points` x 3 float32 zeros (written in chunks, never held)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        with zf.open("points.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (points, 3)})
            chunk = bytes(12 * 2**20)
            left = points * 12
            while left:
                f.write(chunk[: min(left, len(chunk))])
                left -= min(left, len(chunk))
        zf.writestr("energies.npy", _npy(np.zeros(points, np.float32)))
    return buf.getvalue()


def _patch_inflated_size(body: bytes, size: int) -> bytes:
    """The stream with every zstd-compressed buffer's declared inflated size (the int64 before each zstd frame, by
    the Arrow IPC format) set to `size`: a small batch that claims huge buffers."""
    b = bytearray(body)
    at = b.find(b"\x28\xb5\x2f\xfd")
    assert at > 8
    while at != -1:
        b[at - 8 : at] = struct.pack("<q", size)
        at = b.find(b"\x28\xb5\x2f\xfd", at + 4)
    return bytes(b)


def test_bombs_are_refused_before_they_inflate(tmp_path):
    zeros = np.zeros(8_000_000, np.float32)  # 4 columns of 8 M rows: 128 MiB inflated
    arrow_rows = _arrow(pa.table({"x": zeros, "y": zeros, "z": zeros, "energy": zeros}), "zstd")
    small = _arrow(pa.table(_columns()), "zstd")
    bombs = {
        "npz 10 M points": (_npz_bomb(10_000_000), NPZ, "10000000 points"),
        "arrow 8 M rows": (arrow_rows, ARROW, "8000000 rows"),
        "arrow buffers claiming 1 GiB": (_patch_inflated_size(small, 2**30), ARROW, "inflates to 1073741824"),
        "json 1 M points": (b'{"points": [' + b"[0,0,0]," * 1_000_000 + b'[0,0,0]], "energies": [0]}', JSON, "values"),
    }
    for name, (body, ctype, words) in bombs.items():
        assert len(body) < 16 * 2**20, (name, len(body))  # under the byte limit: only the declared sizes stop them
        with pytest.raises(RequestError) as e:
            parse(body, ctype, LIMITS)
        assert e.value.status == 413 and words in str(e.value), (name, str(e.value))
        status, mib = _grown(tmp_path, body, ctype)
        print(f"{name}: {len(body) / 2**10:.0f} KiB -> {status}, peak RSS +{mib:.1f} MiB")
        assert status == 413 and mib < 24, (name, status, mib)  # inflated, each is >= 96 MiB


def test_points_spread_over_many_record_batches_count_together():
    batch = pa.table(_columns(np.zeros((50_000, 3), np.float32), np.zeros(50_000, np.float32)))
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as w:
        for _ in range(5):
            w.write_table(batch)
    _refused(sink.getvalue().to_pybytes(), ARROW, 413, "250000 rows")
