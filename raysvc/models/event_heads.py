"""Event-level heads on a segmenter, for water Cherenkov tasks: the number of rings (1R, 2R, >=3R) and the particle
type of a single-particle event (electron, muon, pi0). Both read the features the semantic head reads, pooled over
each event's grid cells (mean and max), so that the per-hit ring segmentation and the event heads share one trunk.
"""

from __future__ import annotations

import torch
from torch import nn

from raysvc.ops.packed import offset_to_batch


def pool_events(cells: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """(M, C) cell features, (B,) cumulative cell counts -> (B, 2C): each event's mean and max (zeros if empty)."""
    counts = torch.diff(offset, prepend=offset.new_zeros(1))
    event = offset_to_batch(offset)
    c = cells.shape[1]
    total = cells.new_zeros(len(counts), c).index_add_(0, event, cells)
    mean = total / counts.clamp_min(1).unsqueeze(1).to(cells.dtype)
    index = event.unsqueeze(1).expand(-1, c)
    peak = cells.new_full((len(counts), c), -torch.inf).scatter_reduce(0, index, cells, "amax", include_self=False)
    peak = torch.where(counts.unsqueeze(1) > 0, peak, torch.zeros_like(peak))
    return torch.cat([mean, peak], 1)


class EventHeads(nn.Module):
    """`forward(x)` with `x` from `inference.featurize.model_inputs` -> (semantic logits per input point (n, K),
    ring-count logits (B, ring_classes), PID logits (B, pid_classes))."""

    def __init__(self, seg: nn.Module, ring_classes: int = 3, pid_classes: int = 3, hidden: int = 128):
        super().__init__()
        self.seg = seg
        c = seg.head_channels

        def mlp(out: int) -> nn.Sequential:
            return nn.Sequential(nn.Linear(2 * c, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Linear(hidden, out))

        self.rings = mlp(ring_classes)
        self.pid = mlp(pid_classes)

    @property
    def backbone(self) -> nn.Module:  # what loading and freezing a pretrained encoder address
        return self.seg.backbone

    def freeze_backbone(self) -> None:
        self.seg.freeze_backbone()

    @classmethod
    def from_weights(cls, seg: nn.Module, weights: dict[str, torch.Tensor]) -> EventHeads:
        """Heads on `seg` sized from their saved weights (the `rings.*` / `pid.*` keys an export keeps)."""
        heads = cls(
            seg,
            weights["rings.3.weight"].shape[0],
            weights["pid.3.weight"].shape[0],
            weights["rings.0.weight"].shape[0],
        )
        missing, unexpected = heads.load_state_dict(weights, strict=False)
        if unexpected or any(not k.startswith("seg.") for k in missing):
            raise ValueError(f"event heads: missing {missing[:5]}, unexpected {unexpected[:5]}")
        return heads

    def forward(self, x: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cells = self.seg.head_input(x["feat"], x["coord"], x["grid_coord"], x["offset"])
        pooled = pool_events(cells.float(), x["offset"])
        return self.seg.head(cells)[x["inverse"]], self.rings(pooled), self.pid(pooled)
