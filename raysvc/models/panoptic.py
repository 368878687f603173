"""A panoptic network: a segmenter (any backbone of models/archs.py with its lin or dec head, which keeps predicting
the semantic classes) plus one instance head (models/mask_decoder.py) per instance task, e.g. particles with their
PID and interactions. The instance heads read the features the semantic head reads, taken back to the input points.
"""

from __future__ import annotations

import torch
from torch import nn

from raysvc.models.mask_decoder import MaskDecoder, MaskDecoderConfig


class PanopticModel(nn.Module):
    """`forward(x, point_offset)` with `x` from `inference.featurize.model_inputs` -> (semantic logits per input point
    (n, C), {task: MaskDecoder output per event}). `tasks`: task name -> its number of instance classes."""

    def __init__(
        self, seg: nn.Module, tasks: dict[str, int], decoder: MaskDecoderConfig | dict[str, MaskDecoderConfig]
    ):
        super().__init__()
        self.seg = seg
        cfgs = decoder if isinstance(decoder, dict) else dict.fromkeys(tasks, decoder)
        self.heads = nn.ModuleDict({t: MaskDecoder(seg.head_channels, k, cfgs[t]) for t, k in tasks.items()})

    @property
    def backbone(self) -> nn.Module:  # what loading and freezing a pretrained encoder address
        return self.seg.backbone

    def freeze_backbone(self) -> None:
        self.seg.freeze_backbone()

    def forward(self, x: dict, point_offset: torch.Tensor) -> tuple[torch.Tensor, dict]:
        cells = self.seg.head_input(x["feat"], x["coord"], x["grid_coord"], x["offset"])
        points = cells[x["inverse"]]  # instances are per input point: a grid cell's points share its features
        return self.seg.head(points), {t: head(points, point_offset) for t, head in self.heads.items()}
