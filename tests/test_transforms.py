"""Preprocessing against a per-event brute-force reference, and the error / skip policies."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raysvc.data.contract.detectors import LARTPC
from raysvc.data.contract.schema import EventDataError, table_from_events
from raysvc.data.streaming.transforms import PreprocessConfig, log_energy, preprocess_table, report
from tests.conftest import make_event


def reference(events, cfg: PreprocessConfig):
    """Straightforward per-event implementation of the preprocessing of docs/methods.md."""
    out = []
    for ev in events:
        keep = ev["energy"] > cfg.energy_threshold
        if cfg.remove_led:
            keep &= ev["semantic"] != 4
        if keep.sum() < cfg.min_points:
            continue
        e = ev["energy"][keep].astype(np.float64)
        m, emax = 0.01, 20.0
        out.append(
            {
                "event_id": ev["event_id"],
                "coord": (ev["coord"][keep] - 384.0) / (768 * math.sqrt(3) / 2),
                "energy": 2 * (np.log10(e + m) - np.log10(m)) / (np.log10(emax + m) - np.log10(m)) - 1,
                "semantic": ev["semantic"][keep],
                "particle": ev["particle"][keep],
            }
        )
    return out


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000), min_points=st.integers(1, 60), remove_led=st.booleans(), threshold=st.floats(0.0, 3.0)
)
def test_matches_reference(seed, min_points, remove_led, threshold):
    rng = np.random.default_rng(seed)
    events = [make_event(i, int(rng.integers(0, 120)) or 1, rng) for i in range(6)]
    for ev in events:
        ev["energy"] = rng.exponential(1.0, len(ev["energy"])).astype(np.float32)
    cfg = PreprocessConfig(energy_threshold=threshold, min_points=min_points, remove_led=remove_led)
    table, counts = preprocess_table(table_from_events(events, "t"), cfg, "mem")
    want = reference(events, cfg)
    assert table.column("event_id").to_pylist() == [w["event_id"] for w in want]
    assert counts["cut:min_points"] == len(events) - len(want)
    for i, w in enumerate(want):
        row = table.slice(i, 1)
        np.testing.assert_allclose(np.asarray(row.column("coord")[0].as_py()), w["coord"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(row.column("energy")[0].as_py()), w["energy"], rtol=1e-5, atol=1e-6)
        assert row.column("semantic")[0].as_py() == w["semantic"].tolist()
        assert row.column("particle")[0].as_py() == w["particle"].tolist()
        assert row.column("num_points")[0].as_py() == len(w["semantic"])


def test_log_energy_endpoints():
    cfg = PreprocessConfig().resolved(LARTPC)
    np.testing.assert_allclose(log_energy(np.array([0.0, 20.0]), cfg), [-1.0, 1.0], atol=1e-6)


def _with_bad_event():
    rng = np.random.default_rng(5)
    events = [make_event(i, 40, rng) for i in range(4)]
    events[2]["coord"][1, 2] = np.inf
    events[3]["energy"][0] = -2.0
    return table_from_events(events, "t")


def test_error_policy_names_shard_and_event():
    with pytest.raises(EventDataError, match=r"shard s3://b/e-1.parquet, row 2, event_id 2, field 'coord'"):
        preprocess_table(_with_bad_event(), PreprocessConfig(min_points=1), "s3://b/e-1.parquet", row_base=0)


def test_skip_policy_counts_everything():
    cfg = PreprocessConfig(min_points=1, on_bad="skip")
    table, counts = preprocess_table(_with_bad_event(), cfg, "shard")
    assert table.column("event_id").to_pylist() == [0, 1]
    rep = report(counts)
    assert rep["skipped_bad"] == {"nonfinite": 1, "negative": 1}
    assert rep["events_read"] == 4 and rep["events_out"] == 2
    assert rep["events_read"] == rep["events_out"] + rep["skipped_bad_total"] + rep["cut_min_points"]


def test_skip_policy_whole_batch_on_schema_problem():
    table = _with_bad_event().drop_columns(["fragment"])
    out, counts = preprocess_table(table, PreprocessConfig(on_bad="skip"), "shard")
    assert out.num_rows == 0 and counts["bad:schema"] == 4
    with pytest.raises(EventDataError, match="missing column"):
        preprocess_table(table, PreprocessConfig(), "shard")


def test_subset_filter_counted():
    rng = np.random.default_rng(0)
    events = [make_event(i, 30, rng) for i in range(5)]
    out, counts = preprocess_table(
        table_from_events(events, "t"), PreprocessConfig(min_points=1), "s", keep_ids=np.array([1, 3])
    )
    assert out.column("event_id").to_pylist() == [1, 3] and counts["selected_out"] == 3


def test_detector_drives_checks_and_led_removal():
    from dataclasses import replace

    default = PreprocessConfig().resolved(LARTPC)
    assert (default.center, default.scale, default.volume) == (LARTPC.center, LARTPC.scale, LARTPC.extent)
    rng = np.random.default_rng(3)
    events = [make_event(i, 40, rng) for i in range(3)]
    # events of another detector in a LArTPC dataset: bad input, named, or skipped and counted
    other = table_from_events(events, "t", detector="toy")
    with pytest.raises(EventDataError, match=r"row 0, event_id 0, field 'detector'") as e:
        preprocess_table(other, PreprocessConfig(min_points=1), "shard", row_base=0)
    assert e.value.kind == "detector"
    out, counts = preprocess_table(other, PreprocessConfig(min_points=1, on_bad="skip"), "shard")
    assert out.num_rows == 0 and counts["bad:detector"] == 3
    # remove_led drops the detector's stuff class, whatever its id, and the classes after it move down by one, so
    # that the labels index Detector.label_classes(True)
    toy = replace(LARTPC, name="toy", stuff_class=0)
    cfg = PreprocessConfig(min_points=1, energy_threshold=0.0, remove_led=True)
    out, _ = preprocess_table(other, cfg, "shard", detector=toy)
    assert out.schema.field("semantic").type == other.schema.field("semantic").type
    sem = np.concatenate([np.asarray(s) for s in out.column("semantic").to_pylist()])
    want = np.concatenate([ev["semantic"][ev["semantic"] != 0] for ev in events])
    assert {0, 4} <= {int(s) for ev in events for s in ev["semantic"]}  # the removed class and the last one occur
    np.testing.assert_array_equal(sem, want - 1)
    names = toy.label_classes(True)
    assert names == LARTPC.class_names[1:]
    assert [names[s] for s in sem] == [LARTPC.class_names[s] for s in want]
    assert LARTPC.label_classes(True) == LARTPC.class_names[:4] and LARTPC.label_classes() == LARTPC.class_names
    with pytest.raises(ValueError, match="detector 'none' has no stuff class"):
        preprocess_table(other, cfg, "shard", detector=replace(toy, name="none", stuff_class=None))


def test_unset_fields_resolve_to_the_detector_and_set_ones_win():
    """LArTPC's resolved values are the defaults preprocessing had before they moved to the detector; the water
    Cherenkov tank's are what its jobs used to state by hand; a job's own value wins over the detector's."""
    from raysvc.data.contract.detectors.wch import WCH

    fields = ("energy_threshold", "min_points", "center", "scale", "log_emax", "volume")
    assert all(getattr(PreprocessConfig(), k) is None for k in fields)
    lartpc = PreprocessConfig().resolved(LARTPC)
    assert {k: getattr(lartpc, k) for k in fields} == {
        "energy_threshold": 0.13,
        "min_points": 1024,
        "center": 384.0,
        "scale": 768 * math.sqrt(3) / 2,
        "log_emax": 20.0,
        "volume": 768.0,
    }
    assert (lartpc.log_m, lartpc.time_scale_ns, lartpc.time_cap_ns, lartpc.remove_led) == (0.01, 50.0, 4000.0, False)
    # the block the WCh jobs repeated before the detector stated it
    block = {"center": 1850, "scale": 1810, "volume": 3700, "energy_threshold": 0.0, "min_points": 16, "log_emax": 50}
    assert PreprocessConfig().resolved(WCH) == PreprocessConfig(**block)
    mine = PreprocessConfig(min_points=4, center=10.0).resolved(WCH)
    assert (mine.min_points, mine.center, mine.scale) == (4, 10.0, 1810.0)
    assert mine.resolved(LARTPC) is mine  # nothing left to fill: resolved once, for good
