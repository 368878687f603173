"""WAND / LUCiD water Cherenkov HDF5 trees -> event shards of the `wch` detector.

A WAND tree holds one folder per generator configuration (`config_NNNNNN/`), each with one folder per modality whose
files align by number and event group: `sensor/wc_sensor_NNNN.h5` (the recorded PMT hits: `sensor_idx`, `PE`, `T`;
PMT positions in `config/sensor_positions`), `hits/wc_hits_NNNN.h5` (the same light split by source particle:
`particle_idx`, `sensor_idx`, `PE`, `T`), `edep/wc_edep_NNNN.h5` (the Geant4 segments of every track that made light:
`track_idx`, `start_*`, `dir_*`, ...) and `labl/wc_labl_NNNN.h5` (truth tables per event: `per_event`,
`per_interaction`, `per_particle`, `per_track`). Every file's `config` group states `format_version` (this reader
knows 5) and `source_event_idx`, the index of each event in the simulation's own input; each event group `event_NNN`
repeats it as an attribute, which must agree across the modalities. Lengths are metres, times ns, energies MeV.

An event's identity is (configuration, file, `source_event_idx`): its `source` is the sensor file's path under the
tree root plus the event group, and the manifest lists, per file, its configuration folder and the
`source_event_idx` of each converted event in event-id order.

One point per hit PMT: its position, its summed charge and its earliest time (a PMT can record several hits). A PMT's
particle is the one that gave it most of the charge in `hits/`; its class comes from that particle's PDG code (the
particle's own track in `per_track`: the last of its genealogy). PMTs with no particle's light are the stuff class
(dark noise, `particle_idx` -1 in newer writers), and so are PMTs whose particle is none of the detector's classes
(counted in the report). A particle starts where its own track's first `edep/` segment starts, along that segment's
direction; without an `edep/` file, or for a track without segments, both are NaN (unknown), never the interaction
vertex. Events without a single hit are skipped and counted.
"""

from __future__ import annotations

import contextlib
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
OPTIONAL = ("edep",)  # particle starts and directions; without it they are unknown (NaN)
FORMAT_VERSIONS = (5,)  # `config/format_version` values this reader knows
FILE_NAME = re.compile(r"wc_([a-z]+)_(\d+)\.h5$")
SPECIES = {22: "gamma", 11: "electron", 13: "muon", 211: "pion", 111: "pi0"}  # by |PDG code|
MASS_MEV = {pdg: MASS[name] for pdg, name in SPECIES.items()} | {2212: 938.272, 2112: 939.565}  # + p, n
PRIMARY_CATEGORY = 0  # per_particle/category: 0 Primary, 1 DecayElectron, 2 SecondaryPion, 3 Gamma
RING_MIN_PE = WChGeneratorConfig.model_fields["ring_min_pe"].default  # a ring, as the generator counts them
UNITS = {"m": 1.0, "cm": 0.01, "mm": 0.001}  # -> metres


class WandFormatError(ValueError):
    """A file that does not follow the layout: the message names the file, the event and the field."""


def tree_root(source: str) -> tuple[str, str]:
    """(glob pattern, tree root) of what the user named: a tree's folder (every `.h5` file below it) or a glob
    pattern (its root: the folder before the first wildcard). Sources are named by their path under the root."""
    if os.path.isdir(source):
        return os.path.join(source, "**", "*.h5"), os.path.abspath(source)
    parts = source.split(os.sep)
    fixed = []
    for part in parts[:-1]:
        if _glob.has_magic(part):
            break
        fixed.append(part)
    return source, os.path.abspath(os.sep.join(fixed) or ".")


def group_files(paths: list[str], top: str | None = None) -> list[dict[str, str]]:
    """The modality files of each (configuration folder, file number), in order, with `config` (the folder under the
    tree root `top`) and `num`; a number that lacks a needed modality is an error naming what is missing."""
    groups: dict[tuple[str, str], dict[str, str]] = {}
    for p in paths:
        m = FILE_NAME.search(os.path.basename(p))
        if not m:
            continue
        folder = os.path.dirname(os.path.dirname(os.path.abspath(p)))
        groups.setdefault((folder, m.group(2)), {})[m.group(1)] = p
    for (folder, num), mods in sorted(groups.items()):
        missing = [m for m in NEEDED if m not in mods]
        if missing:
            have = ", ".join(sorted(mods))
            raise FileNotFoundError(
                f"WAND file number {num} under {folder}: no {'/'.join(missing)} file (found {have}); expected "
                f"{', '.join(f'{m}/wc_{m}_{num}.h5' for m in NEEDED)}"
            )
        mods["config"] = os.path.relpath(folder, top) if top else os.path.basename(folder)
        mods["num"] = num
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


def _column(g, name: str, where: str) -> np.ndarray:
    if name not in g:
        raise WandFormatError(f"{where}: missing dataset {name!r}")
    return g[name][()]


def _open(path: str, name: str) -> h5py.File:
    """An HDF5 file of the tree whose `config/format_version` this reader knows; every failure names the file."""
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise WandFormatError(f"{name}: cannot open as HDF5 ({e}); expected a complete LUCiD file") from None
    try:
        version = f["config"].attrs.get("format_version") if "config" in f else None
    except OSError as e:
        f.close()
        raise WandFormatError(f"{name}: cannot read group config ({e}); truncated or damaged file") from None
    if version is None or int(version) not in FORMAT_VERSIONS:
        f.close()
        found = "no config/format_version" if version is None else f"format_version {int(version)}"
        raise WandFormatError(
            f"{name}: {found}; this reader knows format_version {', '.join(map(str, FORMAT_VERSIONS))}"
        )
    return f


def _load(group: h5py.Group, where: str, skip: tuple[str, ...] = ()) -> dict:
    """Every dataset of an event group (sub-groups as dicts) read into memory: the one place an event touches HDF5,
    so a damaged file fails here with its file and group named."""
    try:
        return {
            k: _load(v, f"{where}/{k}") if isinstance(v, h5py.Group) else v[()]
            for k, v in group.items()
            if k not in skip
        }
    except OSError as e:
        raise WandFormatError(f"{where}: cannot read ({e}); truncated or damaged file") from None


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


def _particles(labl: dict, where: str) -> dict:
    """Per particle: |PDG|, kinetic energy (MeV), interaction, whether primary, and its own track (row of
    `per_track`, -1 if none)."""
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
        "own_track": own_track,
    }
    return out


def _starts(edep: dict | None, own_track: np.ndarray, frame: dict, where: str, skipped: Counter):
    """Each particle's start (cube coordinates) and unit direction: the first `edep/` segment of its own track
    (segments come in blocks per track, in step order). NaN where there is no edep file or no segment."""
    n = len(own_track)
    start = np.full((n, 3), np.nan, np.float32)
    direction = np.full((n, 3), np.nan, np.float32)
    if edep is None:
        skipped["particles_without_start"] += n
        return start, direction
    track = _column(edep, "track_idx", where).astype(np.int64)
    tracks, first = np.unique(track, return_index=True)
    row = np.searchsorted(tracks, own_track)
    found = (own_track >= 0) & (row < len(tracks)) & (tracks[np.minimum(row, len(tracks) - 1)] == own_track)
    seg = first[np.minimum(row, len(tracks) - 1)][found]
    xyz = np.stack([_column(edep, f"start_{c}", where) for c in "xyz"], -1).astype(np.float64)
    d = np.stack([_column(edep, f"dir_{c}", where) for c in "xyz"], -1).astype(np.float64)
    order = frame["order"]
    start[found] = to_cube(xyz[seg][:, order] * frame["to_m"])
    d = d[seg][:, order]
    direction[found] = d / np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-12)
    skipped["particles_without_start"] += int((~found).sum())
    return start, direction


def read_event(ev: dict[str, dict], frame: dict, where: dict[str, str], skipped: Counter):
    """One event of the modalities (`ev[modality]` read by `_load`; `where[modality]` names its file and group) -> an
    event record (the `wch` detector's columns), or None without hits."""
    sensor, hits, labl, edep = ev["sensor"], ev["hits"], ev["labl"], ev.get("edep")
    pos_m = frame["positions_m"]
    pmts, charge, first = _per_pmt(sensor, len(pos_m), where["sensor"])
    if not len(pmts):
        skipped["events_without_hits"] += 1
        return None
    parts = _particles(labl, where["labl"])
    n_part = len(parts["pdg"])
    p_idx = _column(hits, "particle_idx", where["hits"]).astype(np.int64)
    s_idx = _column(hits, "sensor_idx", where["hits"]).astype(np.int64)
    h_pe = _column(hits, "PE", where["hits"]).astype(np.float64)
    if p_idx.size and p_idx.max() >= n_part:
        raise WandFormatError(f"{where['hits']}: particle_idx {p_idx.max()} but labl has {n_part} particles")
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
    vertex, direction = _starts(edep, parts["own_track"], frame, where.get("edep", ""), skipped)
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
            "direction": direction,
            "vertex": vertex,
            "primary": parts["primary"],
        },
    }


def iter_group(files: dict[str, str], skipped: Counter, top: str):
    """(source, source_event_idx, record) of every event with hits in one file number's modality files; paths in
    messages and sources are relative to the tree root `top`."""
    rel = {m: os.path.relpath(os.path.abspath(files[m]), top) for m in NEEDED + OPTIONAL if m in files}
    with contextlib.ExitStack() as stack:
        f = {m: stack.enter_context(_open(files[m], rel[m])) for m in rel}
        where = rel["sensor"]
        try:
            raw = f["sensor"]["config"]["sensor_positions"][()]
        except KeyError:
            raise WandFormatError(f"{where}: missing dataset config/sensor_positions") from None
        except OSError as e:
            raise WandFormatError(f"{where}: cannot read config/sensor_positions ({e}); truncated file") from None
        pos_m, info = tank_frame(raw, where)
        frame = {"positions_m": pos_m, "order": info["order"], "to_m": UNITS[info["units"]]}
        names = _events(f["sensor"])
        for m in rel:
            if m != "sensor" and _events(f[m]) != names:
                raise WandFormatError(f"{rel[m]}: its event groups differ from those of {where}")
        for name in names:
            srcs = {m: int(f[m][name].attrs.get("source_event_idx", -1)) for m in rel}
            if len(set(srcs.values())) > 1:
                raise WandFormatError(
                    f"{where}#{name}: source_event_idx differs between modalities {srcs}; the files are not aligned"
                )
            at = {m: f"{rel[m]}#{name}" for m in rel}
            record = read_event({m: _load(f[m][name], at[m], skip=("sensor_hits",)) for m in rel}, frame, at, skipped)
            if record is not None:
                yield f"{where}#{name}", srcs["sensor"], record


def convert(source: str, root: Location, shard_events: int = 500, show_progress: bool = True) -> Manifest:
    """Every WAND file number under `source` (a tree's folder, or a glob pattern of its files) -> shards under
    `root`, published only when every file has converted (a failure leaves `root` as it was)."""
    pattern, top = tree_root(source)
    groups = group_files(sorted(_glob.glob(pattern, recursive=True)), top)
    if not groups:
        raise FileNotFoundError(f"no WAND files (wc_<modality>_NNNN.h5) match {pattern!r}")
    per_file: list[dict] = []
    skipped: Counter = Counter()
    next_id = 0
    with EventShardWriter(root, shard_events, WCH) as writer:
        for files in tqdm(groups, desc="files", unit="file", disable=not show_progress):
            first, source_idx = next_id, []
            for src, src_idx, ev in iter_group(files, skipped, top):
                ev["event_id"], ev["source"] = next_id, src
                source_idx.append(src_idx)
                next_id += 1
                writer.add(ev)
            per_file.append(
                {
                    "config": files["config"],
                    "file": os.path.relpath(os.path.abspath(files["sensor"]), top),
                    "modalities": sorted(m for m in NEEDED + OPTIONAL if m in files),
                    "first_event_id": first,
                    "events": next_id - first,
                    "source_event_idx": source_idx,
                }
            )
        skips = {k: int(v) for k, v in sorted(skipped.items())}
        made = {"tool": "raysvc data convert-wand", "source": source, "root": top, "files": per_file, "skipped": skips}
        return writer.close(made)
