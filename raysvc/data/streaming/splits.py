"""Which events a run trains, validates and tests on, and the guard that keeps its test set apart.

An event's identity outlives the dataset that holds it: a generated event is (detector, generator seed, index: its
event id), so two datasets generated with the same seed share their first events whatever their names; a converted
event is (converter, input file, index within the file), from the per-file records of the manifest; a subset's events
are its source's (`raysvc data subset` keeps event ids and names its source). A dataset without such provenance
(written by hand, by a test) is its own origin: it overlaps only itself.

`event_set` reads that identity (the event_id column only), `check_disjoint` refuses a split whose test set shares
events with its training or validation set (or whose validation shares events with training), naming both sets, the
origin (seed or file) and the ids, and `describe` is the split as a run record stores it (seed ranges / id ranges).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from raysvc.data.streaming.config import DataConfig
from raysvc.data.streaming.shards import Manifest, load_manifest
from raysvc.data.streaming.subset import all_event_ids, select_subset
from raysvc.storage import Location, resolve

# What a split may hold, in the order the guard compares them: each later set must share no event with an earlier.
ROLES = ("train", "validation", "test")


class SplitOverlapError(ValueError):
    """A split's sets share events."""


@dataclass(frozen=True)
class Origin:
    """Where a family of events comes from: `key` identifies it (compared), `label` says it in records and errors
    (no machine paths)."""

    key: tuple
    label: str


@dataclass
class EventSet:
    """The events of one role of a split: the dataset as named (`uri`), and per origin the sorted event indices."""

    uri: str
    origins: dict[Origin, np.ndarray]

    @property
    def events(self) -> int:
        return sum(len(v) for v in self.origins.values())


def _origins(root: Location, manifest: Manifest, ids: np.ndarray, depth: int = 0) -> dict[Origin, np.ndarray]:
    """{origin: indices} of the events `ids` of the dataset at `root`."""
    made = manifest.created_by or {}
    if "subset_of" in made:  # `raysvc data subset`: the source's events, ids kept
        if depth > 8:
            raise ValueError(f"{root.uri}: subset_of chain deeper than 8 datasets")
        src = resolve(made["subset_of"])
        try:
            src_manifest = load_manifest(src)
        except Exception as e:
            raise ValueError(
                f"{root.uri}: its manifest says it is a subset of {made['subset_of']}, which cannot be read ({e}); "
                "the split guard needs the source's provenance (seed or files)"
            ) from e
        return _origins(src, src_manifest, ids, depth + 1)
    if made.get("tool") == "raysvc data generate":
        det, seed = made.get("detector", manifest.detector), made["seed"]
        return {Origin(("generated", det, int(seed)), f"generated {det} seed {seed}"): np.sort(ids)}
    if made.get("tool", "").startswith("raysvc data convert") and made.get("files"):
        out = {}
        for f in made["files"]:
            first, n = int(f["first_event_id"]), int(f["events"])
            mine = ids[(ids >= first) & (ids < first + n)] - first
            if len(mine):
                out[
                    Origin(("converted", made["tool"], made.get("root"), f["file"]), f"{made['tool']}: {f['file']}")
                ] = np.sort(mine)
        return out
    name = root.uri.rstrip("/").rsplit("/", 1)[-1]
    return {Origin(("dataset", root.uri), f"dataset {name} (no provenance: only itself)"): np.sort(ids)}


def event_set(data: DataConfig, uri: str | None = None, ids: list[int] | None = None) -> EventSet:
    """The events a data section selects (its label subset applied), or only `ids` of it, by origin. `uri`: how to
    name the dataset (default: the config's uri as given)."""
    root = data.location()
    manifest = load_manifest(root)
    if ids is not None:
        return EventSet(uri or data.uri, _origins(root, manifest, np.asarray(ids, np.int64)))
    every = all_event_ids(root, manifest)
    if data.subset_events is not None or data.subset_fraction is not None:
        every = select_subset(every, data.subset_seed, data.subset_events, data.subset_fraction)
    return EventSet(uri or data.uri, _origins(root, manifest, every))


def _ranges(idx: np.ndarray) -> list[list[int]]:
    """Sorted indices as inclusive [first, last] runs."""
    if not len(idx):
        return []
    breaks = np.flatnonzero(np.diff(idx) != 1)
    starts = np.concatenate([[0], breaks + 1])
    ends = np.concatenate([breaks, [len(idx) - 1]])
    return [[int(idx[a]), int(idx[b])] for a, b in zip(starts, ends, strict=True)]


def _say(ranges: list[list[int]], most: int = 4) -> str:
    text = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in ranges[:most])
    return text + (f", ... ({len(ranges) - most} more runs)" if len(ranges) > most else "")


def check_disjoint(split: dict[str, EventSet]) -> None:
    """Raise SplitOverlapError if the test set shares an event with the training or validation set, or validation
    with training; the message names the two sets, the origin and the shared ids."""
    unknown = [r for r in split if r not in ROLES]
    if unknown:
        raise ValueError(f"split roles must be among {ROLES}, got {unknown}")
    roles = [r for r in ROLES if r in split]
    problems = []
    for i, later in enumerate(roles):
        for earlier in roles[:i]:
            a, b = split[earlier], split[later]
            for origin, idx in b.origins.items():
                shared = np.intersect1d(idx, a.origins.get(origin, np.zeros(0, idx.dtype)))
                if len(shared):
                    problems.append(
                        f"the {later} set {b.uri} shares {len(shared)} events with the {earlier} set {a.uri}: "
                        f"{origin.label}, ids {_say(_ranges(shared))}"
                    )
    if problems:
        raise SplitOverlapError(
            "split overlap: "
            + "; ".join(problems)
            + " (generate the sets with different seeds, or convert different files)"
        )


def describe(split: dict[str, EventSet]) -> dict:
    """The split as a run record stores it: per role the dataset, its event count and per origin the id ranges."""
    return {
        role: {
            "data": s.uri,
            "events": s.events,
            "origins": [{"origin": o.label, "events": len(v), "ids": _ranges(v)} for o, v in s.origins.items()],
        }
        for role, s in split.items()
    }
