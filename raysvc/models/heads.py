"""Segmentation heads on the PTv3 encoder: "lin" (one linear layer on the up-cast multi-stage features) and "dec"
(PTv3's U-Net decoder + linear). Fine-tuning modes (docs/methods.md, "Fine-tuning") decide what trains: lin and
dec freeze the encoder; fft and scratch train everything.
"""

from __future__ import annotations

import torch
from torch import nn

from raysvc.models.ptv3 import Decoder, PTv3, PTv3Config, upcast

HEADS = ("lin", "dec")


class SegModel(nn.Module):
    """PTv3 encoder + segmentation head; `forward` returns (N_level0, num_classes) logits."""

    def __init__(self, cfg: PTv3Config, num_classes: int, head: str = "dec"):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        self.head_kind = head
        self.backbone = PTv3(cfg)
        if head == "dec":
            self.decoder = Decoder(cfg)
            self.head_channels = self.decoder.out_channels
            self.head = nn.Linear(self.head_channels, num_classes)
        else:
            self.decoder = None
            self.head_channels = sum(cfg.channels)
            self.head = nn.Sequential(nn.LayerNorm(self.head_channels), nn.Linear(self.head_channels, num_classes))

    def forward(
        self,
        feat: torch.Tensor,
        coord: torch.Tensor,
        grid_coord: torch.Tensor,
        offset: torch.Tensor,
    ) -> torch.Tensor:
        return self.head(self.head_input(feat, coord, grid_coord, offset))

    def head_input(
        self, feat: torch.Tensor, coord: torch.Tensor, grid_coord: torch.Tensor, offset: torch.Tensor
    ) -> torch.Tensor:
        """(N_level0, head_channels): what the final linear layer sees (the decoder's output, or the up-cast stages);
        other heads (instances) read the same features."""
        levels = self.backbone(feat, coord, grid_coord, offset)
        if self.decoder is not None:
            return self.decoder(levels, self.backbone.orders())
        return upcast(levels)

    def point_features(
        self, feat: torch.Tensor, coord: torch.Tensor, grid_coord: torch.Tensor, offset: torch.Tensor
    ) -> torch.Tensor:
        """(N_level0, sum(channels)) encoder features per input point, every stage up-cast: what "lin" and the
        linear probe see."""
        return upcast(self.backbone(feat, coord, grid_coord, offset))

    def freeze_backbone(self) -> None:
        """lin / dec protocols: the encoder stays as loaded (eval mode for drop path, no gradients)."""
        for p in self.backbone.parameters():
            p.requires_grad_(False)
