"""The event table and its validation: every kind of bad event is named by shard, row, event id and field."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from raysvc.data.contract.schema import EVENT_SCHEMA, EventDataError, check_columns, table_from_events, validate_table
from tests.conftest import make_event, make_table


def test_roundtrip_preserves_every_point():
    table, events = make_table(5)
    assert table.schema.equals(EVENT_SCHEMA)
    assert table.schema.metadata[b"raysvc.schema_version"] == b"1"
    for i, ev in enumerate(events):
        row = table.slice(i, 1)
        xyz = np.asarray(row.column("coord")[0].as_py(), np.float32)
        np.testing.assert_array_equal(xyz, ev["coord"])
        for f in ("energy", "semantic", "pid", "particle", "interaction", "fragment"):
            np.testing.assert_array_equal(np.asarray(row.column(f)[0].as_py()), ev[f])
        assert row.column("num_points")[0].as_py() == len(ev["energy"])
    validate_table(table, "mem")


def _bad(kind: str, rng) -> dict:
    ev = make_event(42, 50, rng)
    if kind == "nonfinite":
        ev["coord"][7, 1] = np.nan
    elif kind == "outside":
        ev["coord"][3, 0] = 800.0
    elif kind == "negative":
        ev["energy"][0] = -1.0
    elif kind == "label":
        ev["semantic"][5] = 9
    elif kind == "empty":
        ev = make_event(42, 0, rng)
    return ev


@pytest.mark.parametrize(
    "kind, field",
    [
        ("nonfinite", "coord"),
        ("outside", "coord"),
        ("negative", "energy"),
        ("label", "semantic"),
        ("empty", "num_points"),
    ],
)
def test_bad_values_are_named(kind, field):
    rng = np.random.default_rng(1)
    good = [make_event(i, 30, rng) for i in range(3)]
    table = table_from_events(good[:2] + [_bad(kind, rng)] + good[2:], source="t")
    with pytest.raises(EventDataError) as e:
        validate_table(table, "s3://b/events-00007.parquet", row_base=100)
    err = e.value
    assert (err.kind, err.field, err.row, err.event_id) == (kind, field, 102, 42)
    assert "events-00007.parquet" in str(err) and "row 102" in str(err) and "event_id 42" in str(err)


def test_length_mismatch_named():
    table, _ = make_table(3, points=(20, 30))
    nums = table.column("num_points").to_numpy().copy()
    nums[1] += 1
    table = table.set_column(table.schema.get_field_index("num_points"), "num_points", pa.array(nums, pa.int32()))
    with pytest.raises(EventDataError, match=r"row 1.*entries but num_points") as e:
        validate_table(table, "shard")
    assert e.value.kind == "length"


def test_missing_column_and_wrong_type():
    table, _ = make_table(2, points=(10, 20))
    with pytest.raises(EventDataError, match="missing column.*'pid'") as e:
        check_columns(table.drop_columns(["pid"]), "shard-x")
    assert e.value.field == "pid" and "shard-x" in str(e.value)
    as_str = table.set_column(
        table.schema.get_field_index("energy"), "energy", pa.array([["a"] * 3, ["b"]], pa.list_(pa.string()))
    )
    with pytest.raises(EventDataError, match="field 'energy'.*expected list<item: float>"):
        check_columns(as_str, "shard-y")


def test_safe_widening_is_cast():
    table, _ = make_table(2, points=(10, 20))
    idx = table.schema.get_field_index("semantic")
    wide = table.set_column(idx, "semantic", table.column("semantic").cast(pa.list_(pa.int64())))
    assert check_columns(wide, "s").schema.field("semantic").type == pa.list_(pa.int8())


def test_error_survives_pickling():
    import pickle

    e = EventDataError("s3://b/x.parquet", "bad", row=3, event_id=9, field="energy", kind="negative")
    e2 = pickle.loads(pickle.dumps(e))
    assert type(e2) is EventDataError and str(e2) == str(e)
    assert (e2.row, e2.event_id, e2.field, e2.kind, e2.shard) == (3, 9, "energy", "negative", "s3://b/x.parquet")


def test_detector_column_checked_and_limits_from_the_detector():
    from dataclasses import replace

    from raysvc.data.contract.detectors import LARTPC, LabelSpace
    from raysvc.data.contract.schema import find_problems

    rng = np.random.default_rng(2)
    events = [make_event(i, 30, rng) for i in range(4)]
    table = table_from_events(events, source="t")
    assert set(table.column("detector").to_pylist()) == {LARTPC.name}
    column = pa.array(["lartpc", None, "toy", "lartpc"], pa.string())  # null: not recorded, accepted
    mixed = table.set_column(table.schema.get_field_index("detector"), "detector", column)
    with pytest.raises(EventDataError, match=r"row 2, event_id 2, field 'detector'.*'toy', expected 'lartpc'") as e:
        validate_table(mixed, "shard")
    assert e.value.kind == "detector"
    # volume and classes default to the detector's: a 100-voxel detector with 6 classes
    small = replace(LARTPC, name="small", extent=100.0, labels={"semantic": LabelSpace("semantic", tuple("abcdef"))})
    for ev in events:
        ev["coord"] *= 90 / 767
    events[1]["semantic"][0] = 5  # a class of `small`, not of LArTPC
    events[3]["coord"][0] = (50.0, 150.0, 50.0)  # outside `small`, inside LArTPC
    probs = find_problems(table_from_events(events, source="t", detector="small"), detector=small)
    assert [(p.row, p.field, p.kind) for p in probs] == [(3, "coord", "outside")]
    probs = find_problems(table_from_events(events, source="t"))
    assert [(p.row, p.field, p.kind) for p in probs] == [(1, "semantic", "label")]


def _truth(k: int, rng) -> dict:
    d = rng.normal(size=(k, 3))
    return {
        "id": np.arange(k),
        "interaction": np.zeros(k),
        "pid": rng.integers(0, 5, k),
        "mass": rng.uniform(0, 1000, k),
        "momentum": rng.uniform(0, 2000, k),
        "direction": d / np.linalg.norm(d, axis=1, keepdims=True),
        "vertex": rng.uniform(0, 768, (k, 3)),
        "primary": rng.integers(0, 2, k),
    }


def test_particles_truth_round_trips_through_a_shard_and_old_shards_read_as_null(tmp_path):
    from raysvc.data.streaming.shards import read_shard, write_shard
    from raysvc.storage import resolve

    rng = np.random.default_rng(0)
    events = [make_event(i, 20, rng) for i in range(3)]
    events[1]["particles"] = _truth(4, rng)
    root = resolve(str(tmp_path))
    rec = write_shard(root, "s.parquet", table_from_events(events, "mem"))
    got = read_shard(root, rec).column("particles").to_pylist()
    assert got[0] is None and got[2] is None and len(got[1]) == 4
    for f, want in events[1]["particles"].items():
        np.testing.assert_allclose(np.array([p[f] for p in got[1]], float), np.asarray(want, float), rtol=1e-6)
    # a table of the columns before `particles` existed is written (and read back) with a null column
    old = table_from_events(events[:1], "mem").drop_columns(["particles"])
    rec = write_shard(root, "old.parquet", old)
    assert read_shard(root, rec).column("particles").to_pylist() == [None]


@pytest.mark.parametrize("field", ["momentum", "mass", "direction"])
def test_bad_particle_truth_is_named(field):
    rng = np.random.default_rng(1)
    events = [make_event(i, 20, rng) for i in range(3)]
    for ev in events:
        ev["particles"] = _truth(3, rng)
    if field == "direction":
        events[2]["particles"]["direction"][1] = [0.5, 0.5, 0.0]
    else:
        events[2]["particles"][field][0] = -1.0
    with pytest.raises(EventDataError, match=rf"row 2, event_id 2, field 'particles': particle {field}"):
        validate_table(table_from_events(events, "mem"), "mem")
    events[2]["particles"]["momentum"][:] = np.nan  # unknown is allowed
    events[2]["particles"]["direction"][:] = np.nan
    events[2]["particles"]["mass"][:] = np.nan
    validate_table(table_from_events(events, "mem"), "mem")
    del events[0]["particles"]["vertex"]
    with pytest.raises(ValueError, match=r"missing field\(s\) \['vertex'\]"):
        table_from_events(events, "mem")
