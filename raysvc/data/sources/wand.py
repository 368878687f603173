"""WAND / LUCiD water Cherenkov HDF5 files -> event shards of the `wch` detector.

The published layout keeps each modality in its own folder and file, aligned by file number and event group:
`sensor/wc_sensor_NNNN.h5` (the recorded PMT hits: `sensor_idx`, `PE`, `T`; PMT positions in
`config/sensor_positions`), `hits/wc_hits_NNNN.h5` (the same light split by source particle: `particle_idx`,
`sensor_idx`, `PE`, `T`; `particle_idx` -1 for dark noise) and `labl/wc_labl_NNNN.h5` (truth tables per event:
`per_event`, `per_interaction`, `per_particle`, `per_track`). Each file holds groups `event_NNN` whose attribute
`source_event_idx` must agree across the modalities. Other modalities (`edep/`, `step/`) are not needed and ignored.

One point per hit PMT: its position, its summed charge and its earliest time (a PMT can record several hits). A PMT's
particle is the one that gave it most of the charge in `hits/`; its class comes from that particle's PDG code (the
particle's own track in `per_track`). PMTs with no particle's light are the stuff class (dark noise), and so are PMTs
whose particle is none of the detector's classes (counted in the report). Events without a single hit are skipped and
counted.
"""

from __future__ import annotations

import glob as _glob
import os
import re
from collections import Counter

import h5py
import numpy as np
from tqdm import tqdm

from raysvc.data.contract.detectors.wch import HALF_HEIGHT_CM, RADIUS_CM, WCH
from raysvc.data.sources.wch_generator import MASS, WChGeneratorConfig, to_cube
from raysvc.data.streaming.shards import EventShardWriter, Manifest
from raysvc.storage import Location

NEEDED = ("sensor", "hits", "labl")
FILE_NAME = re.compile(r"wc_([a-z]+)_(\d+)\.h5$")
SPECIES = {22: "gamma", 11: "electron", 13: "muon", 211: "pion", 111: "pi0"}  # by |PDG code|
MASS_MEV = {pdg: MASS[name] for pdg, name in SPECIES.items()} | {2212: 938.272, 2112: 939.565}  # + p, n
PRIMARY_CATEGORY = 0  # per_particle/category: 0 Primary, 1 DecayElectron, 2 SecondaryPion, 3 Gamma
RING_MIN_PE = WChGeneratorConfig.model_fields["ring_min_pe"].default  # a ring, as the generator counts them
UNITS = {"m": 1.0, "cm": 0.01, "mm": 0.001}  # -> metres


class WandFormatError(ValueError):
    """A file that does not follow the layout: the message names the file, the event and the field."""


def group_files(paths: list[str]) -> list[dict[str, str]]:
    """The modality files of each (dataset root, file number), in order; a number that lacks a needed modality is an
    error naming what is missing."""
    groups: dict[tuple[str, str], dict[str, str]] = {}
    for p in paths:
        m = FILE_NAME.search(os.path.basename(p))
        if not m:
            continue
        root = os.path.dirname(os.path.dirname(os.path.abspath(p)))
        groups.setdefault((root, m.group(2)), {})[m.group(1)] = p
    for (root, num), mods in sorted(groups.items()):
        missing = [m for m in NEEDED if m not in mods]
        if missing:
            have = ", ".join(sorted(mods))
            raise FileNotFoundError(
                f"WAND file number {num} under {root}: no {'/'.join(missing)} file (found {have}); expected "
                f"{', '.join(f'{m}/wc_{m}_{num}.h5' for m in NEEDED)}"
            )
    return [groups[k] for k in sorted(groups)]


def tank_frame(positions: np.ndarray, where: str) -> tuple[np.ndarray, dict]:
    """PMT positions as written -> (metres with the tank's axis along z, {axis, units, radius_m, half_height_m, order:
    the file's axes in our x, y, z order}); the units and the axis are found from the positions themselves (caps at
    |axis| = half-height, wall at radius R), and the tank must be the `wch` one."""
    pos = np.asarray(positions, np.float64)
    if pos.ndim != 2 or pos.shape[1] != 3 or not len(pos):
        raise WandFormatError(f"{where}: config/sensor_positions has shape {pos.shape}, expected (n_sensors, 3)")
    best = None
    for axis in range(3):
        others = [a for a in range(3) if a != axis]
        r = np.linalg.norm(pos[:, others], axis=1)
        h = np.abs(pos[:, axis] - pos[:, axis].mean())
        tol = 0.03 * max(r.max(), h.max())
        on_surface = np.mean((np.abs(r - r.max()) < tol) | (np.abs(h - h.max()) < tol))
        if best is None or on_surface > best[0]:
            best = (on_surface, axis, r.max(), h.max())
    on_surface, axis, radius, half = best
    if on_surface < 0.95:
        raise WandFormatError(f"{where}: config/sensor_positions do not lie on a cylinder's wall and caps")
    for unit, to_m in UNITS.items():
        r_m, h_m = radius * to_m, half * to_m
        if abs(r_m / (RADIUS_CM / 100) - 1) < 0.1 and abs(h_m / (HALF_HEIGHT_CM / 100) - 1) < 0.1:
            order = [a for a in range(3) if a != axis] + [axis]
            info = {"axis": "xyz"[axis], "units": unit, "radius_m": r_m, "half_height_m": h_m, "order": order}
            return pos[:, order] * to_m, info
    raise WandFormatError(
        f"{where}: the PMTs span radius {radius:g} and half-height {half:g} (in the file's units); the wch detector is "
        f"the Super-K-like tank of radius {RADIUS_CM / 100} m and half-height {HALF_HEIGHT_CM / 100} m"
    )


def _events(f: h5py.File) -> list[str]:
    return sorted((k for k in f if k.startswith("event_")), key=lambda k: int(k.split("_")[1]))


def _column(g: h5py.Group, name: str, where: str) -> np.ndarray:
    if name not in g:
        raise WandFormatError(f"{where}: missing dataset {name!r}")
    return g[name][()]


def _per_pmt(sensor: h5py.Group, n_sensors: int, where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(PMT index, summed PE, earliest T) of every hit PMT, PMTs in increasing index."""
    idx = _column(sensor, "sensor_idx", where).astype(np.int64)
    pe = _column(sensor, "PE", where).astype(np.float64)
    t = _column(sensor, "T", where).astype(np.float64)
    if not (len(idx) == len(pe) == len(t)):
        raise WandFormatError(f"{where}: sensor_idx, PE and T have {len(idx)}, {len(pe)}, {len(t)} rows")
    if len(idx) and (idx.min() < 0 or idx.max() >= n_sensors):
        raise WandFormatError(f"{where}: sensor_idx outside [0, {n_sensors}) (max {idx.max()})")
    pmts, inv = np.unique(idx, return_inverse=True)
    charge = np.zeros(len(pmts))
    np.add.at(charge, inv, pe)
    first = np.full(len(pmts), np.inf)
    np.minimum.at(first, inv, t)
    return pmts, charge, first


def _particles(labl: h5py.Group, where: str) -> dict:
    """Per particle: |PDG|, kinetic energy (MeV), interaction, whether primary; per interaction: the vertex (m)."""
    pp, pt = labl.get("per_particle"), labl.get("per_track")
    if pp is None or pt is None:
        raise WandFormatError(f"{where}: missing group per_particle or per_track")
    category = _column(pp, "category", f"{where}/per_particle").astype(np.int64)
    n = len(category)
    inter = pp["interaction_idx"][()].astype(np.int64) if "interaction_idx" in pp else np.zeros(n, np.int64)
    track_id = _column(pt, "track_id", f"{where}/per_track").astype(np.int64)
    pdg = _column(pt, "pdg", f"{where}/per_track").astype(np.int64)
    owner = _column(pt, "particle_idx", f"{where}/per_track").astype(np.int64)
    energy = _column(pt, "initial_energy", f"{where}/per_track").astype(np.float64)
    own_track = np.full(n, -1)
    if "genealogy_data" in pp and "genealogy_offsets" in pp:  # a particle's chain ends with its own track
        data, off = pp["genealogy_data"][()], pp["genealogy_offsets"][()].astype(np.int64)
        for p in range(n):
            if off[p + 1] > off[p]:
                hit = np.flatnonzero(track_id == data[off[p + 1] - 1])
                own_track[p] = hit[0] if hit.size else -1
    for p in np.flatnonzero(own_track < 0):  # else the particle's first track
        mine = np.flatnonzero(owner == p)
        own_track[p] = mine[np.argmin(track_id[mine])] if mine.size else -1
    has = own_track >= 0
    out = {
        "pdg": np.where(has, np.abs(pdg[own_track]), 0),
        "kinetic": np.where(has, energy[own_track], np.nan),
        "interaction": inter,
        "primary": (category == PRIMARY_CATEGORY).astype(np.int8),
    }
    pi = labl.get("per_interaction")
    if pi is not None and all(f"vertex_{c}" in pi for c in "xyz"):
        out["vertices"] = np.stack([pi[f"vertex_{c}"][()] for c in "xyz"], -1).astype(np.float64).reshape(-1, 3)
    return out


def read_event(sensor: h5py.Group, hits: h5py.Group, labl: h5py.Group, frame: dict, where: str, skipped: Counter):
    """One event of the three modalities -> an event record (the `wch` detector's columns), or None without hits."""
    pos_m = frame["positions_m"]
    pmts, charge, first = _per_pmt(sensor, len(pos_m), where)
    if not len(pmts):
        skipped["events_without_hits"] += 1
        return None
    parts = _particles(labl, where)
    n_part = len(parts["pdg"])
    p_idx = _column(hits, "particle_idx", where).astype(np.int64)
    s_idx = _column(hits, "sensor_idx", where).astype(np.int64)
    h_pe = _column(hits, "PE", where).astype(np.float64)
    if p_idx.size and p_idx.max() >= n_part:
        raise WandFormatError(f"{where}: hits particle_idx {p_idx.max()} but labl has {n_part} particles")
    light = (p_idx >= 0) & (h_pe > 0)
    col = np.searchsorted(pmts, s_idx[light])
    found = (col < len(pmts)) & (pmts[np.minimum(col, len(pmts) - 1)] == s_idx[light])
    skipped["hit_rows_on_unrecorded_pmts"] += int((~found).sum())
    pe = np.zeros((n_part, len(pmts)))
    np.add.at(pe, (p_idx[light][found], col[found]), h_pe[light][found])
    owner = np.where(pe.sum(0) > 0, pe.argmax(0), -1)
    classes = WCH.labels["pid"].classes
    species = [SPECIES.get(int(c)) for c in parts["pdg"]]
    pid_of = np.array([classes.index(s) if s else -1 for s in species], np.int64)
    semantic_of = np.array([s if s is not None and s != "pi0" else None for s in species], object)
    sem_classes = WCH.semantic.classes
    cls = np.array([sem_classes.index(s) if s else WCH.stuff_class for s in semantic_of], np.int64)
    owned = owner >= 0
    other = owned & (pid_of[np.maximum(owner, 0)] < 0)
    skipped["pmts_of_other_species"] += int(other.sum())
    semantic = np.where(owned, cls[np.maximum(owner, 0)], WCH.stuff_class)
    ring_pe = pe.sum(1)
    mass = np.array([MASS_MEV.get(int(c), np.nan) for c in parts["pdg"]])
    kin = parts["kinetic"]
    vertex = np.full((n_part, 3), np.nan, np.float32)
    if "vertices" in parts and len(parts["vertices"]):
        v = parts["vertices"][np.clip(parts["interaction"], 0, len(parts["vertices"]) - 1)]
        vertex = to_cube(v[:, frame["order"]] * frame["to_m"])  # assumed in the units of the PMT positions
    return {
        "coord": to_cube(pos_m[pmts]),
        "energy": charge.astype(np.float32),
        "time": first.astype(np.float32),
        "semantic": semantic.astype(np.int8),
        "pid": np.where(owned, pid_of[np.maximum(owner, 0)], -1).astype(np.int8),
        "particle": owner.astype(np.int32),
        "interaction": np.where(owned, parts["interaction"][np.maximum(owner, 0)], -1).astype(np.int32),
        "fragment": owner.astype(np.int32),
        "contributors": [np.flatnonzero(pe[:, j] > 0).astype(np.int32) for j in range(len(pmts))],
        "rings": int(sum(1 for p in range(n_part) if semantic_of[p] is not None and ring_pe[p] >= RING_MIN_PE)),
        "particles": {
            "id": np.arange(n_part, dtype=np.int32),
            "interaction": parts["interaction"].astype(np.int32),
            "pid": pid_of.astype(np.int8),
            "mass": mass.astype(np.float32),
            "momentum": np.sqrt(kin * kin + 2 * kin * mass).astype(np.float32),
            "direction": np.full((n_part, 3), np.nan, np.float32),  # in edep/ or step/, which this reader skips
            "vertex": vertex.astype(np.float32),
            "primary": parts["primary"],
        },
    }


def iter_group(files: dict[str, str], skipped: Counter):
    """(source, record) of every event with hits in one file number's three modality files."""
    with (
        h5py.File(files["sensor"], "r") as fs,
        h5py.File(files["hits"], "r") as fh,
        h5py.File(files["labl"], "r") as fl,
    ):
        where = files["sensor"]
        if "config" not in fs or "sensor_positions" not in fs["config"]:
            raise WandFormatError(f"{where}: missing config/sensor_positions")
        raw = fs["config"]["sensor_positions"][()]
        pos_m, info = tank_frame(raw, where)
        frame = {"positions_m": pos_m, "order": info["order"], "to_m": UNITS[info["units"]]}
        names = _events(fs)
        for other, f in (("hits", fh), ("labl", fl)):
            if _events(f) != names:
                raise WandFormatError(f"{files[other]}: its event groups differ from those of {where}")
        for name in names:
            srcs = {
                m: int(f[name].attrs.get("source_event_idx", -1)) for m, f in zip(NEEDED, (fs, fh, fl), strict=True)
            }
            if len(set(srcs.values())) > 1:
                raise WandFormatError(
                    f"{where}#{name}: source_event_idx differs between modalities {srcs}; the files are not aligned"
                )
            ev = read_event(fs[name], fh[name], fl[name], frame, f"{where}#{name}", skipped)
            if ev is not None:
                yield f"{os.path.basename(files['sensor'])}#{name}", ev


def convert(pattern: str, root: Location, shard_events: int = 500, show_progress: bool = True) -> Manifest:
    """Every WAND file number matching `pattern` (its sensor, hits and labl files) -> shards under `root`."""
    paths = sorted(_glob.glob(pattern, recursive=True))
    groups = group_files(paths)
    if not groups:
        raise FileNotFoundError(f"no WAND files (wc_<modality>_NNNN.h5) match {pattern!r}")
    writer = EventShardWriter(root, shard_events, WCH)
    per_file: list[dict] = []
    skipped: Counter = Counter()
    next_id = 0
    for files in tqdm(groups, desc="files", unit="file", disable=not show_progress):
        first = next_id
        for source, ev in iter_group(files, skipped):
            ev["event_id"], ev["source"] = next_id, source
            next_id += 1
            writer.add(ev)
        per_file.append({"file": os.path.basename(files["sensor"]), "first_event_id": first, "events": next_id - first})
    skips = {k: int(v) for k, v in sorted(skipped.items())}
    return writer.close({"tool": "raysvc data convert-wand", "pattern": pattern, "files": per_file, "skipped": skips})
