"""Datasets as shards + manifest, on file:// and on SeaweedFS; corrupt, truncated and missing shards are named."""

from __future__ import annotations

import json
import re

import pyarrow as pa
import pytest

from raysvc.data.schema import EventDataError
from raysvc.data.shards import (
    MANIFEST,
    iter_tables,
    load_manifest,
    preflight,
    read_shard,
    shard_name,
    write_manifest,
    write_shard,
)
from raysvc.data.verify import verify_dataset
from raysvc.storage import read_bytes, sha256_hex, write_bytes_atomic
from tests.conftest import make_table, s3_location


def _write(root, n_shards=3, events=4):
    records, tables = [], []
    for i in range(n_shards):
        t, _ = make_table(events, points=(20, 60), seed=i, first_id=i * events)
        records.append(write_shard(root, shard_name(i), t))
        tables.append(t)
    write_manifest(root, records, {"tool": "test"})
    return tables


@pytest.fixture(params=["file", "s3"])
def root(request, tmp_path):
    if request.param == "file":
        from raysvc.storage import resolve

        return resolve(tmp_path.as_uri() + "/ds")
    server = request.getfixturevalue("seaweed")
    return s3_location(server, f"s3://shards-test/{tmp_path.name}/ds")


def test_manifest_describes_shards(root):
    tables = _write(root)
    m = load_manifest(root)
    assert [s.name for s in m.shards] == ["events-00000.parquet", "events-00001.parquet", "events-00002.parquet"]
    assert m.events == 12 and m.points == sum(int(pa.compute.sum(t.column("num_points")).as_py()) for t in tables)
    for rec in m.shards:
        assert sha256_hex(read_bytes(root.join(rec.name))) == rec.sha256
    assert pa.concat_tables([t for _, t in iter_tables(root, m)]).equals(pa.concat_tables(tables))
    assert json.loads(read_bytes(root.join(MANIFEST)))["created_by"]["tool"] == "test"
    assert preflight(root, m) == []


def test_corrupt_shard_named(root):
    _write(root)
    m = load_manifest(root)
    loc = root.join(m.shards[1].name)
    data = bytearray(read_bytes(loc))
    data[100] ^= 0xFF  # same size, one flipped byte
    write_bytes_atomic(loc, bytes(data))
    with pytest.raises(EventDataError, match=r"events-00001.parquet.*sha256") as e:
        read_shard(root, m.shards[1])
    assert e.value.kind == "corrupt"
    report = verify_dataset(root)
    assert report["bad_events"] == 4 and "events-00001" in report["bad_shards"][0]["shard"]


def test_truncated_and_missing_shards_named(root):
    _write(root)
    m = load_manifest(root)
    loc = root.join(m.shards[2].name)
    write_bytes_atomic(loc, read_bytes(loc)[:-300])
    ((rec, problem),) = preflight(root, m)
    assert rec.name == "events-00002.parquet" and problem.kind == "corrupt"
    assert re.search(r"events-00002.parquet.*truncated", str(problem))
    with pytest.raises(EventDataError, match=r"events-00002.parquet.*truncated"):
        read_shard(root, m.shards[2])
    loc.fs.delete_file(loc.path)
    ((rec, problem),) = preflight(root, m)
    assert rec.name == "events-00002.parquet" and problem.kind == "missing"
    assert re.search(r"events-00002.parquet.*missing", str(problem))


def test_bad_manifest_named(tmp_path):
    from raysvc.storage import resolve

    root = resolve(str(tmp_path))
    write_bytes_atomic(root.join(MANIFEST), b"{not json")
    with pytest.raises(EventDataError, match="manifest.json.*not valid JSON"):
        load_manifest(root)
    write_bytes_atomic(root.join(MANIFEST), json.dumps({"format": "raysvc.events", "schema_version": 99}).encode())
    with pytest.raises(EventDataError, match="schema_version 99"):
        load_manifest(root)


def test_verify_lists_bad_events_by_shard_row_and_field(tmp_path):
    import numpy as np

    from raysvc.data.schema import table_from_events
    from raysvc.storage import resolve
    from tests.conftest import make_event

    rng = np.random.default_rng(0)
    events = [make_event(i, 10, rng) for i in range(5)]
    events[3]["energy"][2] = np.nan
    root = resolve(str(tmp_path))
    write_manifest(root, [write_shard(root, shard_name(0), table_from_events(events, "t"))], {})
    rep = verify_dataset(root)
    assert rep["bad_events"] == 1
    p = rep["problems"][0]
    assert (p["row"], p["event_id"], p["field"], p["kind"]) == (3, 3, "energy", "nonfinite")
