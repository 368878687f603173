"""Write generated events as a sharded dataset (`raysvc data generate`)."""

from __future__ import annotations

import functools
import math

import pyarrow as pa
from tqdm import tqdm

from raysvc.data.generator import DETECTOR, GeneratorConfig, generate_event
from raysvc.data.schema import table_from_events
from raysvc.data.shards import Manifest, write_dataset
from raysvc.storage import Location


def _shard_table(i: int, *, cfg: GeneratorConfig, seed: int, events: int, shard_events: int) -> pa.Table:
    lo, hi = i * shard_events, min((i + 1) * shard_events, events)
    events = [generate_event(cfg, seed, k) for k in range(lo, hi)]
    return table_from_events(events, source=f"synthetic:seed={seed}", detector=DETECTOR.name)


def generate_dataset(
    root: Location,
    events: int,
    seed: int,
    shard_events: int = 500,
    cfg: GeneratorConfig | None = None,
    workers: int = 1,
    show_progress: bool = True,
) -> Manifest:
    """Generate `events` events (ids 0..events-1) into shards of `shard_events`; identical for any sharding."""
    if events <= 0 or shard_events <= 0:
        raise ValueError(f"events ({events}) and shard_events ({shard_events}) must be positive")
    cfg = cfg or GeneratorConfig()
    n_shards = math.ceil(events / shard_events)
    make = functools.partial(_shard_table, cfg=cfg, seed=seed, events=events, shard_events=shard_events)
    bar = (lambda it: tqdm(it, total=n_shards, desc="shards", unit="shard")) if show_progress else None
    created_by = {
        "tool": "raysvc data generate",
        "seed": seed,
        "events": events,
        "shard_events": shard_events,
        "generator": cfg.model_dump(mode="json"),
    }
    return write_dataset(root, n_shards, make, created_by, workers=workers, progress=bar, detector=DETECTOR.name)
