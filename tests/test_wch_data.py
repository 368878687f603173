"""Water Cherenkov events as data: generated shards round trip with hit times, contributors and rings; the data
contract, the time normalisation, the voxel features and the unrolled tank are checked against hand calculations."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raysvc.data.contract.detectors import LARTPC
from raysvc.data.contract.detectors.wch import WCH
from raysvc.data.contract.schema import (
    EVENT_SCHEMA,
    check_columns,
    find_problems,
    flat_coords,
    flat_values,
    table_from_events,
)
from raysvc.data.sources.synthetic import generate_dataset
from raysvc.data.sources.wch_generator import WChGeneratorConfig, generate_wch_record, to_cube
from raysvc.data.streaming.shards import iter_tables, load_manifest, read_shard
from raysvc.data.streaming.transforms import PreprocessConfig, log_time, preprocess_table
from raysvc.data.tools.display_tank import unroll
from raysvc.inference.featurize import model_inputs
from raysvc.storage import resolve

# Few, bright events: short to draw
CFG = WChGeneratorConfig(particles={1: 1.0, 2: 1.0}, kinetic_mev=(200.0, 600.0))
WCH_PRE = PreprocessConfig(center=WCH.center, scale=WCH.scale, volume=WCH.extent, energy_threshold=0.0, min_points=1)


@pytest.fixture(scope="module")
def wch_data(tmp_path_factory):
    root = resolve(tmp_path_factory.mktemp("wch").as_uri() + "/d")
    generate_dataset(root, 3, seed=5, shard_events=2, cfg=CFG, show_progress=False, detector="wch")
    return root


def test_generated_shards_hold_the_generators_events(wch_data):
    manifest = load_manifest(wch_data)
    assert manifest.detector == "wch" and manifest.events == 3 and len(manifest.shards) == 2
    rows = pa.concat_tables([t for _, t in iter_tables(wch_data, manifest)])
    assert find_problems(rows, detector=WCH) == []
    for r in range(rows.num_rows):
        ref = generate_wch_record(CFG, 5, r)
        row = rows.slice(r, 1)
        np.testing.assert_array_equal(flat_values(row, "time"), np.asarray(ref["time"], np.float32))
        np.testing.assert_array_equal(flat_values(row, "energy"), np.asarray(ref["energy"], np.float32))
        assert row.column("rings")[0].as_py() == ref["rings"] >= 1
        owner, contributors = flat_values(row, "particle"), row.column("contributors")[0].as_py()
        assert len(contributors) == len(owner)
        # a hit's owner is one of the particles that lit it; a dark-noise hit has no owner and is the stuff class
        assert all(o in c for o, c in zip(owner, contributors, strict=True) if o >= 0)
        np.testing.assert_array_equal(flat_values(row, "semantic")[owner < 0], WCH.stuff_class)
        assert WCH.inside(flat_coords(row)).all()


def test_hits_without_times_break_the_water_cherenkov_contract(wch_data):
    table = read_shard(wch_data, load_manifest(wch_data).shards[0])
    t = table.column("time").combine_chunks()
    broken = pa.ListArray.from_arrays(
        pa.array(t.offsets.to_numpy()), t.values, type=t.type, mask=pa.array([False, True])
    )
    table = table.set_column(table.schema.get_field_index("time"), "time", broken)
    problems = find_problems(table, detector=WCH)
    assert [(p.row, p.field, p.kind) for p in problems] == [(1, "time", "missing")]
    assert "wch" in problems[0].message
    # NaN times are named as well
    vals = t.values.to_numpy().copy()
    vals[3] = np.nan
    table = table.set_column(
        table.schema.get_field_index("time"), "time", pa.ListArray.from_arrays(pa.array(t.offsets.to_numpy()), vals)
    )
    assert [(p.row, p.kind) for p in find_problems(table, detector=WCH)] == [(0, "nonfinite")]


def test_a_lartpc_shard_written_before_the_optional_columns_still_reads(tmp_path):
    ev = {
        "event_id": 7,
        "coord": np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], np.float32),
        "energy": np.array([0.5, 1.0], np.float32),
        **{k: np.zeros(2, np.int64) for k in ("semantic", "pid", "particle", "interaction", "fragment")},
    }
    table = table_from_events([ev], source="old", detector="lartpc")
    old = table.select([c for c in table.column_names if c not in ("particles", "time", "contributors", "rings")])
    new = table_from_events([ev], source="old", detector="lartpc")
    for name in ("time", "contributors", "rings"):
        assert new.column(name).null_count == 1  # an event without such truth: null, not empty
    path = tmp_path / "old.parquet"
    pq.write_table(old, path)
    back = pq.read_table(path)

    checked = check_columns(back, str(path))
    assert checked.schema.names == EVENT_SCHEMA.names
    assert find_problems(checked, detector=LARTPC) == []


def test_log_time_matches_a_hand_calculation():
    cfg = PreprocessConfig(time_scale_ns=50.0, time_cap_ns=4000.0)
    t = np.array([1000.0, 1010.0, 1500.0, 9000.0, -30.0, -30.0, 20.0], np.float32)
    rows = np.array([0, 0, 0, 0, 1, 1, 1])
    got = log_time(t, rows, 2, cfg)
    norm = math.log1p(4000 / 50)
    want = [2 * math.log1p(dt / 50) / norm - 1 for dt in (0, 10, 500, 4000, 0, 0, 50)]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert got.min() == -1.0 and got.max() == 1.0  # first hit -> -1, capped late hit -> +1


def test_a_tank_takes_its_own_frame_and_lartpc_settings_given_by_hand_name_what_to_set(wch_data):
    table = read_shard(wch_data, load_manifest(wch_data).shards[0])
    with pytest.raises(ValueError, match=r"volume is 768 .* 'wch' .*leave preprocess.center, scale and volume unset"):
        preprocess_table(table, PreprocessConfig(**LARTPC.preprocess_fields()), "shard", detector=WCH)
    out, counts = preprocess_table(table, WCH_PRE, "shard", detector=WCH)
    assert counts["out"] == 2 and out.num_rows == 2
    # left unset, the frame and the cuts are the tank's (WCH_PRE states them by hand)
    assert preprocess_table(table, PreprocessConfig(min_points=1), "shard", detector=WCH)[0].equals(out)
    norm = flat_values(out, "time")
    raw = flat_values(table, "time")
    np.testing.assert_allclose(
        norm, log_time(raw, np.repeat([0, 1], table.column("num_points").to_numpy()), 2, WCH_PRE)
    )


def test_a_cell_takes_the_mean_time_and_the_summed_charge_of_its_hits():
    rng = np.random.default_rng(0)
    n, scale, center, grid = 400, 100.0, 50.0, 10.0
    voxel = rng.integers(0, 40, size=(n, 3)).astype(np.float64)  # dense enough that cells hold several hits
    energy, t = rng.uniform(0, 1, n), rng.uniform(-1, 1, n)
    batch = {
        "coord": torch.tensor((voxel - center) / scale, dtype=torch.float32),
        "energy": torch.tensor(energy, dtype=torch.float32).unsqueeze(1),
        "time": torch.tensor(t, dtype=torch.float32).unsqueeze(1),
        "offset": torch.tensor([150, n]),
        "semantic": torch.zeros(n, dtype=torch.long),
    }
    inp = model_inputs(batch, center, scale, grid, torch.device("cpu"))
    assert inp["feat"].shape[1] == 5
    cells = {}  # brute force: hits per (event, cell)
    for i in range(n):
        key = (int(i >= 150), *np.floor(voxel[i] / grid).astype(int))
        cells.setdefault(key, []).append(i)
    assert len(cells) == len(inp["feat"])
    inv = inp["inverse"].numpy()
    for members in cells.values():
        c = inv[members[0]]
        assert (inv[members] == c).all()
        assert inp["feat"][c, 3].item() == pytest.approx(energy[members].sum(), rel=1e-5)
        assert inp["feat"][c, 4].item() == pytest.approx(t[members].mean(), rel=1e-5, abs=1e-6)
    # without hit times the inputs are the LArTPC ones: xyz + summed energy
    del batch["time"]
    assert model_inputs(batch, center, scale, grid, torch.device("cpu"))["feat"].shape[1] == 4


def test_the_unrolled_tank_puts_wall_and_caps_where_they_belong():
    r, h = WCH.cylinder
    pts_m = np.array(
        [
            [r / 100, 0, 0],  # barrel at phi = 0, mid-height
            [0, r / 100, 5.0],  # barrel at phi = 90 deg, 5 m up
            [0, 0, h / 100],  # centre of the top cap
            [0, 0, -h / 100],  # centre of the bottom cap
            [3.0, 4.0, h / 100],  # on the top cap, off centre
        ]
    )
    flat, part = unroll(to_cube(pts_m), WCH)
    assert part.tolist() == [0, 0, 1, -1, 1]
    np.testing.assert_allclose(flat[0], [0, 0], atol=0.05)
    np.testing.assert_allclose(flat[1], [r * math.pi / 2, 500], atol=0.05)
    np.testing.assert_allclose(flat[2], [0, h + r], atol=0.05)
    np.testing.assert_allclose(flat[3], [0, -h - r], atol=0.05)
    np.testing.assert_allclose(flat[4], [300, h + r + 400], atol=0.05)
    # the barrel is 2 pi R wide and no cap overlaps it
    assert np.abs(flat[part == 0, 0]).max() <= math.pi * r


def test_cli_generates_water_cherenkov_shards_and_inspect_counts_rings(tmp_path):
    raysvc = str(Path(sys.executable).parent / "raysvc")
    out = tmp_path.as_uri() + "/cli"
    cmd = [raysvc, "data", "generate", "--detector", "wch", "--events", "2", "--seed", "1", "--out", out]
    p = subprocess.run([*cmd, "--workers", "1", "--set", "kinetic_mev=[300,500]"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    p = subprocess.run([raysvc, "data", "inspect", out], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "rings/event:" in p.stdout and "noise" in p.stdout
    assert load_manifest(resolve(out)).detector == "wch"


def test_data_show_draws_a_tank_event_unrolled(wch_data, tmp_path):
    """`raysvc data show` on water Cherenkov events takes the detector's display: a PNG of the unrolled tank, and
    the figure closed afterwards."""
    import matplotlib.pyplot as plt

    from raysvc.data.tools.display import show_event

    png = tmp_path / "tank.png"
    assert show_event(wch_data, 1, str(png)) == str(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert plt.get_fignums() == []
