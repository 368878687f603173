"""Datasets as shards + manifest, on file:// and on SeaweedFS; corrupt, truncated and missing shards are named."""

from __future__ import annotations

import json
import re

import pyarrow as pa
import pytest

from raysvc.data.contract.schema import EventDataError
from raysvc.data.streaming.shards import (
    MANIFEST,
    iter_tables,
    load_manifest,
    preflight,
    read_shard,
    shard_name,
    write_manifest,
    write_shard,
)
from raysvc.data.tools.verify import verify_dataset
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

    from raysvc.data.contract.schema import table_from_events
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


# --- the dataset's detector -------------------------------------------------------------------------------------
@pytest.fixture
def toy(monkeypatch):
    """A second registered detector with its own classes and reference: what is read back was written, not
    defaulted to LArTPC."""
    from dataclasses import replace

    from raysvc.data.contract.detectors import DETECTORS, LARTPC, LabelSpace

    classes = ("a", "b", "c", "d", "e", "f")
    reference = {"name": "Toy-Ref 2", "class_fractions": dict.fromkeys(classes, 1 / 6)}
    labels = {"semantic": LabelSpace("semantic", classes)}
    det = replace(LARTPC, name="toy", labels=labels, stuff_class=None, reference=reference, class_colors=())
    monkeypatch.setitem(DETECTORS, "toy", det)
    return det


def _file_root(tmp_path, name="ds"):
    from raysvc.storage import resolve

    return resolve(str(tmp_path / name))


def _write_with(root, detector: str, column: list | None = None, events: int = 5):
    """One shard of `events` events whose `detector` column is `column` (default: all `detector`), and a manifest
    naming `detector`."""
    table, _ = make_table(events, points=(20, 40))
    if column is not None:
        table = table.set_column(table.schema.get_field_index("detector"), "detector", pa.array(column, pa.string()))
    write_manifest(root, [write_shard(root, shard_name(0), table)], {"tool": "test"}, detector=detector)


def test_manifest_round_trips_its_detector(tmp_path, toy):
    root = _file_root(tmp_path)
    _write_with(root, "toy", ["toy"] * 5)
    assert json.loads(read_bytes(root.join(MANIFEST)))["detector"] == "toy"
    m = load_manifest(root)
    assert m.detector == "toy" and m.detector_spec is toy
    default = _file_root(tmp_path, "default")
    _write_with(default, "lartpc")
    from raysvc.data.contract.detectors import LARTPC

    assert load_manifest(default).detector_spec is LARTPC


def test_manifest_without_detector_loads_as_lartpc(tmp_path):
    from raysvc.data.contract.detectors import LARTPC

    root = _file_root(tmp_path)
    _write_with(root, "lartpc")
    d = json.loads(read_bytes(root.join(MANIFEST)))
    del d["detector"]  # as written before manifests named their detector
    write_bytes_atomic(root.join(MANIFEST), json.dumps(d).encode())
    m = load_manifest(root)
    assert m.detector == "lartpc" and m.detector_spec is LARTPC
    assert verify_dataset(root)["bad_events"] == 0


def test_unknown_detector_in_manifest_named(tmp_path):
    root = _file_root(tmp_path)
    _write_with(root, "lartpc")
    d = json.loads(read_bytes(root.join(MANIFEST)))
    d["detector"] = "argoncube"
    write_bytes_atomic(root.join(MANIFEST), json.dumps(d).encode())
    with pytest.raises(EventDataError, match=r"manifest.json.*unknown detector 'argoncube'.*known.*lartpc") as e:
        load_manifest(root)
    assert (e.value.field, e.value.kind) == ("detector", "manifest")
    with pytest.raises(ValueError, match="unknown detector 'argoncube'"):
        write_manifest(root, [], {}, detector="argoncube")


def test_detector_column_disagreeing_with_manifest_flagged(tmp_path, toy):
    root = _file_root(tmp_path)
    _write_with(root, "lartpc", ["lartpc", "lartpc", "toy", None, "lartpc"])  # null: not recorded, accepted
    rep = verify_dataset(root)
    assert rep["detector"] == "lartpc" and rep["bad_events"] == 1
    p = rep["problems"][0]
    assert (p["row"], p["event_id"], p["field"], p["kind"]) == (2, 2, "detector", "detector")
    assert "'toy'" in p["message"] and "'lartpc'" in p["message"] and "events-00000.parquet" in p["shard"]
    # the check follows the manifest: LArTPC events in a dataset that says "toy" are all flagged
    other = _file_root(tmp_path, "other")
    _write_with(other, "toy")
    rep = verify_dataset(other)
    assert rep["bad_events"] == 5 and {p["field"] for p in rep["problems"]} == {"detector"}
    assert "expected 'toy'" in rep["problems"][0]["message"]


def test_inspect_reports_detector_and_its_classes(tmp_path, toy):
    from raysvc.data.contract.detectors import LARTPC
    from raysvc.data.tools.stats import inspect_dataset

    root = _file_root(tmp_path)
    _write_with(root, "lartpc")
    s = inspect_dataset(root)
    assert s["detector"] == "lartpc"
    assert list(s["class_fractions"]) == list(LARTPC.class_names)
    assert s["reference"] == LARTPC.reference and s["reference_pilarnet_m"] == LARTPC.reference
    assert sum(s["class_fractions"].values()) == pytest.approx(1.0)
    other = _file_root(tmp_path, "toy")
    _write_with(other, "toy", ["toy"] * 5)
    s = inspect_dataset(other)
    assert s["detector"] == "toy" and list(s["class_fractions"]) == list(toy.class_names)
    assert s["class_fractions"]["f"] == 0.0  # make_event draws classes 0-4 only
    assert s["reference"] == toy.reference and s["reference_toy_ref_2"] == toy.reference
    assert "reference_pilarnet_m" not in s


def test_subset_keeps_the_detector(tmp_path, toy):
    from raysvc.data.streaming.subset import write_subsets

    root = _file_root(tmp_path)
    _write_with(root, "toy", ["toy"] * 5)
    out = write_subsets(root, {3: _file_root(tmp_path, "sub")}, seed=0, log=lambda *_: None)
    assert out[3].detector == "toy" and load_manifest(_file_root(tmp_path, "sub")).detector == "toy"
