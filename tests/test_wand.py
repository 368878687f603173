"""The WAND / LUCiD reader on trees written by these tests in the layout of LUCiD's format-5 writer
(`config_NNNNNN/{sensor,hits,edep,labl}/wc_<modality>_NNNN.h5`, `event_NNN` groups, every dataset, dtype and attribute
that writer produces), filled from our own generator's events and from hand-made ones (pile-up, a pi -> mu -> e chain,
t0 below zero, an event without hits) so that every converted column has a known answer."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pytest

from raysvc.data.contract.detectors.wch import WCH
from raysvc.data.sources.wand import WandFormatError, convert, tank_frame
from raysvc.data.sources.wch_generator import CATEGORIES, WChGeneratorConfig, generate_wch_event, pmt_layout, to_cube
from raysvc.data.streaming.shards import load_manifest, read_shard
from raysvc.storage import list_files, resolve
from tests.conftest import s3_location

PDG = {"gamma": 22, "electron": 11, "muon": 13, "pion": 211, "pi0": 111}
UNIT = {"m": 1.0, "mm": 1000.0}
CFG = WChGeneratorConfig()
GZ = {"compression": "gzip", "compression_opts": 4}


@pytest.fixture(scope="module")
def events():
    return [generate_wch_event(CFG, 5, i) for i in range(5)]


def _hits_of(ev) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The per-(particle, PMT) light written to hits/: the owner gets 0.7 of the charge and the other contributors
    share the rest (all of it when it is alone); a dark PMT gets a dark-noise row (particle -1, as newer writers do)."""
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


def spec_of(ev, t0: float = 0.0) -> dict:
    """A generated event as what the writer stores (tank frame, metres, ns): every other PMT records two digits
    (charge split 0.4 / 0.6, the second 30 ns later); each particle owns one track (id 100 + i, two segments from its
    start along its direction) and particle 0 also a housekeeping neutron track (id 7) that is not its own."""
    two = np.arange(len(ev["pmt"])) % 2 == 0
    q = ev["charge"].astype(np.float64)
    time = ev["time"].astype(np.float64) + t0
    p_idx, s_idx, pe = _hits_of(ev)
    parts = ev["particles"]
    species = [CATEGORIES[c] for c in parts["pid"]]
    kinetic = np.sqrt(parts["momentum"].astype(np.float64) ** 2 + parts["mass"] ** 2) - parts["mass"]
    tracks = [
        {"id": 7, "parent": 100, "pdg": 2112, "energy": 1.0, "particle": 0, "segments": [(ev["vertex"], [0, 0, 1])]}
    ]
    for k, s in enumerate(species):
        start, d = parts["vertex"][k].astype(np.float64), parts["direction"][k].astype(np.float64)
        segs = [(start, d), (start + 0.1 * d, d)]
        tracks.append(
            {"id": 100 + k, "parent": 0, "pdg": PDG[s], "energy": kinetic[k], "particle": k, "segments": segs}
        )
    return {
        "sensor": (
            np.concatenate([ev["pmt"], ev["pmt"][two]]),
            np.concatenate([np.where(two, 0.4 * q, q), 0.6 * q[two]]),
            np.concatenate([time, time[two] + 30.0]),
        ),
        "hits": (p_idx, s_idx, pe, time[np.searchsorted(ev["pmt"], s_idx)]),
        "interactions": [{"vertex": np.asarray(ev["vertex"], float), "t0": t0}],
        "particles": [
            {"category": 0 if parts["primary"][k] else 3, "genealogy": [100 + k], "interaction": 0}
            for k in range(len(species))
        ],
        "tracks": tracks,
    }


def pileup_spec(a, b) -> dict:
    """Two generated events overlaid as two interactions: b's particles after a's, its track ids moved past a's."""
    sa, sb = spec_of(a), spec_of(b, t0=40.0)
    n_a = len(sa["particles"])
    sensor = tuple(np.concatenate([x, y]) for x, y in zip(sa["sensor"], sb["sensor"], strict=True))
    pb = sb["hits"][0]
    hits = (np.concatenate([sa["hits"][0], np.where(pb >= 0, pb + n_a, -1)]),) + tuple(
        np.concatenate([x, y]) for x, y in zip(sa["hits"][1:], sb["hits"][1:], strict=True)
    )
    moved = [
        t | {"id": t["id"] + 1000, "parent": t["parent"] + 1000 if t["parent"] else 0, "particle": t["particle"] + n_a}
        for t in sb["tracks"]
    ]
    parts = sa["particles"] + [
        p | {"genealogy": [g + 1000 for g in p["genealogy"]], "interaction": 1} for p in sb["particles"]
    ]
    return {
        "sensor": sensor,
        "hits": hits,
        "interactions": sa["interactions"] + sb["interactions"],
        "particles": parts,
        "tracks": sorted(sa["tracks"] + moved, key=lambda t: t["id"]),
    }


CHAIN_VERTEX, PION_END, MUON_END = np.array([1.0, 2.0, 3.0]), np.array([2.0, 2.0, 3.0]), np.array([2.0, 2.3, 3.0])


def chain_spec() -> dict:
    """pi+ -> mu+ -> e+: the pion (a primary particle) from the vertex along +x, the muon (not a particle of its own:
    no category) from the pion's end along +y, the positron (a decay electron) from the muon's end along -z. A
    secondary starts where its own track starts, 1.3 m from the vertex here."""
    pion_pmts, e_pmts = np.arange(100, 160, 2), np.arange(900, 920)
    pmts = np.concatenate([pion_pmts, e_pmts])
    pe = np.concatenate([np.full(len(pion_pmts), 12.0), np.full(len(e_pmts), 5.0)])
    t = np.linspace(5.0, 60.0, len(pmts))
    owner = np.concatenate([np.zeros(len(pion_pmts)), np.ones(len(e_pmts))]).astype(np.int32)
    x, y, z = np.eye(3)
    return {
        "sensor": (pmts, pe, t),
        "hits": (owner, pmts, pe, t),
        "interactions": [{"vertex": CHAIN_VERTEX, "t0": 0.0}],
        "particles": [
            {"category": 0, "genealogy": [1], "interaction": 0},
            {"category": 1, "genealogy": [1, 3], "interaction": 0},
        ],
        "tracks": [
            {"id": 1, "parent": 0, "pdg": 211, "energy": 400.0, "particle": 0, "segments": [(CHAIN_VERTEX, x)]},
            {"id": 2, "parent": 1, "pdg": -13, "energy": 4.1, "particle": -1, "segments": [(PION_END, y)]},
            {
                "id": 3,
                "parent": 2,
                "pdg": -11,
                "energy": 35.0,
                "particle": 1,
                "segments": [(MUON_END, -z), (MUON_END - 0.2 * z, -z)],
            },
        ],
    }


def _ds(g, name, data, dtype):
    g.create_dataset(name, data=np.asarray(data, dtype).reshape(-1), **GZ)


def _csr(g, name, lists, dtype):
    _ds(g, f"{name}_offsets", np.cumsum([0] + [len(x) for x in lists]), np.uint32)
    _ds(g, f"{name}_data", [v for x in lists for v in x], dtype)


def write_wand(config_dir: Path, num: int, specs: list, axis: int = 2, unit: str = "m", version: int = 5) -> None:
    """Files wc_{sensor,hits,edep,labl}_NNNN.h5 of one configuration, as LUCiD's format-5 writer lays them out;
    `specs` holds an event's spec or None for an event without hits or tracks. The tank's axis goes to `axis` and
    lengths are in `unit` (the writer uses metres; the reader finds either)."""
    order = [0, 1, 2]
    order[axis], order[2] = 2, axis
    pos = pmt_layout(CFG)[0][:, order] * UNIT[unit]
    where = lambda v: np.asarray(v, float).reshape(-1, 3)[:, order] * UNIT[unit]  # noqa: E731
    mods = ("sensor", "hits", "edep", "labl")
    for m in mods:
        (config_dir / m).mkdir(parents=True, exist_ok=True)
    files = {m: h5py.File(config_dir / m / f"wc_{m}_{num:04d}.h5", "w") for m in mods}
    for m, f in files.items():
        c = f.create_group("config")
        for k, v in {
            "format_version": version,
            "n_events": len(specs),
            "git_commit": "unknown",
            "run_id": "r1",
            "dataset_name": "wc",
            "file_index": num,
            "source_file": "/sim/in.root",
            "lucid_master_seed": 7,
            "photonsim_seed": -1,
        }.items():
            c.attrs[k] = v
        _ds(c, "source_event_idx", np.arange(len(specs)) + 100 * num, np.uint32)
        if m in ("sensor", "hits"):
            c.attrs.update({"n_sensors": len(pos), "detector_type": "SK_like", "material": "water"})
            c.create_dataset("sensor_positions", data=pos.astype(np.float32), **GZ)
        if m == "sensor":
            c.attrs.update({"smearing_applied": True, "smearing_charge_function": "SK_like"})
        if m == "edep":
            c.attrs.update({"detector_type": "SK_like", "material": "water", "detector_shape": "cylinder"})
        if m == "labl":
            c.attrs["label_names"] = np.array(["category"], dtype=h5py.string_dtype())
    for k, spec in enumerate(specs):
        g = {m: f.create_group(f"event_{k:03d}") for m, f in files.items()}
        for grp in g.values():
            grp.attrs["source_event_idx"] = 100 * num + k
        spec = spec or {
            "sensor": ([], [], []),
            "hits": ([], [], [], []),
            "interactions": [{"vertex": np.zeros(3), "t0": 0.0}],
            "particles": [],
            "tracks": [],
        }
        s_idx, s_pe, s_t = spec["sensor"]
        g["sensor"].attrs["n_hits"] = len(s_idx)
        (
            _ds(g["sensor"], "sensor_idx", s_idx, np.uint16),
            _ds(g["sensor"], "PE", s_pe, "f4"),
            _ds(g["sensor"], "T", s_t, "f4"),
        )
        h_p, h_s, h_pe, h_t = spec["hits"]
        g["hits"].attrs.update({"n_particles": len(spec["particles"]), "n_particle_hits": len(h_p)})
        for name, v, dt in (
            ("particle_idx", h_p, np.int32),
            ("sensor_idx", h_s, np.uint16),
            ("PE", h_pe, "f4"),
            ("T", h_t, "f4"),
            ("T_reco", h_t, "f4"),
        ):
            _ds(g["hits"], name, v, dt)
        tracks, parts, inter = spec["tracks"], spec["particles"], spec["interactions"]
        segs = [(ti, s, d) for ti, t in enumerate(tracks) for s, d in t["segments"]]
        e = g["edep"]
        e.attrs.update({"n_tracks": len(tracks), "n_segments": len(segs)})
        _ds(e, "track_idx", [ti for ti, _, _ in segs], np.int32)
        starts, dirs = where([s for _, s, _ in segs]), np.asarray([d for _, _, d in segs], float).reshape(-1, 3)
        for c, col in zip("xyz", range(3), strict=True):
            _ds(e, f"start_{c}", starts[:, col], "f4"), _ds(e, f"end_{c}", starts[:, col] + 0.05, "f4")
            _ds(e, f"dir_{c}", dirs[:, order][:, col], "f2")
        for name, dt in (("edep", "f4"), ("time", "f4"), ("beta_start", "f4")):
            _ds(e, name, np.ones(len(segs)), dt)
        _ds(e, "n_cherenkov", np.full(len(segs), 50), np.int32), _ds(e, "group_id", np.arange(len(segs)), np.int32)
        _ds(e, "contained", np.ones(len(segs)), bool)
        lab = g["labl"]
        lab.attrs.update({"n_particles": len(parts), "n_tracks": len(tracks)})
        pe_g = lab.create_group("per_event")
        pe_g.create_dataset("contained", data=np.bool_(bool(parts)))
        pe_g.create_dataset("t0", data=np.float32(min(i["t0"] for i in inter)))
        pi = lab.create_group("per_interaction")
        _ds(pi, "source_type", np.zeros(len(inter)), np.uint8), _ds(pi, "t0", [i["t0"] for i in inter], "f4")
        for c, col in zip("xyz", range(3), strict=True):
            _ds(pi, f"vertex_{c}", where([i["vertex"] for i in inter])[:, col], "f4")
        primaries = [
            [
                t
                for t in tracks
                if t["parent"] == 0 and parts and t["particle"] >= 0 and parts[t["particle"]]["interaction"] == n
            ]
            for n in range(len(inter))
        ]
        _ds(pi, "n_primaries", [len(p) for p in primaries], np.int32)
        _ds(pi, "n_particles", [sum(p["interaction"] == n for p in parts) for n in range(len(inter))], np.int32)
        (
            _ds(pi, "neutrino_pdg", np.zeros(len(inter)), np.int16),
            _ds(pi, "neutrino_energy_MeV", np.zeros(len(inter)), "f4"),
        )
        _ds(pi, "contained", np.ones(len(inter)), bool)
        _csr(pi, "primary_track_ids", [[t["id"] for t in p] for p in primaries], np.int32)
        _csr(pi, "primary_pdgs", [[t["pdg"] for t in p] for p in primaries], np.int16)
        _csr(pi, "primary_energies", [[t["energy"] for t in p] for p in primaries], "f4")
        pp = lab.create_group("per_particle")
        _ds(pp, "category", [p["category"] for p in parts], np.uint8), _ds(pp, "contained", np.ones(len(parts)), bool)
        _csr(pp, "genealogy", [p["genealogy"] for p in parts], np.int32)
        _csr(pp, "ext_genealogy", [sorted(p["genealogy"]) for p in parts], np.int32)
        _ds(pp, "interaction_idx", [p["interaction"] for p in parts], np.int32)
        pt = lab.create_group("per_track")
        for name, key, dt in (
            ("track_id", "id", np.int32),
            ("parent_id", "parent", np.int32),
            ("pdg", "pdg", np.int32),
            ("initial_energy", "energy", "f4"),
            ("particle_idx", "particle", np.int32),
        ):
            _ds(pt, name, [t[key] for t in tracks], dt)
        _ds(pt, "n_cherenkov", [50 * len(t["segments"]) for t in tracks], np.int32)
        (
            _ds(pt, "ancestor", [t["id"] for t in tracks], np.int32),
            _ds(pt, "interaction", np.zeros(len(tracks)), np.int32),
        )
    for f in files.values():
        f.close()


@pytest.fixture(scope="module")
def wand_root(tmp_path_factory, events):
    """A tree of two configurations whose files have the same names: config_000000 holds generated events around
    an event without hits (tank axis z, metres), config_000001 the pile-up, the chain and a t0 below zero (tank axis
    y, millimetres)."""
    root = tmp_path_factory.mktemp("wand")
    write_wand(root / "config_000000", 0, [spec_of(events[0]), None, spec_of(events[1])], axis=2, unit="m")
    specs = [spec_of(events[2]), pileup_spec(events[3], events[4]), chain_spec(), spec_of(events[2], t0=-180.0)]
    write_wand(root / "config_000001", 0, specs, axis=1, unit="mm")
    return root


def _expected(spec) -> dict:
    """What the converter should make of a spec, longhand: per PMT (ascending) the summed charge, the first time,
    the particle with most light and its class by PDG code."""
    s_idx, s_pe, s_t = (np.asarray(x) for x in spec["sensor"])
    h_p, h_s, h_pe, _ = (np.asarray(x) for x in spec["hits"])
    pmts = sorted(set(s_idx.tolist()))
    by_id = {t["id"]: t for t in spec["tracks"]}
    own = [by_id[p["genealogy"][-1]] for p in spec["particles"]]  # a particle's own track: its genealogy's last
    species = {11: "electron", 13: "muon", 211: "pion", 22: "gamma"}
    out = {"energy": [], "time": [], "particle": [], "semantic": []}
    for pmt in pmts:
        out["energy"].append(s_pe[s_idx == pmt].sum())
        out["time"].append(s_t[s_idx == pmt].min())
        light = {}
        for p, s, q in zip(h_p, h_s, h_pe, strict=True):
            if s == pmt and p >= 0:
                light[int(p)] = light.get(int(p), 0.0) + float(q)
        owner = max(light, key=light.get) if light else -1
        out["particle"].append(owner)
        name = species.get(abs(own[owner]["pdg"])) if owner >= 0 else None
        out["semantic"].append(WCH.semantic.classes.index(name) if name else WCH.stuff_class)
    out["starts"] = [own[k]["segments"][0] for k in range(len(spec["particles"]))]
    out["interaction"] = [spec["particles"][p]["interaction"] if p >= 0 else -1 for p in out["particle"]]
    return out


@pytest.fixture(scope="module")
def converted(wand_root, tmp_path_factory):
    out = resolve(str(tmp_path_factory.mktemp("wand-out") / "out"))
    convert(str(wand_root), out, shard_events=2, show_progress=False)
    m = load_manifest(out)  # as a reader sees it
    return m, pa.concat_tables([read_shard(out, r) for r in m.shards]).to_pylist()


def test_events_keep_their_identity_across_configurations(converted):
    """Two configurations with the same file names: distinct sources (paths under the tree root), and the manifest
    maps every event id back to (configuration, file, source_event_idx)."""
    m, rows = converted
    assert m.detector == "wch" and m.events == 6 and m.created_by["skipped"]["events_without_hits"] == 1
    first, second = "config_000000/sensor/wc_sensor_0000.h5", "config_000001/sensor/wc_sensor_0000.h5"
    expected = [f"{first}#event_000", f"{first}#event_002"] + [f"{second}#event_{k:03d}" for k in range(4)]
    assert [r["source"] for r in rows] == expected and len(set(expected)) == 6
    files = m.created_by["files"]
    assert [(f["config"], f["file"], f["first_event_id"], f["events"]) for f in files] == [
        ("config_000000", first, 0, 2),
        ("config_000001", second, 2, 4),
    ]
    assert files[0]["source_event_idx"] == [0, 2] and files[1]["source_event_idx"] == [0, 1, 2, 3]
    assert all(f["modalities"] == ["edep", "hits", "labl", "sensor"] for f in files)
    assert not any(Path(f["file"]).is_absolute() for f in files)
    units = m.units  # the manifest states the unit of each physical column
    assert units["coord"] == "cm" and units["time"] == "ns" and units["energy"] == "PE"
    assert units["particles.vertex"] == "cm" and units["particles.momentum"] == "MeV/c"


def test_converted_events_match_the_generated_ones(converted, events):
    _, rows = converted
    pos = pmt_layout(CFG)[0]
    for ev, row in zip([events[0], events[1], events[2]], [rows[0], rows[1], rows[2]], strict=True):
        # the PMT's position back in the tank frame (whatever the file's axis and units), summed charge, first time
        np.testing.assert_allclose(np.array(row["coord"]), to_cube(pos[ev["pmt"]]), atol=0.05)
        np.testing.assert_allclose(row["energy"], ev["charge"], rtol=1e-5)
        np.testing.assert_allclose(row["time"], ev["time"], atol=1e-4)
        # the owner is the particle with most of the PMT's light; its class from its track's PDG code
        assert row["particle"] == ev["particle"].tolist()
        assert [sorted(c) for c in row["contributors"]] == [sorted(c.tolist()) for c in ev["contributors"]]
        assert row["pid"] == np.where(ev["particle"] >= 0, ev["category"], -1).tolist()
        assert row["semantic"] == np.where(ev["particle"] >= 0, ev["category"], WCH.stuff_class).tolist()
        # rings: particles (not pi0) with >= 20 PE of the written light
        p_idx, _, pe = _hits_of(ev)
        light = np.bincount(p_idx[p_idx >= 0], pe[p_idx >= 0], minlength=len(ev["particles"]["pid"]))
        species = [CATEGORIES[c] for c in ev["particles"]["pid"]]
        assert row["rings"] == sum(1 for s, q in zip(species, light, strict=True) if s != "pi0" and q >= 20)
        parts = row["particles"]
        assert [p["pid"] for p in parts] == ev["particles"]["pid"].tolist()
        np.testing.assert_allclose([p["momentum"] for p in parts], ev["particles"]["momentum"], rtol=1e-3, atol=0.05)
        # each particle starts where its own track's first segment starts, along it (float16 directions)
        np.testing.assert_allclose([p["vertex"] for p in parts], to_cube(ev["particles"]["vertex"]), atol=0.05)
        np.testing.assert_allclose([p["direction"] for p in parts], ev["particles"]["direction"], atol=2e-3)
        assert [p["primary"] for p in parts] == ev["particles"]["primary"].tolist()


@pytest.mark.parametrize("at, spec", [(3, "pileup"), (4, "chain"), (5, "t0")])
def test_pileup_chain_and_negative_t0_match_their_longhand_answer(converted, events, at, spec):
    _, rows = converted
    spec = {
        "pileup": lambda: pileup_spec(events[3], events[4]),
        "chain": chain_spec,
        "t0": lambda: spec_of(events[2], t0=-180.0),
    }[spec]()
    want, row = _expected(spec), rows[at]
    np.testing.assert_allclose(row["energy"], want["energy"], rtol=1e-5)
    np.testing.assert_allclose(row["time"], want["time"], atol=1e-3)
    assert row["particle"] == want["particle"] and row["semantic"] == want["semantic"]
    assert row["interaction"] == want["interaction"]
    starts = [to_cube(s) for s, _ in want["starts"]]
    np.testing.assert_allclose([p["vertex"] for p in row["particles"]], np.reshape(starts, (-1, 3)), atol=0.05)


def test_secondaries_start_where_they_began_not_at_the_vertex(converted):
    """The positron of pi -> mu -> e starts at the muon's end, 1.04 m from the interaction vertex."""
    _, rows = converted
    pion, positron = rows[4]["particles"]
    np.testing.assert_allclose(pion["vertex"], to_cube(CHAIN_VERTEX), atol=1e-3)
    np.testing.assert_allclose(positron["vertex"], to_cube(MUON_END), atol=1e-3)
    np.testing.assert_allclose(positron["direction"], [0, 0, -1], atol=1e-3)
    assert np.linalg.norm(MUON_END - CHAIN_VERTEX) > 1.0
    assert (pion["pid"], positron["pid"], positron["primary"]) == (3, 1, 0)


def test_time_below_zero_kept(converted, events):
    _, rows = converted
    assert min(rows[5]["time"]) < 0
    np.testing.assert_allclose(rows[5]["time"], np.asarray(rows[2]["time"]) - 180.0, atol=1e-3)


def test_without_edep_starts_are_unknown(wand_root, tmp_path):
    """No edep/ file: starts and directions NaN (unknown), counted; never the interaction vertex."""
    tree = tmp_path / "tree"
    shutil.copytree(wand_root / "config_000000", tree / "config_000000")
    shutil.rmtree(tree / "config_000000" / "edep")
    m = convert(str(tree), resolve(str(tmp_path / "out")), show_progress=False)
    rows = pa.concat_tables([read_shard(resolve(str(tmp_path / "out")), r) for r in m.shards]).to_pylist()
    parts = [p for r in rows for p in r["particles"]]
    assert parts and all(np.isnan(p["vertex"]).all() and np.isnan(p["direction"]).all() for p in parts)
    assert m.created_by["skipped"]["particles_without_start"] == len(parts)


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


def _broken_tree(tmp_path, events, name):
    """A two-configuration tree whose second configuration's file is damaged as `name` says; shards of one event
    each, so that without staging the first configuration's shards would already be at --out."""
    root = tmp_path / name
    write_wand(root / "config_000000", 0, [spec_of(events[0]), spec_of(events[1])])
    write_wand(root / "config_000001", 0, [spec_of(events[2])], version=4 if name == "version" else 5)
    bad = root / "config_000001"
    if name == "truncated":
        f = bad / "labl" / "wc_labl_0000.h5"
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 2])
    if name == "missing":
        with h5py.File(bad / "sensor" / "wc_sensor_0000.h5", "a") as f:
            del f["event_000"]["T"]
    return root


FAILURES = {
    "truncated": r"config_000001/labl/wc_labl_0000\.h5: cannot (open|read)",
    "version": r"config_000001/sensor/wc_sensor_0000\.h5: format_version 4; this reader knows format_version 5",
    "missing": r"config_000001/sensor/wc_sensor_0000\.h5#event_000: missing dataset 'T'",
}


@pytest.mark.parametrize("name", sorted(FAILURES))
def test_failures_name_the_file_and_leave_out_untouched(tmp_path, events, name):
    root = _broken_tree(tmp_path, events, name)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("a dataset that was here")
    with pytest.raises(WandFormatError, match=FAILURES[name]):
        convert(str(root), resolve(str(out)), shard_events=1, show_progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    # the command line says it in one line, naming the file, and exits 2
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "raysvc.cli",
            "data",
            "convert-wand",
            str(root),
            "--out",
            str(out),
            "--shard-events",
            "1",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    (line,) = [x for x in r.stderr.splitlines() if x.startswith("raysvc: error:")]
    assert re.search(FAILURES[name], line)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_failed_conversion_leaves_s3_untouched(s3_env, tmp_path, events):
    root = _broken_tree(tmp_path, events, "missing")
    out = s3_location(s3_env, "s3://wand-staging/out")
    out.fs.create_dir("wand-staging")
    with pytest.raises(WandFormatError, match="missing dataset 'T'"):
        convert(str(root), out, shard_events=1, show_progress=False)
    assert list_files(out) == []


def test_bad_files_are_named(tmp_path, events):
    root = tmp_path / "w"
    root.mkdir()
    write_wand(root, 3, [spec_of(events[0])])
    (root / "labl" / "wc_labl_0003.h5").unlink()
    with pytest.raises(FileNotFoundError, match=r"file number 0003.*no labl file"):
        convert(str(root / "**" / "*.h5"), resolve(str(tmp_path / "o1")), show_progress=False)

    write_wand(root, 3, [spec_of(events[0])])
    with h5py.File(root / "hits" / "wc_hits_0003.h5", "a") as f:
        f["event_000"].attrs["source_event_idx"] = 999
    with pytest.raises(WandFormatError, match=r"wc_sensor_0003\.h5#event_000: source_event_idx differs"):
        convert(str(root / "**" / "*.h5"), resolve(str(tmp_path / "o2")), show_progress=False)

    write_wand(root, 3, [spec_of(events[0])])
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
    assert "converted 6 events" in r.stdout and "events_without_hits 1" in r.stdout
    assert load_manifest(resolve(str(out))).detector == "wch"
    r = run("data", "inspect", str(out))
    assert r.returncode == 0 and "rings" in r.stdout, r.stderr
