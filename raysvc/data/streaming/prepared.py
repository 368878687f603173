"""What a read needs before it starts, shared by the Ray Data pipeline and a rank's resumable feed: the checked
manifest and selected events (`prepare`), the shards each rank reads (`rank_shards`) and the read of one shard
(`read_task`)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace

import numpy as np

from raysvc.data.contract.detectors import LARTPC, Detector
from raysvc.data.streaming.config import DataConfig
from raysvc.data.streaming.reader import read_preprocessed
from raysvc.data.streaming.shards import Manifest, load_manifest, preflight
from raysvc.data.streaming.subset import all_event_ids, select_subset
from raysvc.data.streaming.transforms import PreprocessConfig
from raysvc.storage import Location


@dataclass
class Prepared:
    """What both paths need before reading: the root, its checked manifest (bad shards removed under on_bad=skip),
    the selected event ids, and the counts of events in shards skipped by the preflight."""

    root: Location
    manifest: Manifest
    keep_ids: np.ndarray | None
    skipped: Counter

    @property
    def detector(self) -> Detector:
        """The dataset's detector (its manifest's): the read tasks check each event's `detector` column against it."""
        return self.manifest.detector_spec


def prepare(cfg: DataConfig) -> Prepared:
    """Resolve, load and preflight the manifest, pick the subset. Fails fast, on the driver, naming the problem.

    `cfg.preprocess` is resolved here, in place, against the manifest's detector (`DataConfig.resolve_preprocess`):
    the job config the workers get, summary.json and an export's record then hold the values used."""
    root = cfg.location()
    manifest = load_manifest(root)
    cfg.resolve_preprocess(manifest.detector_spec)
    if not manifest.shards:
        raise ValueError(f"{root.uri}: the manifest lists no shards")
    problems = preflight(root, manifest)
    skipped: Counter = Counter()
    if problems:
        if cfg.preprocess.on_bad == "error":
            raise problems[0][1]
        for rec, err in problems:
            skipped.update({"read": rec.events, f"bad:{err.kind}": rec.events})
        bad = {rec.name for rec, _ in problems}
        manifest = replace(manifest, shards=[r for r in manifest.shards if r.name not in bad])
    keep = None
    if cfg.subset_events is not None or cfg.subset_fraction is not None:
        keep = select_subset(all_event_ids(root, manifest), cfg.subset_seed, cfg.subset_events, cfg.subset_fraction)
    return Prepared(root, manifest, keep, skipped)


def rank_shards(prep: Prepared, rank: int, world: int, epoch: int, seed: int, shuffle: bool) -> list:
    """The shards rank `rank` of `world` reads in `epoch`: shard i belongs to rank i mod world (fixed for the run),
    visited in an order drawn from (seed, epoch, rank) when shuffling. Deterministic, so a resumed run sees the same
    stream; every rank loops over its own shards, so ranks never wait on each other for data."""
    mine = prep.manifest.shards[rank::world]
    if shuffle and mine:
        perm = np.random.default_rng([seed, epoch, rank]).permutation(len(mine))
        mine = [mine[i] for i in perm]
    return mine


def read_task(
    root: Location,
    rec,
    cfg: PreprocessConfig,
    keep_ids,
    verify: bool,
    transform=None,
    transform_kwargs: dict | None = None,
    detector: Detector = LARTPC,
    skip: int = 0,
) -> tuple[object, Counter]:
    """Read + cut one shard; drop its first `skip` rows (a resumed rank's position), then apply `transform`. The counts
    are the whole shard's."""
    table, counts, _ = read_preprocessed(root, rec, cfg, keep_ids, verify, detector)
    table = table.slice(skip) if skip else table
    return (transform(table, **transform_kwargs) if transform is not None else table), counts
