"""C-NMS: centrality-based non-maximum suppression (PoLAr-MAE's tokenisation), batched over events.

For each event (docs/methods.md, "C-NMS"): every point is a candidate; its centrality is the number of candidates
within 2 * radius * overlap (itself included), capped at `centrality_cap` (default: max_points); candidates are
visited by descending centrality, ties by ascending point index; a kept candidate suppresses every candidate within
2 * radius * overlap; survivors are the centres. Each centre then gathers the points within `radius` (distance <=
radius); a ball with more than max_points points is down-sampled by FPS starting at the centre, otherwise its points
are listed nearest first (ties by index). Runs on CPU in one numba kernel per event (a cell grid for the radius
searches, capped counts, a greedy scan, FPS in the large balls); inputs on another device are processed on CPU and
the results returned on that device.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from raysvc.ops import cpu_kernels
from raysvc.ops.packed import event_slices


@dataclass
class CNMSResult:
    centers: torch.Tensor  # (G,) int64 indices into coord
    center_offset: torch.Tensor  # (B,) cumulative centre counts per event
    groups: torch.Tensor  # (G, max_points) int64 point indices, -1 padded


def cnms_event(
    points: np.ndarray, radius: float, overlap: float, max_points: int = 32, centrality_cap: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(centres (local indices), groups (G, max_points) local indices, -1 padded) for one event of float64 (n, 3)
    points."""
    points = np.ascontiguousarray(points, dtype=np.float64)
    cap = max_points if centrality_cap is None else centrality_cap
    return cpu_kernels.cnms(points, float(radius), float(overlap), max_points, cap)


def cnms(
    coord: torch.Tensor,
    offset: torch.Tensor,
    radius: float,
    overlap: float,
    max_points: int = 32,
    centrality_cap: int | None = None,
) -> CNMSResult:
    """C-NMS over a packed batch; indices are global (into coord)."""
    if radius <= 0 or not 0 < overlap:
        raise ValueError(f"radius and overlap must be positive, got {radius}, {overlap}")
    pts = coord.detach().cpu().double().numpy()
    centers, groups, sizes = [], [], []
    for sl in event_slices(offset.cpu()):
        c, g = cnms_event(pts[sl], radius, overlap, max_points, centrality_cap)
        centers.append(c + sl.start)
        groups.append(np.where(g >= 0, g + sl.start, -1))
        sizes.append(len(c))
    dev = coord.device
    return CNMSResult(
        torch.from_numpy(np.concatenate(centers) if centers else np.zeros(0, np.int64)).to(dev),
        torch.cumsum(torch.tensor(sizes, dtype=torch.long), 0).to(dev),
        torch.from_numpy(np.concatenate(groups) if groups else np.zeros((0, max_points), np.int64)).to(dev),
    )


def coverage(num_points: int, groups: torch.Tensor) -> dict[str, float]:
    """Missed ratio (points in no group) and duplicated ratio (points in more than one group) over all points."""
    g = groups[groups >= 0].cpu()
    counts = torch.bincount(g, minlength=num_points)
    n = max(num_points, 1)
    return {"missed_ratio": float((counts == 0).sum()) / n, "duplicated_ratio": float((counts > 1).sum()) / n}
