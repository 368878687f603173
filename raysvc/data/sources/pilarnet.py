"""PILArNet-M HDF5 reader and converter to raysvc shards (`raysvc data convert 'ROOT/train/*.h5' --out URI`).

Layout (one file, many events; every dataset is variable-length, one entry per event):
- `point`: flat float32, reshape (-1, 8): x, y, z, voxel value, energy deposit, time, n electrons, dx. Column 3 is the
  energy both reference loaders use.
- `cluster`: points are stored cluster by cluster; each row gives the cluster size, labels repeat by it.
  v1: 5 columns [size, fragment_id, group_id, interaction_id, semantic];
  v2/v3: 6 columns [size, cluster_id, group_id, interaction_id, semantic, pid].
- `cluster_extra` (v2: 5 columns, v3: 6 columns) is present only from v2 on (optional: without it a 6-column file
  is read as v2 without particle truth).
  One row per cluster: v2 [mass MeV, |p| GeV, vertex x, y, z]; v3 the same and is_primary. The converter carries it
  into the `particles` column: one particle per group (the `particle` id), its truth from the group's leading
  cluster (cluster_id == group_id, else the group's first), |p| in MeV, -1 sentinels as NaN, no direction (not stored).
The revision is read from the data's shape per file (`detect_revision`) and recorded in the manifest. Event ids of
the converted dataset run over the files in sorted order; `source` keeps `file#index`, the file's path relative to the
folder that holds all the converted files.
"""

from __future__ import annotations

import glob as _glob
import os
from collections.abc import Iterator

import h5py
import numpy as np
from tqdm import tqdm

from raysvc.data.contract.detectors import LARTPC
from raysvc.data.contract.schema import EventDataError
from raysvc.data.streaming.shards import EventShardWriter, Manifest
from raysvc.storage import Location

DETECTOR = LARTPC  # PILArNet-M is LArTPC data: the converted events, and their manifest, name it
CLUSTER_COLUMNS = {"v1": 5, "v2": 6, "v3": 6}
EXTRA_COLUMNS = {5: "v2", 6: "v3"}
EXTRA_WIDTH = {rev: width for width, rev in EXTRA_COLUMNS.items()}


def _file_error(path: str, message: str, **kw) -> EventDataError:
    return EventDataError(path, message, what="file", **kw)


def detect_revision(f: h5py.File, path: str) -> str:
    """v1 / v2 / v3 from the data's own shape: the width of the cluster rows that makes their sizes add up to the
    event's points (5: v1; 6: v2 or v3), then the width of `cluster_extra` rows (none or 5: v2; 6: v3). Read from the
    first event with points; a named error for anything else."""
    missing = [k for k in ("point", "cluster") if k not in f]
    if missing:
        raise _file_error(
            path,
            f"unknown layout: missing dataset(s) {missing}; found {sorted(f.keys())}, "
            "expected point, cluster[, cluster_extra]",
            field=missing[0],
            kind="layout",
        )
    has_extra = "cluster_extra" in f
    for i in range(len(f["point"])):
        n_points = len(f["point"][i]) / 8
        if not n_points:
            continue
        cluster = np.asarray(f["cluster"][i], np.int64)
        widths = [w for w in (5, 6) if cluster.size % w == 0 and cluster.reshape(-1, w)[:, 0].sum() == n_points]
        if len(widths) != 1:
            if len(widths) == 2 and has_extra:  # both widths add up (rare): only v2 / v3 carry cluster_extra
                widths = [6]
            else:
                found = "both 5 and 6 columns fit" if widths else "neither 5 nor 6 columns fit"
                raise _file_error(
                    path,
                    f"unknown layout: cluster rows of event {i} do not tell the revision ({found} a first column "
                    f"of sizes adding up to its {n_points:g} points)",
                    row=i,
                    field="cluster",
                    kind="layout",
                )
        if widths[0] == 5:
            return "v1"
        if not has_extra:
            return "v2"  # labels with pid, no particle truth
        width = len(f["cluster_extra"][i]) / (cluster.size / 6)
        if width not in EXTRA_COLUMNS:
            raise _file_error(
                path,
                f"unknown layout: cluster_extra has {width:g} columns per cluster, expected 5 (v2) or 6 (v3)",
                row=i,
                field="cluster_extra",
                kind="layout",
            )
        return EXTRA_COLUMNS[int(width)]
    return "v2" if has_extra else "v1"  # no event has points: nothing to read either way


def read_event(f: h5py.File, i: int, revision: str, path: str) -> dict[str, np.ndarray]:
    """Event `i` of an open file as per-point arrays; errors name the file, the event and the dataset."""
    try:
        point = np.asarray(f["point"][i], dtype=np.float32)
        cluster = np.asarray(f["cluster"][i])
        has_extra = revision in EXTRA_WIDTH and "cluster_extra" in f
        extra = np.asarray(f["cluster_extra"][i], dtype=np.float64) if has_extra else None
    except (OSError, ValueError, KeyError) as e:
        raise _file_error(path, f"cannot read event ({e}); truncated or damaged file", row=i, kind="corrupt") from e
    if point.size % 8:
        raise _file_error(
            path, f"{point.size} values, not a multiple of 8 columns", row=i, field="point", kind="layout"
        )
    ncol = CLUSTER_COLUMNS[revision]
    if cluster.size % ncol:
        raise _file_error(
            path, f"{cluster.size} values, not a multiple of {ncol} ({revision})", row=i, field="cluster", kind="layout"
        )
    point = point.reshape(-1, 8)
    cluster = cluster.reshape(-1, ncol).astype(np.int64)
    sizes = cluster[:, 0]
    if (sizes < 0).any() or sizes.sum() != len(point):
        raise _file_error(
            path,
            f"cluster sizes sum to {sizes.sum()} but point has {len(point)} points "
            f"(unknown layout or truncated event; read as {revision})",
            row=i,
            field="cluster",
            kind="layout",
        )
    rep = lambda c: np.repeat(cluster[:, c], sizes)  # noqa: E731
    pid = rep(5) if ncol == 6 else np.full(len(point), -1)
    event = {
        "coord": point[:, :3],
        "energy": point[:, 3],
        "fragment": rep(1).astype(np.int32),
        "particle": rep(2).astype(np.int32),
        "interaction": rep(3).astype(np.int32),
        "semantic": rep(4).astype(np.int8),
        "pid": pid.astype(np.int8),
    }
    if extra is not None:
        width = EXTRA_WIDTH[revision]
        if extra.size != len(cluster) * width:
            raise _file_error(
                path,
                f"{extra.size} values for {len(cluster)} clusters, expected {width} per cluster ({revision})",
                row=i,
                field="cluster_extra",
                kind="layout",
            )
        event["particles"] = group_truth(cluster, extra.reshape(-1, width))
    return event


def group_truth(cluster: np.ndarray, extra: np.ndarray) -> dict[str, np.ndarray]:
    """The `particles` truth of one event: per group id >= 0 with points, the row of its leading cluster
    (cluster_id == group_id, else its first cluster) of `cluster` [size, cluster_id, group_id, interaction, semantic,
    pid] and `extra` [mass MeV, |p| GeV, vx, vy, vz(, is_primary)]."""
    sizes, groups = cluster[:, 0], cluster[:, 2]
    ids = np.unique(groups[(groups >= 0) & (sizes > 0)])
    lead = []
    for g in ids:
        rows = np.flatnonzero((groups == g) & (sizes > 0))
        own = rows[cluster[rows, 1] == g]
        lead.append(own[0] if own.size else rows[0])
    lead = np.array(lead, np.int64)
    ex = extra[lead] if lead.size else np.zeros((0, extra.shape[1]))
    unknown = lambda v: np.where(v < 0, np.nan, v)  # noqa: E731  (-1: not set)
    vertex = ex[:, 2:5].copy()
    vertex[np.all(vertex == -1, axis=1)] = np.nan
    return {
        "id": ids.astype(np.int32),
        "interaction": cluster[lead, 3].astype(np.int32),
        "pid": cluster[lead, 5].astype(np.int8),
        "mass": unknown(ex[:, 0]).astype(np.float32),
        "momentum": (unknown(ex[:, 1]) * 1000.0).astype(np.float32),
        "direction": np.full((len(ids), 3), np.nan, np.float32),
        "vertex": vertex.astype(np.float32),
        "primary": (ex[:, 5] if ex.shape[1] > 5 else np.full(len(ids), -1)).astype(np.int8),
    }


def iter_file(
    path: str, revision: str = "auto", info: dict | None = None
) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """(index in file, event) for every event of one HDF5 file; the revision read with (detected under "auto") is
    put in `info["revision"]`."""
    if revision != "auto" and revision not in CLUSTER_COLUMNS:
        raise ValueError(f"revision must be auto, v1, v2 or v3; got {revision!r}")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise _file_error(path, f"cannot open as HDF5 ({e}); truncated or not an HDF5 file", kind="corrupt") from e
    with f:
        try:
            rev = detect_revision(f, path) if revision == "auto" else revision
        except OSError as e:
            raise _file_error(path, f"cannot read ({e}); truncated or damaged file", kind="corrupt") from e
        if info is not None:
            info["revision"] = rev
        n = len(f["point"])
        if len(f["cluster"]) != n:
            raise _file_error(
                path, f"point has {n} events but cluster has {len(f['cluster'])}", field="cluster", kind="layout"
            )
        for i in range(n):
            yield i, read_event(f, i, rev, path)


def convert(
    pattern: str, root: Location, shard_events: int = 500, revision: str = "auto", show_progress: bool = True
) -> Manifest:
    """Convert every file matching `pattern` (sorted) into shards under `root`; validated before writing, published
    only when every file has converted (a failure leaves `root` as it was)."""
    files = sorted(_glob.glob(pattern))
    if not files:
        raise FileNotFoundError(f"no HDF5 files match {pattern!r}")
    top = os.path.commonpath([os.path.dirname(os.path.abspath(f)) for f in files])
    per_file: list[dict] = []
    next_id = 0
    with EventShardWriter(root, shard_events, DETECTOR) as writer:
        for path in tqdm(files, desc="files", unit="file", disable=not show_progress):
            first, name, info = next_id, os.path.relpath(os.path.abspath(path), top), {}
            for i, ev in iter_file(path, revision, info):
                ev["event_id"] = next_id
                ev["source"] = f"{name}#{i}"
                next_id += 1
                writer.add(ev)
            per_file.append(
                {"file": name, "revision": info["revision"], "first_event_id": first, "events": next_id - first}
            )
        found = sorted({f["revision"] for f in per_file})
        created_by = {
            "tool": "raysvc data convert",
            "pattern": pattern,
            "root": top,
            "revision": found[0] if len(found) == 1 else "mixed",
            "revision_requested": revision,
            "files": per_file,
        }
        return writer.close(created_by)
