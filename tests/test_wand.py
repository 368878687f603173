"""The WAND / LUCiD reader on files written by these tests in the published layout (sensor/, hits/, labl/ folders,
`event_NNN` groups), filled from our own generator's events so that every converted column has a known answer."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pytest

from raysvc.data.sources.wand import WandFormatError, convert, tank_frame
from raysvc.data.sources.wch_generator import CATEGORIES, WChGeneratorConfig, generate_wch_event, pmt_layout, to_cube
from raysvc.data.streaming.shards import load_manifest, read_shard
from raysvc.storage import resolve

PDG = {"gamma": 22, "electron": 11, "muon": 13, "pion": 211, "pi0": 111}
UNIT = {"m": 1.0, "mm": 1000.0}
CFG = WChGeneratorConfig()


@pytest.fixture(scope="module")
def events():
    return [generate_wch_event(CFG, 5, i) for i in range(3)]


def _hits_of(ev) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The per-(particle, PMT) light written to hits/: the owner gets 0.7 of the charge and the other contributors
    share the rest (all of it when it is alone); a dark PMT gets a dark-noise row (particle -1)."""
    p_idx, s_idx, pe = [], [], []
    for pmt, q, owner, contrib in zip(ev["pmt"], ev["charge"], ev["particle"], ev["contributors"], strict=True):
        others = [c for c in contrib if c != owner]
        if owner < 0:
            p_idx.append(-1), s_idx.append(pmt), pe.append(q)
            continue
        share = 0.7 if others else 1.0
        p_idx.append(owner), s_idx.append(pmt), pe.append(share * q)
        for c in others:
            p_idx.append(c), s_idx.append(pmt), pe.append(0.3 * q / len(others))
    return np.array(p_idx, np.int32), np.array(s_idx, np.uint16), np.array(pe, np.float32)


def write_wand(root: Path, num: int, evs: list, axis: int = 2, unit: str = "m", empty_at: int | None = None) -> None:
    """Files wc_{sensor,hits,labl}_NNNN.h5 in the published layout. The tank's axis goes to `axis` and lengths are in
    `unit`; an event without hits is put at position `empty_at`."""
    order = [0, 1, 2]
    order[axis], order[2] = 2, axis
    pos = pmt_layout(CFG)[0][:, order] * UNIT[unit]
    groups = list(evs)
    if empty_at is not None:
        groups.insert(empty_at, None)
    for m in ("sensor", "hits", "labl"):
        (root / m).mkdir(exist_ok=True)
    files = {m: h5py.File(root / m / f"wc_{m}_{num:04d}.h5", "w") for m in ("sensor", "hits", "labl")}
    for m, f in files.items():
        cfg = f.create_group("config")
        cfg.attrs["format_version"] = 5
        cfg.create_dataset("source_event_idx", data=np.arange(len(groups), dtype=np.uint32) + 100 * num)
        if m in ("sensor", "hits"):
            cfg.create_dataset("sensor_positions", data=pos.astype(np.float32))
    for k, ev in enumerate(groups):
        g = {m: f.create_group(f"event_{k:03d}") for m, f in files.items()}
        for grp in g.values():
            grp.attrs["source_event_idx"] = 100 * num + k
        if ev is None:
            for name, dt in (("sensor_idx", np.uint16), ("PE", np.float32), ("T", np.float32)):
                g["sensor"].create_dataset(name, data=np.zeros(0, dt))
            for name, dt in (("particle_idx", np.int32), ("sensor_idx", np.uint16), ("PE", np.float32)):
                g["hits"].create_dataset(name, data=np.zeros(0, dt))
            pp, pt = g["labl"].create_group("per_particle"), g["labl"].create_group("per_track")
            pp.create_dataset("category", data=np.zeros(0, np.uint8))
            for name in ("track_id", "pdg", "particle_idx"):
                pt.create_dataset(name, data=np.zeros(0, np.int32))
            pt.create_dataset("initial_energy", data=np.zeros(0, np.float32))
            continue
        # two digits on every other PMT: the charge split 0.4 / 0.6, the second 30 ns later
        two = np.arange(len(ev["pmt"])) % 2 == 0
        g["sensor"].attrs["n_hits"] = len(ev["pmt"]) + int(two.sum())
        g["sensor"].create_dataset("sensor_idx", data=np.concatenate([ev["pmt"], ev["pmt"][two]]).astype(np.uint16))
        q = ev["charge"].astype(np.float64)
        g["sensor"].create_dataset("PE", data=np.concatenate([np.where(two, 0.4 * q, q), 0.6 * q[two]]).astype("f4"))
        g["sensor"].create_dataset("T", data=np.concatenate([ev["time"], ev["time"][two] + 30.0]).astype(np.float32))
        p_idx, s_idx, pe = _hits_of(ev)
        for name, v in (("particle_idx", p_idx), ("sensor_idx", s_idx), ("PE", pe)):
            g["hits"].create_dataset(name, data=v)
        g["hits"].create_dataset("T", data=np.zeros(len(pe), np.float32))
        parts = ev["particles"]
        n = len(parts["pid"])
        species = [CATEGORIES[c] for c in parts["pid"]]
        kinetic = np.sqrt(parts["momentum"].astype(np.float64) ** 2 + parts["mass"] ** 2) - parts["mass"]
        pp = g["labl"].create_group("per_particle")
        pp.create_dataset("category", data=np.where(parts["primary"] == 1, 0, 3).astype(np.uint8))
        pp.create_dataset("interaction_idx", data=np.zeros(n, np.int32))
        pp.create_dataset("genealogy_data", data=np.arange(n, dtype=np.int32) + 100)  # each chain: its own track
        pp.create_dataset("genealogy_offsets", data=np.arange(n + 1, dtype=np.uint32))
        pt = g["labl"].create_group("per_track")  # the particles' tracks, then one housekeeping track of particle 0
        pt.create_dataset("track_id", data=np.append(np.arange(n) + 100, 7).astype(np.int32))
        pt.create_dataset("pdg", data=np.array([PDG[s] for s in species] + [2112], np.int32))
        pt.create_dataset("particle_idx", data=np.append(np.arange(n), 0).astype(np.int32))
        pt.create_dataset("initial_energy", data=np.append(kinetic, 1.0).astype(np.float32))
        pi = g["labl"].create_group("per_interaction")
        for c, v in zip("xyz", np.asarray(ev["vertex"])[order] * UNIT[unit], strict=True):
            pi.create_dataset(f"vertex_{c}", data=np.array([v], np.float32))
        pe_g = g["labl"].create_group("per_event")
        pe_g.create_dataset("t0", data=np.float32(0))
    for f in files.values():
        f.close()


@pytest.fixture(scope="module")
def wand_root(tmp_path_factory, events):
    root = tmp_path_factory.mktemp("wand")
    write_wand(root, 0, events[:2], axis=2, unit="m", empty_at=1)
    write_wand(root, 1, events[2:], axis=1, unit="mm")
    return root


def test_converted_events_match_the_generated_ones(wand_root, events, tmp_path):
    m = convert(str(wand_root / "**" / "*.h5"), resolve(str(tmp_path / "out")), shard_events=2, show_progress=False)
    assert m.detector == "wch" and m.events == 3
    assert m.created_by["skipped"]["events_without_hits"] == 1
    assert m.created_by["skipped"]["pmts_of_other_species"] == 0
    table = pa.concat_tables([read_shard(resolve(str(tmp_path / "out")), r) for r in m.shards])
    rows = table.to_pylist()
    expected = ["wc_sensor_0000.h5#event_000", "wc_sensor_0000.h5#event_002", "wc_sensor_0001.h5#event_000"]
    assert [r["source"] for r in rows] == expected
    pos = pmt_layout(CFG)[0]
    for ev, row in zip(events, rows, strict=True):
        # the PMT's position back in the tank frame (whatever the file's axis and units), summed charge, first time
        np.testing.assert_allclose(np.array(row["coord"]), to_cube(pos[ev["pmt"]]), atol=0.05)
        np.testing.assert_allclose(row["energy"], ev["charge"], rtol=1e-5)
        np.testing.assert_allclose(row["time"], ev["time"], atol=1e-4)
        # the owner is the particle with most of the PMT's light; its class from its track's PDG code
        assert row["particle"] == ev["particle"].tolist()
        assert [sorted(c) for c in row["contributors"]] == [sorted(c.tolist()) for c in ev["contributors"]]
        assert row["pid"] == np.where(ev["particle"] >= 0, ev["category"], -1).tolist()
        noise = 4  # the stuff class
        assert row["semantic"] == np.where(ev["particle"] >= 0, ev["category"], noise).tolist()
        # rings: particles (not pi0) with >= 20 PE of the written light
        p_idx, _, pe = _hits_of(ev)
        light = np.bincount(p_idx[p_idx >= 0], pe[p_idx >= 0], minlength=len(ev["particles"]["pid"]))
        species = [CATEGORIES[c] for c in ev["particles"]["pid"]]
        assert row["rings"] == sum(1 for s, q in zip(species, light, strict=True) if s != "pi0" and q >= 20)
        parts = row["particles"]
        assert [p["pid"] for p in parts] == ev["particles"]["pid"].tolist()
        np.testing.assert_allclose([p["momentum"] for p in parts], ev["particles"]["momentum"], rtol=1e-3, atol=0.05)
        vertex = np.tile(to_cube(ev["vertex"]), (len(parts), 1))
        np.testing.assert_allclose([p["vertex"] for p in parts], vertex, atol=0.05)
        assert [p["primary"] for p in parts] == ev["particles"]["primary"].tolist()


def test_tank_frame_finds_axis_and_units_and_refuses_another_tank():
    pos = pmt_layout(CFG)[0]
    for axis, unit in ((0, "mm"), (1, "m"), (2, "mm")):
        order = [0, 1, 2]
        order[axis], order[2] = 2, axis
        back, info = tank_frame(pos[:, order] * UNIT[unit], "f.h5")
        assert info["axis"] == "xyz"[axis] and info["units"] == unit
        np.testing.assert_allclose(np.sort(back[:, 2]), np.sort(pos[:, 2]), atol=1e-6)
    with pytest.raises(WandFormatError, match=r"f\.h5.*radius .*Super-K-like"):
        tank_frame(pos * 0.5, "f.h5")
    with pytest.raises(WandFormatError, match=r"f\.h5: config/sensor_positions do not lie on a cylinder"):
        tank_frame(np.random.default_rng(0).normal(size=(500, 3)), "f.h5")


def test_bad_files_are_named(tmp_path, events):
    root = tmp_path / "w"
    root.mkdir()
    write_wand(root, 3, events[:1])
    (root / "labl" / "wc_labl_0003.h5").unlink()
    with pytest.raises(FileNotFoundError, match=r"file number 0003.*no labl file"):
        convert(str(root / "**" / "*.h5"), resolve(str(tmp_path / "o1")), show_progress=False)

    write_wand(root, 3, events[:1])
    with h5py.File(root / "hits" / "wc_hits_0003.h5", "a") as f:
        f["event_000"].attrs["source_event_idx"] = 999
    with pytest.raises(WandFormatError, match=r"wc_sensor_0003\.h5#event_000: source_event_idx differs"):
        convert(str(root / "**" / "*.h5"), resolve(str(tmp_path / "o2")), show_progress=False)

    write_wand(root, 3, events[:1])
    with h5py.File(root / "sensor" / "wc_sensor_0003.h5", "a") as f:
        idx = f["event_000"]["sensor_idx"][()]
        idx[0] = 60000
        del f["event_000"]["sensor_idx"]
        f["event_000"].create_dataset("sensor_idx", data=idx)
    with pytest.raises(WandFormatError, match=r"wc_sensor_0003\.h5#event_000: sensor_idx outside \[0, "):
        convert(str(root / "**" / "*.h5"), resolve(str(tmp_path / "o3")), show_progress=False)


def test_cli_convert_wand_then_inspect(wand_root, tmp_path):
    out = tmp_path / "cli"
    run = lambda *a: subprocess.run([sys.executable, "-m", "raysvc.cli", *a], capture_output=True, text=True)  # noqa: E731
    r = run("data", "convert-wand", str(wand_root / "**" / "*.h5"), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "converted 3 events" in r.stdout and "events_without_hits 1" in r.stdout
    assert load_manifest(resolve(str(out))).detector == "wch"
    r = run("data", "inspect", str(out))
    assert r.returncode == 0 and "rings" in r.stdout, r.stderr
