"""Reproducible, nested label subsets: the 100-event subset is inside the 1000-event one, for a given seed.

Each event gets a pseudo-random key hash(seed, event_id) (splitmix64, platform independent); a subset of n events is
the n smallest keys. Nesting follows because a larger n only adds keys.
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq

from raysvc.data.shards import Manifest
from raysvc.storage import Location, explained

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
