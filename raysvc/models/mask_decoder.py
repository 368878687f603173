"""A query-based instance head on per-point backbone features, in the style of Mask2Former and the Panda detector.

Learned queries attend to the points of their event through a few decoder layers. Each layer does masked
cross-attention (a query only sees the points its previous mask claims), then self-attention among the queries, then
an MLP. After the learned queries and after every layer the head predicts, per query, a class (the instance classes
plus "no object") and a mask logit per point (query embedding . point embedding). A separate per-point "stuff" logit
says which points belong to no instance (low-energy depositions). Training uses every layer's prediction (auxiliary
losses); inference the last one.

Events have different numbers of points, so the decoder runs event by event over the packed batch (`offset`); the
queries are shared. The point features come from the backbone (positions are already in them).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn


class MaskDecoderConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    width: int = Field(64, gt=0, description="query and point embedding width")
    heads: int = Field(4, gt=0, description="attention heads (width must divide by it)")
    depth: int = Field(3, gt=0, description="decoder layers")
    queries: int = Field(32, gt=0, description="instance queries per event (at most this many instances)")
    mlp_ratio: float = Field(4.0, gt=0)
    regress: list[Literal["momentum", "direction", "vertex"]] = Field(
        default_factory=list,
        description="per-query regression outputs (particles): log10 |p| in MeV/c, a direction (3), the start "
        "point as an offset from the instance's centroid (3, in units of the coordinate scale)",
    )


REGRESS_WIDTH = {"momentum": 1, "direction": 3, "vertex": 3}


def regress_dims(names) -> dict[str, slice]:
    """{output: its columns in the regression head's output}, in the configured order."""
    out, start = {}, 0
    for name in names:
        out[name] = slice(start, start + REGRESS_WIDTH[name])
        start += REGRESS_WIDTH[name]
    return out


class _Layer(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.cross = nn.MultiheadAttention(width, heads, batch_first=True)
        self.self_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(3))

    def forward(self, q: torch.Tensor, pos: torch.Tensor, points: torch.Tensor, blocked: torch.Tensor) -> torch.Tensor:
        """q, pos (Q, C); points (n, C); blocked (Q, n) bool: True where a query may not look."""
        a, _ = self.cross((q + pos)[None], points[None], points[None], attn_mask=blocked, need_weights=False)
        q = self.norms[0](q + a[0])
        a, _ = self.self_attn((q + pos)[None], (q + pos)[None], q[None], need_weights=False)
        q = self.norms[1](q + a[0])
        return self.norms[2](q + self.mlp(q))


class MaskDecoder(nn.Module):
    """`forward(point_feat (N, in_channels), offset (B,))` -> per event {"layers": [{"class": (Q, K + 1), "mask":
    (Q, n)[, "regress": (Q, D)]}, ...] (the learned queries' prediction first, then one per layer), "stuff": (n,)}."""

    def __init__(self, in_channels: int, num_classes: int, cfg: MaskDecoderConfig | None = None):
        super().__init__()
        cfg = cfg or MaskDecoderConfig()
        if cfg.width % cfg.heads:
            raise ValueError(f"mask decoder width {cfg.width} does not divide into {cfg.heads} heads")
        self.cfg, self.num_classes = cfg, num_classes
        w = cfg.width
        self.proj = nn.Sequential(nn.Linear(in_channels, w), nn.LayerNorm(w))
        self.query_feat = nn.Embedding(cfg.queries, w)
        self.query_pos = nn.Embedding(cfg.queries, w)
        self.layers = nn.ModuleList(_Layer(w, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.out_norm = nn.LayerNorm(w)
        self.class_head = nn.Linear(w, num_classes + 1)  # the last class is "no object"
        self.mask_embed = nn.Sequential(nn.Linear(w, w), nn.GELU(), nn.Linear(w, w))
        self.stuff_head = nn.Linear(w, 1)
        self.regress_dims = regress_dims(cfg.regress)
        if cfg.regress:
            width = self.regress_dims[cfg.regress[-1]].stop
            self.regress_head = nn.Sequential(nn.Linear(w, w), nn.GELU(), nn.Linear(w, width))

    def _predict(self, q: torch.Tensor, points: torch.Tensor) -> dict:
        q = self.out_norm(q)
        pred = {"class": self.class_head(q), "mask": self.mask_embed(q) @ points.T}
        if self.cfg.regress:
            pred["regress"] = self.regress_head(q)
        return pred

    def forward(self, point_feat: torch.Tensor, offset: torch.Tensor) -> list[dict]:
        feats = self.proj(point_feat)
        out, start = [], 0
        for end in offset.tolist():
            points = feats[start:end]
            q, pos = self.query_feat.weight, self.query_pos.weight
            pred = self._predict(q, points)
            layers = [pred]
            for layer in self.layers:
                blocked = pred["mask"].detach() < 0  # sigmoid < 0.5: outside the query's current mask
                blocked[blocked.all(1)] = False  # a query whose mask is empty looks everywhere
                q = layer(q, pos, points, blocked)
                pred = self._predict(q, points)
                layers.append(pred)
            out.append({"layers": layers, "stuff": self.stuff_head(points).squeeze(1)})
            start = end
        return out
