"""Training-time augmentation of a packed batch for segmentation fine-tuning: each event is rotated about its own
centroid (about z, x, y, each with probability `rotate_p`, angle U(-pi, pi)) and mirrored in x and y (each with
probability `flip_p`), as Panda's views are during pretraining. Labels and energies stay with their points. A water
Cherenkov tank allows only turns about its axis through the detector's centre (`rotate_axes: [z]`,
`pivot: detector`), which keep every hit PMT on the tank.

Draws come from torch's default generator, which the worker seeds and its checkpoints save, so a resumed run
augments exactly as an uninterrupted one.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from raysvc.ops.packed import offset_to_batch, segment_mean


class AugmentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rotate_p: float = Field(0.0, ge=0, le=1, description="probability of each rotation (z, x, y), angle U(-pi, pi)")
    flip_p: float = Field(0.0, ge=0, le=1, description="probability of mirroring x, and y, independently")
    rotate_axes: tuple[Literal["x", "y", "z"], ...] = Field(("z", "x", "y"), description="axes of the rotations")
    pivot: Literal["event", "detector"] = Field(
        "event", description="turn about each event's centroid, or about the detector's centre (preprocess.center)"
    )

    @property
    def active(self) -> bool:
        return self.rotate_p > 0 or self.flip_p > 0


def _rotation(axis: int, angle: torch.Tensor) -> torch.Tensor:
    """(B, 3, 3) rotations by `angle` (B,) about `axis`."""
    c, s = torch.cos(angle), torch.sin(angle)
    i, j = [(1, 2), (2, 0), (0, 1)][axis]  # the plane rotated about `axis`
    r = torch.eye(3, dtype=angle.dtype).repeat(len(angle), 1, 1)
    r[:, i, i], r[:, i, j], r[:, j, i], r[:, j, j] = c, -s, s, c
    return r


def event_transforms(n_events: int, cfg: AugmentConfig) -> torch.Tensor:
    """(B, 3, 3) orthogonal matrices, one per event: the rotations that fired, then the mirrors."""
    m = torch.eye(3, dtype=torch.float64).repeat(n_events, 1, 1)
    for axis in ("xyz".index(a) for a in cfg.rotate_axes):
        fire = torch.rand(n_events) < cfg.rotate_p
        angle = (torch.rand(n_events, dtype=torch.float64) * 2 - 1) * math.pi
        m = torch.where(fire[:, None, None], _rotation(axis, angle) @ m, m)
    for axis in (0, 1):
        fire = torch.rand(n_events) < cfg.flip_p
        m[fire, axis] *= -1  # mirror that coordinate after the rotations
    return m


def augment_coords(
    coord: torch.Tensor, offset: torch.Tensor, cfg: AugmentConfig, center: float | None = None
) -> torch.Tensor:
    """Coordinates (N, 3) of a packed batch with each event rotated / mirrored about its own centroid (or, with
    `pivot: detector`, about the detector's centre `center` on every axis)."""
    return augment_with_transforms(coord, offset, cfg, center)[0]


def augment_with_transforms(
    coord: torch.Tensor, offset: torch.Tensor, cfg: AugmentConfig, center: float | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(augmented coordinates, the (B, 3, 3) matrix applied to each event or None when off): vectors attached to an
    event (a particle's direction) turn with the same matrix."""
    if not cfg.active or len(offset) == 0:
        return coord, None
    batch = offset_to_batch(offset)
    x = coord.double()
    if cfg.pivot == "detector":
        if center is None:
            raise ValueError("train.augment.pivot detector needs the detector's centre (preprocess.center)")
        centre = torch.full_like(x, float(center))
    else:
        centre = segment_mean(x, batch, len(offset))[batch]
    m = event_transforms(len(offset), cfg).to(coord.device)
    return (torch.einsum("nij,nj->ni", m[batch], x - centre) + centre).to(coord.dtype), m
