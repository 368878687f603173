"""Event display (`raysvc data show`): a 3D scatter coloured by semantic class, and a projection by energy."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from raysvc.data.schema import flat_coords, flat_values  # noqa: E402
from raysvc.data.shards import Manifest, load_manifest  # noqa: E402
from raysvc.storage import Location, explained  # noqa: E402


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
                "shard": rec.name,
            }
    raise ValueError(f"{root.uri}: no event with event_id {event_id} ({manifest.events} events in the manifest)")


def show_event(root: Location, event_id: int, out: str) -> str:
    manifest = load_manifest(root)
    detector = manifest.detector_spec
    ev = load_event(root, event_id, manifest)
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
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
