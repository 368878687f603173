"""Event display (`raysvc data show`): a 3D scatter coloured by semantic class, and a projection by energy (or the
display the detector's record names: a tank unrolled, display_tank.py); with the predictions of a panoptic model
(`--predictions`, what `raysvc predict` wrote), true vs predicted particles and interactions instead."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from raysvc.data.contract.detectors import load_ref  # noqa: E402
from raysvc.data.contract.schema import flat_coords, flat_values  # noqa: E402
from raysvc.data.streaming.shards import Manifest, load_manifest  # noqa: E402
from raysvc.storage import Location, explained  # noqa: E402


def save_figure(fig, out: str) -> str:
    """Every event display's way to end: tight layout, `out` at 110 dpi, the figure closed (a long-lived process
    draws many); returns `out`."""
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def load_event(root: Location, event_id: int, manifest: Manifest | None = None) -> dict[str, np.ndarray]:
    """One event's arrays by event id; a clear error if no shard holds it."""
    manifest = manifest or load_manifest(root)
    for rec in manifest.shards:
        loc = root.join(rec.name)
        with explained(loc, "reading"):
            t = pq.read_table(loc.path, filesystem=loc.fs, filters=pc.field("event_id") == event_id)
        if t.num_rows:
            row = t.slice(0, 1)
            return {
                "coord": flat_coords(row),
                "energy": flat_values(row, "energy"),
                "semantic": flat_values(row, "semantic"),
                "particle": flat_values(row, "particle"),
                "pid": flat_values(row, "pid"),
                "interaction": flat_values(row, "interaction"),
                "rings": row.column("rings")[0].as_py() if "rings" in row.column_names else None,
                "shard": rec.name,
            }
    raise ValueError(f"{root.uri}: no event with event_id {event_id} ({manifest.events} events in the manifest)")


def show_event(root: Location, event_id: int, out: str) -> str:
    manifest = load_manifest(root)
    detector = manifest.detector_spec
    ev = load_event(root, event_id, manifest)
    if detector.display is not None:  # the detector's own display (a tank: its surface unrolled)
        return load_ref(detector.display)(ev, detector, event_id, out)
    xyz, sem, e = ev["coord"], ev["semantic"], ev["energy"]
    fig = plt.figure(figsize=(13, 6))
    ax = fig.add_subplot(1, 2, 1, projection="3d")
    for c, name in enumerate(detector.class_names):
        m = sem == c
        if m.any():
            # the detector's colour for the class, else matplotlib's cycle
            color = detector.class_colors[c] if c < len(detector.class_colors) else f"C{c % 10}"
            ax.scatter(xyz[m, 0], xyz[m, 1], xyz[m, 2], s=0.6, c=color, label=f"{name} ({m.sum()})", depthshade=False)
    ax.set_box_aspect(np.ptp(xyz, axis=0) + 10)  # true proportions
    ax.set_xlabel("x [voxel]")
    ax.set_ylabel("y [voxel]")
    ax.set_zlabel("z [voxel]")
    ax.legend(markerscale=8, fontsize=8, loc="upper left")
    ax.set_title(f"event {event_id}: {len(sem)} points, by semantic class")
    ax2 = fig.add_subplot(1, 2, 2)
    sc = ax2.scatter(xyz[:, 0], xyz[:, 2], s=0.6, c=np.log10(np.maximum(e, 1e-3)), cmap="viridis")
    fig.colorbar(sc, ax=ax2, label="log10 energy [MeV]")
    ax2.set_xlabel("x [voxel]")
    ax2.set_ylabel("z [voxel]")
    ax2.set_aspect("equal")
    ax2.set_title("x-z projection, by energy")
    return save_figure(fig, out)


def load_predictions(preds: Location, event_id: int) -> dict:
    """One event's row of `raysvc predict`'s output (a panoptic model's: with instance columns)."""
    import json

    from raysvc.storage import read_bytes

    manifest = json.loads(read_bytes(preds.join("manifest.json")))
    for name in manifest["files"]:
        loc = preds.join(name)
        with explained(loc, "reading"):
            t = pq.read_table(loc.path, filesystem=loc.fs, filters=pc.field("event_id") == event_id)
        if t.num_rows:
            row = t.slice(0, 1).to_pylist()[0]
            if "instance" not in row:
                raise ValueError(f"{preds.uri}: predictions of a semantic model, no instance columns to show")
            return row
    raise ValueError(f"{preds.uri}: no predictions for event_id {event_id}")


def _instances(ax, xz: np.ndarray, ids: np.ndarray, labels: dict[int, str], title: str) -> None:
    """Points coloured by instance (grey: none), each instance named at its centre."""
    none = ids < 0
    ax.scatter(xz[none, 0], xz[none, 1], s=0.3, c="0.8")
    for n, i in enumerate(np.unique(ids[~none])):
        m = ids == i
        ax.scatter(xz[m, 0], xz[m, 1], s=0.6, color=plt.cm.tab20(n % 20))
        if i in labels:
            c = xz[m].mean(0)
            ax.annotate(labels[i], c, fontsize=7, ha="center")
    ax.set_aspect("equal")
    ax.set_xlabel("x [voxel]")
    ax.set_ylabel("z [voxel]")
    ax.set_title(title, fontsize=9)


def show_instances(root: Location, preds: Location, event_id: int, out: str) -> str:
    """True vs predicted particles (named by PID) and interactions of one event, x-z projections."""
    manifest = load_manifest(root)
    pids = manifest.detector_spec.labels["pid"].classes
    ev = load_event(root, event_id, manifest)
    row = load_predictions(preds, event_id)
    xz = ev["coord"][:, [0, 2]]
    if len(row["instance"]) != len(xz):
        raise ValueError(f"{preds.uri}: event {event_id} has {len(row['instance'])} predicted points, {len(xz)} true")
    true_p = ev["particle"].astype(np.int64)
    true_names = {
        int(i): pids[ev["pid"][true_p == i][0]]
        for i in np.unique(true_p[true_p >= 0])
        if ev["pid"][true_p == i][0] >= 0
    }
    pred_p = np.asarray(row["instance"])
    pred_names = {x["id"]: f"{pids[x['class']]} {x['confidence']:.2f}" for x in row["instances"]}
    fig, axes = plt.subplots(2, 2, figsize=(12, 11))
    _instances(axes[0, 0], xz, true_p, true_names, f"event {event_id}: true particles ({len(true_names)})")
    _instances(axes[0, 1], xz, pred_p, pred_names, f"predicted particles ({len(pred_names)})")
    true_i = ev["interaction"].astype(np.int64)
    _instances(axes[1, 0], xz, true_i, {}, f"true interactions ({len(set(true_i[true_i >= 0]))})")
    if "interaction" in row:
        pred_i = np.asarray(row["interaction"])
        _instances(axes[1, 1], xz, pred_i, {}, f"predicted interactions ({len(set(pred_i[pred_i >= 0]))})")
    else:
        axes[1, 1].set_axis_off()
    return save_figure(fig, out)
