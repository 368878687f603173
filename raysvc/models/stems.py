"""Per-detector input stems in front of one shared PTv3 trunk (cross-experiment pretraining).

Detectors differ in what a point carries (a LArTPC voxel: xyz + energy; a water Cherenkov PMT: xyz + charge + time)
and in how coordinates and amplitudes are scaled, so each detector gets its own stem (sparse conv + LayerNorm, the
PTv3 embedding) mapping its channels to the trunk's first width; everything after the stem is shared. A forward pass
is one detector's events: `active` names the stem to use (set by the caller before each pass, on the student and
the teacher alike). `split_stem` turns the cross model's weights into a plain single-detector backbone, which
fine-tuning and serving load like any other.
"""

from __future__ import annotations

import torch
from torch import nn

from raysvc.models.ptv3 import Embedding, Level

PREFIX = "embedding.stems."


class DetectorStems(nn.Module):
    def __init__(self, channels: dict[str, int], cout: int, mode: str):
        super().__init__()
        if not channels:
            raise ValueError("DetectorStems needs at least one detector")
        self.channels = dict(channels)
        self.stems = nn.ModuleDict({name: Embedding(cin, cout, mode) for name, cin in channels.items()})
        self.active = next(iter(channels))

    def forward(self, level: Level) -> Level:
        want = self.channels[self.active]
        if level.feat.shape[1] != want:
            raise ValueError(
                f"the {self.active!r} stem takes {want} input channels (xyz + features), got {level.feat.shape[1]}"
            )
        return self.stems[self.active](level)


def use_stem(name: str, *models: nn.Module) -> None:
    """Route the next forward passes of `models` (each holding a DetectorStems) through detector `name`'s stem."""
    for model in models:
        stems = [m for m in model.modules() if isinstance(m, DetectorStems)]
        if not stems:
            raise ValueError(f"{type(model).__name__} has no per-detector stems")
        for s in stems:
            if name not in s.channels:
                raise ValueError(f"no stem for detector {name!r}; the model has {sorted(s.channels)}")
            s.active = name


def split_stem(backbone: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """Weights of a backbone with DetectorStems -> those of a plain PTv3 with detector `name`'s stem as its
    embedding (the other detectors' stems dropped)."""
    own = f"{PREFIX}{name}."
    if not any(k.startswith(own) for k in backbone):
        raise ValueError(f"no stem for detector {name!r} in these weights")
    out = {}
    for k, v in backbone.items():
        if k.startswith(own):
            out["embedding." + k.removeprefix(own)] = v
        elif not k.startswith(PREFIX):
            out[k] = v
    return out
