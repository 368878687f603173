"""Write generated events as a sharded dataset (`raysvc data generate`)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import pyarrow as pa
from pydantic import BaseModel

from raysvc.console import progress
from raysvc.data.contract.detectors import DEFAULT_DETECTOR, detector_names, get_detector, load_ref
from raysvc.data.contract.schema import table_from_events
from raysvc.data.streaming.shards import Manifest, write_dataset
from raysvc.storage import Location


def generating_detectors() -> list[str]:
    """The registered detectors that have an event generator."""
    return [name for name in detector_names() if get_detector(name).generator is not None]


def generator_for(detector: str) -> tuple[type[BaseModel], Callable]:
    """(settings class, draw function) of `detector`'s generator, as its Detector record names them: the function
    draws event `index` of a seed as an event-table row."""
    gen = get_detector(detector).generator
    if gen is None:
        raise ValueError(f"no event generator for detector {detector!r}; detectors with one: {generating_detectors()}")
    return load_ref(gen.config), load_ref(gen.draw)


def _shard_table(i: int, *, cfg: BaseModel, seed: int, events: int, shard_events: int, detector: str) -> pa.Table:
    lo, hi = i * shard_events, min((i + 1) * shard_events, events)
    draw = generator_for(detector)[1]
    events = [draw(cfg, seed, k) for k in range(lo, hi)]
    return table_from_events(events, source=f"synthetic:seed={seed}", detector=detector)


def generate_dataset(
    root: Location,
    events: int,
    seed: int,
    shard_events: int = 500,
    cfg: BaseModel | None = None,
    workers: int = 1,
    show_progress: bool = True,
    detector: str = DEFAULT_DETECTOR,
) -> Manifest:
    """Generate `events` events (ids 0..events-1) of `detector` into shards of `shard_events`; identical for any
    sharding. `cfg` is that detector's generator settings (default: its defaults)."""
    if events <= 0 or shard_events <= 0:
        raise ValueError(f"events ({events}) and shard_events ({shard_events}) must be positive")
    config_type = generator_for(detector)[0]
    cfg = cfg or config_type()
    if not isinstance(cfg, config_type):
        raise TypeError(f"detector {detector!r} takes a {config_type.__name__}, got {type(cfg).__name__}")
    n_shards = math.ceil(events / shard_events)
    make = functools.partial(
        _shard_table, cfg=cfg, seed=seed, events=events, shard_events=shard_events, detector=detector
    )
    bar = (lambda it: progress(it, f"generating {events} events", n_shards, "shards")) if show_progress else None
    created_by = {
        "tool": "raysvc data generate",
        "seed": seed,
        "events": events,
        "shard_events": shard_events,
        "detector": detector,
        "generator": cfg.model_dump(mode="json"),
    }
    return write_dataset(root, n_shards, make, created_by, workers=workers, progress=bar, detector=detector)
