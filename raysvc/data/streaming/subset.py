"""Reproducible, nested label subsets: the 100-event subset is inside the 1000-event one, for a given seed.

Each event gets a pseudo-random key hash(seed, event_id) (splitmix64, platform independent); a subset of n events is
the n smallest keys. Nesting follows because a larger n only adds keys.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raysvc.data.streaming.shards import Manifest, load_manifest, read_shard, shard_name, write_manifest, write_shard
from raysvc.storage import Location, exists, explained

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def event_keys(event_ids: np.ndarray, seed: int) -> np.ndarray:
    """splitmix64(event_id + seed * golden): uint64 keys, uniform and independent of sharding."""
    with np.errstate(over="ignore"):
        z = event_ids.astype(np.uint64) + np.uint64(seed % 2**64) * _GOLDEN + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def all_event_ids(root: Location, manifest: Manifest) -> np.ndarray:
    """Every event id of the dataset (reads only the event_id column)."""
    ids = []
    for rec in manifest.shards:
        loc = root.join(rec.name)
        with explained(loc, "reading event ids of"):
            ids.append(pq.read_table(loc.path, columns=["event_id"], filesystem=loc.fs).column(0).to_numpy())
    return np.concatenate(ids) if ids else np.zeros(0, np.int64)


def select_subset(event_ids: np.ndarray, seed: int, n: int | None = None, fraction: float | None = None) -> np.ndarray:
    """Sorted event ids of the subset of `n` events (or `fraction` of them, rounded, at least 1)."""
    if (n is None) == (fraction is None):
        raise ValueError("give exactly one of n or fraction")
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        n = max(1, round(fraction * len(event_ids)))
    if n <= 0 or n > len(event_ids):
        raise ValueError(f"subset of {n} events asked for, the dataset has {len(event_ids)}")
    if len(np.unique(event_ids)) != len(event_ids):
        raise ValueError("event ids are not unique: a subset would not be well defined")
    order = np.lexsort((event_ids, event_keys(event_ids, seed)))
    return np.sort(event_ids[order[:n]])


def write_subsets(
    root: Location,
    targets: dict[int, Location],
    seed: int,
    min_shards: int = 1,
    verify_checksums: bool = True,
    log=print,
) -> dict[int, Manifest]:
    """Write each n-event subset of the dataset at `root` (the events `select_subset(ids, seed, n)` picks) as a
    dataset of its own at `targets[n]`, in one pass over the shards, split into >= `min_shards` shards (one per
    Train worker), naming the source's detector. A target whose manifest already records the same (source, events,
    seed) and detector is kept as it is."""
    manifest = load_manifest(root)
    out: dict[int, Manifest] = {}
    todo = {}
    ids = None
    for n, loc in sorted(targets.items()):
        stamp = {"subset_of": root.uri, "events": n, "subset_seed": seed}
        if exists(loc.join("manifest.json")):
            written = load_manifest(loc)
            if written.created_by == stamp and written.detector == manifest.detector:
                out[n] = written
                continue
        if ids is None:
            ids = all_event_ids(root, manifest)
        todo[n] = (loc, stamp, pa.array(select_subset(ids, seed, n)))
    if not todo:
        return out
    parts: dict[int, list[pa.Table]] = {n: [] for n in todo}
    for rec in manifest.shards:
        table = read_shard(root, rec, verify_checksum=verify_checksums)
        for n, (_, _, keep) in todo.items():
            parts[n].append(table.filter(pc.is_in(table.column("event_id"), value_set=keep)))
    for n, (loc, stamp, _) in todo.items():
        table = pa.concat_tables(parts[n]).combine_chunks()
        pieces = max(min_shards, math.ceil(n / 250))
        if table.num_rows < pieces:
            raise ValueError(f"{root.uri}: a {n}-event subset cannot feed {pieces} workers one shard each")
        bounds = np.linspace(0, table.num_rows, pieces + 1).astype(int)
        recs = [
            write_shard(loc, shard_name(i), table.slice(a, b - a))
            for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True))
        ]
        out[n] = write_manifest(loc, recs, stamp, detector=manifest.detector)
        log(f"[raysvc] subset of {n} events (seed {seed}) -> {loc.uri} ({pieces} shards)")
    return out
