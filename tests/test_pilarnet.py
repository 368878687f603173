"""PILArNet-M HDF5 reader/converter on files written by the test in exactly the published layout."""

from __future__ import annotations

import h5py
import numpy as np
import pyarrow as pa
import pytest

from raysvc.data.contract.schema import EventDataError
from raysvc.data.sources.pilarnet import convert, iter_file
from raysvc.data.streaming.shards import iter_tables, load_manifest
from raysvc.storage import resolve


def _fake_events(rng, n_events):
    """Events as lists of clusters: (size, fragment, group, interaction, semantic, pid) + per-point 8-col rows."""
    out = []
    for _ in range(n_events):
        clusters, points = [], []
        for c in range(int(rng.integers(2, 6))):
            size = int(rng.integers(0 if c == 0 else 1, 30))
            sem = 4 if c == 0 else int(rng.integers(0, 4))  # first cluster: low-energy scatters
            clusters.append(
                (
                    size,
                    c,
                    -1 if c == 0 else c + c % 2,  # groups {1, 2}, {3, 4}, ...: the leading cluster is not first
                    -1 if c == 0 else int(rng.integers(0, 3)),
                    sem,
                    -1 if c == 0 else int(rng.integers(0, 5)),
                )
            )
            pts = np.zeros((size, 8), np.float32)
            pts[:, :3] = rng.integers(0, 768, size=(size, 3))
            pts[:, 3] = rng.uniform(0.01, 10, size)  # voxel value = energy used downstream
            pts[:, 4:] = rng.normal(size=(size, 4))  # deposit, time, electrons, dx: not used
            points.append(pts)
        out.append((clusters, np.concatenate(points)))
    return out


def _extras(events, revision, seed=0):
    """Per event, one cluster_extra row per cluster: [mass MeV, |p| GeV, vx, vy, vz(, is_primary)], some -1."""
    rng = np.random.default_rng(seed)
    out = []
    for clusters, _ in events:
        e = np.column_stack(
            [
                rng.choice([0.511, 105.66, 938.27], len(clusters)),
                rng.uniform(0.01, 2.0, len(clusters)),
                rng.uniform(0, 768, (len(clusters), 3)),
            ]
        )
        e[rng.random(len(clusters)) < 0.3, 1] = -1.0  # momentum not set
        if revision == "v3":
            e = np.column_stack([e, rng.integers(0, 2, len(clusters))])
        out.append(e.astype(np.float32))
    return out


def write_h5(path, events, revision, extras=None):
    """Write variable-length datasets, one entry per event, as PILArNet-M stores them."""
    ncol = 5 if revision == "v1" else 6
    with h5py.File(path, "w") as f:
        fl = h5py.vlen_dtype(np.float32)
        point = f.create_dataset("point", (len(events),), dtype=fl)
        cluster = f.create_dataset("cluster", (len(events),), dtype=h5py.vlen_dtype(np.int64))
        extra = None
        if revision != "v1":
            extra = f.create_dataset("cluster_extra", (len(events),), dtype=fl)
        for i, (clusters, pts) in enumerate(events):
            point[i] = pts.reshape(-1)
            arr = np.array([c[:ncol] if ncol == 6 else c[:5] for c in clusters], np.int64)
            cluster[i] = arr.reshape(-1)
            if extra is not None:
                extra[i] = (
                    extras[i].reshape(-1)
                    if extras is not None
                    else np.zeros(len(clusters) * (5 if revision == "v2" else 6), np.float32)
                )


@pytest.mark.parametrize("revision", ["v1", "v2", "v3"])
def test_convert_matches_written_labels(tmp_path, revision):
    rng = np.random.default_rng({"v1": 1, "v2": 2, "v3": 3}[revision])
    files = {"b.h5": _fake_events(rng, 4), "a.h5": _fake_events(rng, 3)}
    (tmp_path / "train").mkdir()
    for name, evs in files.items():
        write_h5(tmp_path / "train" / name, evs, revision)
    out = resolve(str(tmp_path / "out"))
    m = convert(str(tmp_path / "train" / "*.h5"), out, shard_events=3, show_progress=False)
    assert m.events == 7 and len(m.shards) == 3
    table = pa.concat_tables([t for _, t in iter_tables(out, m)])
    ordered = [("a.h5", i, ev) for i, ev in enumerate(files["a.h5"])] + [
        ("b.h5", i, ev) for i, ev in enumerate(files["b.h5"])
    ]  # sorted file order
    for row, (fname, i, (clusters, pts)) in enumerate(ordered):
        r = table.slice(row, 1)
        assert r.column("event_id")[0].as_py() == row
        assert r.column("source")[0].as_py() == f"{fname}#{i}"
        np.testing.assert_array_equal(np.asarray(r.column("coord")[0].as_py()), pts[:, :3])
        np.testing.assert_array_equal(np.asarray(r.column("energy")[0].as_py(), np.float32), pts[:, 3])
        want = {k: [] for k in ("fragment", "particle", "interaction", "semantic", "pid")}
        for size, frag, group, inter, sem, pid in clusters:  # per-point labels by repeating, written out longhand
            for _ in range(size):
                want["fragment"].append(frag)
                want["particle"].append(group)
                want["interaction"].append(inter)
                want["semantic"].append(sem)
                want["pid"].append(pid if revision != "v1" else -1)
        for k, v in want.items():
            assert r.column(k)[0].as_py() == v, (k, row)
    made = load_manifest(out).created_by
    assert [f["file"] for f in made["files"]] == ["a.h5", "b.h5"]  # relative to the folder holding them
    assert made["revision"] == revision and made["revision_requested"] == "auto"  # detected, not "auto"
    assert {f["revision"] for f in made["files"]} == {revision}
    assert load_manifest(out).units["coord"] == "voxel (3 mm)"  # units travel with the data
    assert load_manifest(out).detector == "lartpc" and set(table.column("detector").to_pylist()) == {"lartpc"}


def test_six_column_clusters_without_cluster_extra_are_v2(tmp_path):
    """The cluster rows' width alone tells v1 from v2: a v2 file without `cluster_extra` keeps its PID labels."""
    events = _fake_events(np.random.default_rng(8), 3)
    write_h5(tmp_path / "a.h5", events, "v2")
    with h5py.File(tmp_path / "a.h5", "a") as f:
        del f["cluster_extra"]
    out = resolve(str(tmp_path / "out"))
    m = convert(str(tmp_path / "a.h5"), out, show_progress=False)
    assert m.created_by["revision"] == "v2"
    table = pa.concat_tables([t for _, t in iter_tables(out, m)])
    for (clusters, _), got in zip(events, table.column("pid").to_pylist(), strict=True):
        assert got == [c[5] for c in clusters for _ in range(c[0])]
    assert table.column("particles").null_count == table.num_rows  # no truth without cluster_extra


def test_events_from_two_folders_keep_distinct_sources(tmp_path):
    """Files of the same name in two folders (train/, val/) stay apart: sources are paths under the common folder."""
    rng = np.random.default_rng(9)
    for split in ("train", "val"):
        (tmp_path / split).mkdir()
        write_h5(tmp_path / split / "a.h5", _fake_events(rng, 2), "v1")
    out = resolve(str(tmp_path / "out"))
    m = convert(str(tmp_path / "*" / "a.h5"), out, show_progress=False)
    table = pa.concat_tables([t for _, t in iter_tables(out, m)])
    assert table.column("source").to_pylist() == ["train/a.h5#0", "train/a.h5#1", "val/a.h5#0", "val/a.h5#1"]


@pytest.mark.parametrize("revision", ["v2", "v3"])
def test_cluster_extra_becomes_the_particles_truth_of_each_group(tmp_path, revision):
    events = _fake_events(np.random.default_rng(5), 4)
    extras = _extras(events, revision)
    write_h5(tmp_path / "a.h5", events, revision, extras)
    out = resolve(str(tmp_path / "out"))
    m = convert(str(tmp_path / "a.h5"), out, shard_events=4, show_progress=False)
    table = pa.concat_tables([t for _, t in iter_tables(out, m)])
    for (clusters, _), extra, got in zip(events, extras, table.column("particles").to_pylist(), strict=True):
        want = {}
        for c, (size, cid, group, inter, _, pid) in enumerate(clusters):  # longhand: a group's own cluster wins
            if group < 0 or size == 0 or (group in want and want[group][0] == group):
                continue
            if group not in want or cid == group:
                want[group] = (cid, inter, pid, extra[c])
        assert [p["id"] for p in got] == sorted(want)
        for p in got:
            _, inter, pid, row = want[p["id"]]
            assert (p["interaction"], p["pid"]) == (inter, pid)
            assert p["mass"] == pytest.approx(row[0])
            if row[1] < 0:
                assert np.isnan(p["momentum"])  # the -1 sentinel is unknown, not a momentum
            else:
                assert p["momentum"] == pytest.approx(row[1] * 1000, rel=1e-6)  # GeV -> MeV
            assert p["vertex"] == pytest.approx(row[2:5].tolist()) and all(np.isnan(p["direction"]))
            assert p["primary"] == (int(row[5]) if revision == "v3" else -1)


def test_unknown_layouts_named(tmp_path):
    p = tmp_path / "x.h5"
    with h5py.File(p, "w") as f:
        f.create_dataset("points", data=np.zeros(3))
    with pytest.raises(EventDataError, match=r"^file .*x.h5.*unknown layout.*missing dataset.*'point'"):
        list(iter_file(str(p)))
    rng = np.random.default_rng(0)
    write_h5(p, _fake_events(rng, 2), "v2")
    with h5py.File(p, "a") as f:
        del f["cluster_extra"]
        e = f.create_dataset("cluster_extra", (2,), dtype=h5py.vlen_dtype(np.float32))
        for i in range(2):
            e[i] = np.zeros(len(f["cluster"][i]) // 6 * 7, np.float32)
    with pytest.raises(EventDataError, match="cluster_extra has 7 columns"):
        list(iter_file(str(p)))
    # v3 read right for event 0, but event 1 has one cluster_extra row too few
    write_h5(p, _fake_events(rng, 2), "v3")
    with h5py.File(p, "a") as f:
        f["cluster_extra"][1] = np.zeros((len(f["cluster"][1]) // 6 - 1) * 6, np.float32)
    with pytest.raises(EventDataError, match=r"x.h5, row 1, field 'cluster_extra'.*expected 6 per cluster \(v3\)"):
        list(iter_file(str(p)))


def test_inconsistent_cluster_sizes_named(tmp_path):
    rng = np.random.default_rng(4)
    evs = _fake_events(rng, 3)
    clusters, pts = evs[1]
    evs[1] = (clusters, pts[:-2])  # two points lost
    write_h5(tmp_path / "y.h5", evs, "v2")
    with pytest.raises(EventDataError, match=r"y.h5, row 1, field 'cluster'.*sum to"):
        list(iter_file(str(tmp_path / "y.h5")))


def test_truncated_file_named(tmp_path):
    rng = np.random.default_rng(5)
    p = tmp_path / "z.h5"
    write_h5(p, _fake_events(rng, 20), "v2")
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(EventDataError, match=r"^file .*z.h5.*(truncated|damaged)"):
        list(iter_file(str(p)))
    out = tmp_path / "out"
    with pytest.raises(EventDataError, match=r"z.h5"):  # the good file converts, then z.h5 fails: nothing published
        write_h5(tmp_path / "a.h5", _fake_events(rng, 4), "v2")
        convert(str(tmp_path / "*.h5"), resolve(str(out)), shard_events=1, show_progress=False)
    assert not out.exists() or not any(out.iterdir())


def test_no_files_matched(tmp_path):
    with pytest.raises(FileNotFoundError, match="no HDF5 files match"):
        convert(str(tmp_path / "*.h5"), resolve(str(tmp_path / "o")), show_progress=False)
