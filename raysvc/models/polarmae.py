"""PoLAr-MAE (Young et al.): masked point modelling on C-NMS tokens, with tiny / base presets.

Data flow (packed batches: concatenated points + cumulative per-event `offset`; tokens packed the same way):

    tokenize: C-NMS centres (optionally among FPS seeds), at most max_tokens per event (the excess counted)
              -> a ball of <= max_points points per centre, padded with copies of its first point
              -> patches (T, P, 3 + C): xyz relative to the centre / radius, then the point features (energy)
    PolarMAEEncoder: mini-PointNet patch embedding (one token per group) + MLP positional embedding of the centre
              -> pre-norm Transformer over each event's tokens (padded to the batch's longest event, key-padding
                 mask), no final norm; the positional embedding is added before every block (`pos_every_layer`)
    PolarMAE (pretraining): mask round(ratio * n) tokens per event; encode the visible ones
              -> decoder: projected visible tokens + a learned mask token at each masked position, + positional
                 embeddings -> Transformer -> LayerNorm -> linear head: P x 3 points per masked token
              -> Chamfer loss against the masked groups' true points (pads excluded)
              -> energy infill: an order-aware mini-PointNet of each masked group's true xyz + its decoded token
                 -> energy per point, MSE over the real points

Where the released code differs (kept out on purpose, to follow the method's description): masked BatchNorm in the
mini-PointNets (LayerNorm here: per point, so pads and batch composition cannot change a token), post-norm blocks,
a cross-attention decoder (mask tokens attend to the visible ones), a Huber energy loss and drop path 0.25.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from raysvc.models.layers import MLP, DropPath
from raysvc.models.presets import build_preset
from raysvc.ops.grouping import cnms
from raysvc.ops.neighbors import ball_query, fps, knn
from raysvc.ops.packed import offset_to_batch

VOXEL = 1 / (384 * math.sqrt(3))  # one LArTPC voxel in the preprocess' normalised units (half-diagonal -> 1)


class PolarMAEConfig(BaseModel):
    """Tokenizer, encoder, decoder and loss settings; `preset(name)` gives tiny / base. Lengths in coordinate units."""

    model_config = ConfigDict(extra="forbid")
    in_channels: int = Field(4, ge=4, description="xyz + point features (energy)")
    radius: float = Field(5 * VOXEL, gt=0, description="ball radius, same unit as the coordinates (5 voxels)")
    overlap: float = Field(0.72, gt=0, description="C-NMS overlap factor (suppression radius 2 * r * overlap)")
    max_points: int = Field(32, ge=1, description="points per group")
    max_tokens: int = Field(512, ge=1, description="context: the first max_tokens centres of an event are kept")
    fps_seeds: int | None = Field(None, ge=1, description="C-NMS among this many FPS seeds per event; None: all points")
    pointnet_channels: tuple[int, int] = Field((128, 256), description="mini-PointNet widths (c1, c2); then 2 * c2")
    width: int = Field(384, ge=1)
    depth: int = Field(12, ge=1)
    heads: int = Field(6, ge=1)
    mlp_ratio: float = Field(4.0, gt=0)
    drop_path: float = Field(0.1, ge=0, lt=1, description="max rate, linear over the blocks of each Transformer")
    pos_every_layer: bool = Field(True, description="add the positional embedding before every block (Point-MAE)")
    decoder_width: int = Field(384, ge=1)
    decoder_depth: int = Field(4, ge=1)
    decoder_heads: int = Field(6, ge=1)
    mask_ratio: float = Field(0.6, ge=0, lt=1)
    energy_weight: float = Field(1.0, ge=0, description="weight of the energy-infill loss; 0 removes the branch")

    @model_validator(mode="after")
    def _shapes(self) -> PolarMAEConfig:
        for name, c, h in [("", self.width, self.heads), ("decoder_", self.decoder_width, self.decoder_heads)]:
            if c % h:
                raise ValueError(f"{name}width {c} not divisible by {name}heads {h}")
        if self.pointnet_channels[0] % 2:
            raise ValueError(f"pointnet_channels[0] must be even (sinusoidal index code), got {self.pointnet_channels}")
        return self


PRESETS: dict[str, dict] = {
    # ~1 M parameters (0.6 M in the encoder): trains on 2 CPU cores
    "tiny": dict(
        pointnet_channels=(64, 128),
        width=96,
        depth=4,
        heads=4,
        decoder_width=96,
        decoder_depth=2,
        decoder_heads=4,
    ),
    # ViT-S encoder (PoLAr-MAE's ViT-S/5) with the 4-block decoder
    "base": dict(),
}


def preset(name: str, **overrides) -> PolarMAEConfig:
    return build_preset(PolarMAEConfig, PRESETS, name, overrides)


# ---- tokens -------------------------------------------------------------------------------------------------


@dataclass
class Tokens:
    """Groups of a packed batch, packed event after event in C-NMS order."""

    centres: torch.Tensor  # (T, 3) centre coordinates
    token_offset: torch.Tensor  # (B,) cumulative tokens per event
    groups: torch.Tensor  # (T, P) global point indices, padded with the group's first index
    sizes: torch.Tensor  # (T,) real points per group
    patches: torch.Tensor  # (T, P, 3 + C) centre-relative xyz / radius, point features
    truncated: int  # events that had more than max_tokens centres

    @property
    def batch(self) -> torch.Tensor:
        return offset_to_batch(self.token_offset)

    def __len__(self) -> int:
        return len(self.centres)

    def to(self, device: torch.device) -> Tokens:
        """The same tokens on `device` (the tokenizer runs on CPU)."""
        return Tokens(*(x.to(device) if torch.is_tensor(x) else x for x in vars(self).values()))


def _starts(offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(counts, first row) of every event of a cumulative offset."""
    counts = torch.diff(offset, prepend=offset.new_zeros(1))
    return counts, offset - counts


@torch.no_grad()
def tokenize(coord: torch.Tensor, energy: torch.Tensor, offset: torch.Tensor, cfg: PolarMAEConfig) -> Tokens:
    """C-NMS groups of a packed batch as patches; `energy` (N,) or (N, in_channels - 3) point features."""
    feat = energy[:, None] if energy.dim() == 1 else energy
    if feat.shape[1] != cfg.in_channels - 3:
        raise ValueError(f"in_channels {cfg.in_channels} needs {cfg.in_channels - 3} point features, got {feat.shape}")
    if cfg.fps_seeds is None:
        res = cnms(coord, offset, cfg.radius, cfg.overlap, cfg.max_points)
        centre_index, centre_offset, groups = res.centers, res.center_offset, res.groups
    else:
        # C-NMS among FPS seeds (the released code's default), then balls over all points: the nearest max_points
        # (the released code instead gathers a larger ball and reduces it by FPS)
        seeds, seed_offset = fps(coord, offset, torch.full((len(offset),), cfg.fps_seeds))
        seeds, seed_offset = seeds.to(coord.device), seed_offset.to(coord.device)
        res = cnms(coord[seeds], seed_offset, cfg.radius, cfg.overlap, cfg.max_points)
        centre_index, centre_offset = seeds[res.centers], res.center_offset
        groups = ball_query(coord[centre_index], centre_offset, coord, offset, cfg.radius, cfg.max_points)
        groups = groups.to(coord.device)

    counts, first = _starts(centre_offset)
    batch = offset_to_batch(centre_offset)
    keep = torch.arange(len(centre_index), device=batch.device) - first[batch] < cfg.max_tokens
    centre_index, groups = centre_index[keep], groups[keep]
    token_offset = torch.cumsum(counts.clamp(max=cfg.max_tokens), 0)

    groups, sizes, patches = group_patches(coord, feat, centre_index, groups, cfg.radius)
    return Tokens(coord[centre_index], token_offset, groups, sizes, patches, int((counts > cfg.max_tokens).sum()))


def group_patches(
    coord: torch.Tensor, feat: torch.Tensor, centre_index: torch.Tensor, groups: torch.Tensor, radius: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(groups padded with their first index, real sizes, patches (T, P, 3 + C)) of -1-padded groups around
    `centre_index`: any grouping (C-NMS, FPS + ball query, FPS + kNN) becomes patches the same way."""
    sizes = (groups >= 0).sum(1)  # -1 only ever pads the tail
    groups = torch.where(groups >= 0, groups, groups[:, :1])
    rel = (coord[groups] - coord[centre_index][:, None]) / radius
    return groups, sizes, torch.cat([rel, feat[groups].to(rel.dtype)], -1)


@torch.no_grad()
def random_mask(token_offset: torch.Tensor, ratio: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """(T,) bool: a uniformly random round(ratio * n) of each event's n tokens (half up), at most n - 1 of them, so
    every event keeps a visible token for the encoder to attend to."""
    off = token_offset.cpu()  # drawn on CPU (a CPU generator), so a seed gives the same mask on any device
    counts, first = _starts(off)
    n_mask = torch.minimum(torch.floor(ratio * counts.double() + 0.5).long(), (counts - 1).clamp_min(0))
    batch = offset_to_batch(off)
    noise = torch.rand(len(batch), generator=generator, dtype=torch.float64)
    order = torch.argsort(noise)
    order = order[torch.argsort(batch[order], stable=True)]  # events stay in place, shuffled inside
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order))
    return (rank - first[batch] < n_mask[batch]).to(token_offset.device)


def token_targets(groups: torch.Tensor, sizes: torch.Tensor, semantic: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(T, num_classes) bool: group t holds a real point of class c (labels outside [0, num_classes) ignored)."""
    real = torch.arange(groups.shape[1], device=groups.device) < sizes[:, None]
    labels = semantic[groups].long()
    ok = real & (labels >= 0) & (labels < num_classes)
    rows = torch.arange(len(groups), device=groups.device)[:, None].expand_as(labels)
    out = torch.zeros(len(groups), num_classes, dtype=torch.bool, device=groups.device)
    out[rows[ok], labels[ok]] = True
    return out


def interpolate_to_points(
    token_feat: torch.Tensor,
    centres: torch.Tensor,
    token_offset: torch.Tensor,
    coord: torch.Tensor,
    offset: torch.Tensor,
    k: int = 3,
    eps: float = 1e-8,
) -> torch.Tensor:
    """(N, C) PointNet++ feature propagation: the mean of the event's k nearest tokens weighted by 1 / (d + eps)."""
    idx, dist = knn(coord, offset, centres, token_offset, k)
    idx, dist = idx.to(token_feat.device), dist.to(token_feat.device, token_feat.dtype)
    w = torch.where(idx >= 0, 1 / (dist + eps), torch.zeros_like(dist))  # an event with fewer than k tokens
    w = w / w.sum(1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
    return (token_feat[idx.clamp_min(0)] * w[..., None]).sum(1)


# ---- patch embeddings ---------------------------------------------------------------------------------------


class MiniPointNet(nn.Module):
    """Point-MAE's patch embedding: per-point MLP, max-pool, concat to each point, MLP, max-pool -> one token.
    Invariant to point order and to pads that copy a real point."""

    def __init__(self, cin: int, c1: int, c2: int, cout: int):
        super().__init__()
        self.first = nn.Sequential(nn.Linear(cin, c1), nn.LayerNorm(c1), nn.ReLU(), nn.Linear(c1, c2))
        self.second = nn.Sequential(nn.Linear(2 * c2, 2 * c2), nn.LayerNorm(2 * c2), nn.ReLU(), nn.Linear(2 * c2, cout))

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """(T, P, cin) -> (T, cout)."""
        f = self.first(patches)
        g = f.max(1, keepdim=True).values
        return self.second(torch.cat([g.expand_as(f), f], -1)).max(1).values


def sinusoid(index: torch.Tensor, dim: int) -> torch.Tensor:
    """(..., dim) transformer sinusoidal code of integer positions."""
    freq = torch.exp(-math.log(10000.0) * torch.arange(dim // 2, device=index.device) / (dim // 2))
    angle = index[..., None].float() * freq
    return torch.cat([angle.sin(), angle.cos()], -1)


class EquivariantMiniPointNet(nn.Module):
    """Per-point features of a group that know each point's place in it: a sinusoidal code of the in-group index is
    added after the first layer. Pads get index 0, the code of the point they copy, so they change nothing."""

    def __init__(self, c1: int, c2: int, cout: int):
        super().__init__()
        self.lift = nn.Linear(3, c1)
        self.first = nn.Sequential(nn.LayerNorm(c1), nn.ReLU(), nn.Linear(c1, c2))
        self.second = nn.Sequential(nn.Linear(2 * c2, 2 * c2), nn.LayerNorm(2 * c2), nn.ReLU(), nn.Linear(2 * c2, cout))

    def forward(self, xyz: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
        """(M, P, 3), (M,) -> (M, P, cout)."""
        index = torch.arange(xyz.shape[1], device=xyz.device).expand(len(xyz), -1)
        index = torch.where(index < sizes[:, None], index, 0)
        f = self.first(self.lift(xyz) + sinusoid(index, self.lift.out_features).to(xyz.dtype))
        g = f.max(1, keepdim=True).values
        return self.second(torch.cat([g.expand_as(f), f], -1))


class EnergyHead(nn.Module):
    """Energy infill: per-point features of the true positions + the group's decoded mask token -> energy per point."""

    def __init__(self, cfg: PolarMAEConfig):
        super().__init__()
        c = cfg.decoder_width
        self.points = EquivariantMiniPointNet(*cfg.pointnet_channels, c)
        self.token = nn.Linear(c, c)
        self.out = nn.Sequential(nn.Linear(2 * c, c), nn.GELU(), nn.Linear(c, cfg.in_channels - 3))

    def forward(self, xyz: torch.Tensor, sizes: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        """(M, P, 3), (M,), (M, decoder_width) -> (M, P, in_channels - 3)."""
        f = self.points(xyz, sizes)
        t = self.token(token)[:, None].expand(-1, f.shape[1], -1)
        return self.out(torch.cat([f, t], -1))


def pos_mlp(dim: int, hidden: int = 128) -> nn.Sequential:
    """3-layer MLP of the centre coordinates."""
    return nn.Sequential(nn.Linear(3, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, dim))


# ---- Transformer --------------------------------------------------------------------------------------------


def pad_events(x: torch.Tensor, offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """Packed rows (T, C) -> (B, L, C) with L the longest event, the (B, L) valid mask and the (row, col) map back."""
    counts, first = _starts(offset)
    batch = offset_to_batch(offset)
    col = torch.arange(len(x), device=x.device) - first[batch]
    length = max(int(counts.max()) if len(counts) else 0, 1)
    out = x.new_zeros(len(offset), length, x.shape[1])
    out[batch, col] = x
    valid = torch.zeros(len(offset), length, dtype=torch.bool, device=x.device)
    valid[batch, col] = True
    valid[:, 0] |= counts == 0  # an empty event attends to a zero row instead of nothing (NaN)
    return out, valid, (batch, col)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :])
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    """Pre-norm Transformer block."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_ratio)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), valid))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class Transformer(nn.Module):
    """Blocks over the tokens of each event of a packed batch; no final norm."""

    def __init__(self, dim: int, depth: int, heads: int, mlp_ratio: float, drop_path: float, pos_every_layer: bool):
        super().__init__()
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, r) for r in rates)
        self.pos_every_layer = pos_every_layer

    def forward(self, x: torch.Tensor, pos: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """(T, C) tokens, (T, C) positional embeddings, (B,) cumulative token counts -> (T, C)."""
        x, valid, (row, col) = pad_events(x, offset)
        pos = pad_events(pos, offset)[0]
        if not self.pos_every_layer:
            x = x + pos
        for block in self.blocks:
            x = block(x + pos if self.pos_every_layer else x, valid)
        return x[row, col]


def _init(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


# ---- models -------------------------------------------------------------------------------------------------


class PolarMAEEncoder(nn.Module):
    """Patch embedding + positional embedding + Transformer: the part fine-tuning and the token probe use."""

    def __init__(self, cfg: PolarMAEConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = MiniPointNet(cfg.in_channels, *cfg.pointnet_channels, cfg.width)
        self.pos_embed = pos_mlp(cfg.width)
        self.transformer = Transformer(
            cfg.width, cfg.depth, cfg.heads, cfg.mlp_ratio, cfg.drop_path, cfg.pos_every_layer
        )
        self.apply(_init)

    def forward(self, tokens: Tokens, visible: torch.Tensor | None = None) -> torch.Tensor:
        """(T_visible, width) features of the `visible` tokens ((T,) bool), each event attending only to its own."""
        patches, centres, offset = tokens.patches, tokens.centres, tokens.token_offset
        if visible is not None:
            patches, centres = patches[visible], centres[visible]
            kept = torch.zeros(len(offset), dtype=torch.long, device=offset.device).index_add_(
                0, tokens.batch, visible.long()
            )
            offset = torch.cumsum(kept, 0)
        return self.transformer(self.patch_embed(patches), self.pos_embed(centres), offset)

    def encode(self, tokens: Tokens) -> torch.Tensor:
        """(T, width) features of all tokens."""
        return self(tokens)


def chamfer_loss(pred: torch.Tensor, target: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Squared-L2 Chamfer distance averaged over groups; a group of n real points compares the first n of its
    predictions (M, P, 3) with its n true points (M, P, 3)."""
    real = torch.arange(pred.shape[1], device=pred.device) < sizes[:, None]
    d = ((pred[:, :, None] - target[:, None]) ** 2).sum(-1)  # (M, pred, true)
    d = d.masked_fill(~(real[:, :, None] & real[:, None, :]), float("inf"))
    n = sizes.clamp_min(1).to(pred.dtype)
    to_pred = torch.where(real, d.min(1).values, 0).sum(1) / n  # each true point to its nearest prediction
    to_true = torch.where(real, d.min(2).values, 0).sum(1) / n
    per_group = to_pred + to_true
    return per_group.mean() if len(per_group) else pred.sum() * 0


class PolarMAE(nn.Module):
    """Encoder + MAE decoder + point and energy heads; `forward` runs one masked-modelling step and returns losses."""

    def __init__(self, cfg: PolarMAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = PolarMAEEncoder(cfg)
        dw = cfg.decoder_width
        self.decoder_embed = nn.Linear(cfg.width, dw)
        self.mask_token = nn.Parameter(torch.zeros(dw))
        self.decoder_pos_embed = pos_mlp(dw)
        self.decoder = Transformer(
            dw, cfg.decoder_depth, cfg.decoder_heads, cfg.mlp_ratio, cfg.drop_path, cfg.pos_every_layer
        )
        self.decoder_norm = nn.LayerNorm(dw)
        self.point_head = nn.Linear(dw, cfg.max_points * 3)
        self.energy_head = EnergyHead(cfg) if cfg.energy_weight > 0 else None
        for name, m in self.named_children():
            if name != "encoder":  # initialised by its own constructor
                m.apply(_init)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def forward(self, tokens: Tokens, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Losses {"loss", "chamfer_loss", "energy_loss"} and monitors, with the (T,) bool "mask" it drew."""
        mask = random_mask(tokens.token_offset, self.cfg.mask_ratio, generator)
        visible = self.encoder(tokens, ~mask)

        x = self.decoder_embed(visible)
        full = x.new_zeros(len(tokens), x.shape[1])
        full[~mask] = x
        full = torch.where(mask[:, None], self.mask_token.to(x.dtype), full)
        dec = self.decoder(full, self.decoder_pos_embed(tokens.centres), tokens.token_offset)
        dec = self.decoder_norm(dec[mask])

        target, sizes = tokens.patches[mask], tokens.sizes[mask]
        pred = self.point_head(dec).view(len(dec), -1, 3)
        chamfer = chamfer_loss(pred, target[..., :3], sizes)
        if self.energy_head is not None and len(dec):
            energy = self.energy_head(target[..., :3], sizes, dec)
            real = torch.arange(target.shape[1], device=target.device) < sizes[:, None]
            energy_loss = F.mse_loss(energy[real], target[..., 3:][real])
        else:
            energy_loss = chamfer.new_zeros(())
        return {
            "loss": chamfer + self.cfg.energy_weight * energy_loss,
            "chamfer_loss": chamfer,
            "energy_loss": energy_loss,
            "mask": mask,
            "num_tokens": torch.tensor(len(tokens)),
            "masked_frac": mask.float().mean() if len(mask) else chamfer.new_zeros(()),
            "truncated": torch.tensor(tokens.truncated),
        }


# ---- segmentation from the encoder ---------------------------------------------------------------------------

SEG_HEADS = ("lin", "dec")


class PolarMAESegModel(nn.Module):
    """The PoLAr-MAE encoder with a per-point head: tokens of the input points -> encoder -> feature propagation from
    the tokens to every point -> "lin" (LayerNorm + linear) or "dec" (an MLP on the propagated features and the point's
    own input features, then linear). Called like the PTv3 segmenter (`feat` = xyz + point features, `coord`,
    `grid_coord`, `offset` of the grid-sampled points), so training, evaluation and serving treat both alike."""

    def __init__(self, cfg: PolarMAEConfig, num_classes: int, head: str = "dec"):
        super().__init__()
        if head not in SEG_HEADS:
            raise ValueError(f"head must be one of {SEG_HEADS}, got {head!r}")
        self.cfg, self.head_kind = cfg, head
        self.backbone = PolarMAEEncoder(cfg)
        w = self.head_channels = cfg.width
        if head == "dec":
            self.decoder = nn.Sequential(
                nn.Linear(w + cfg.in_channels, 2 * w), nn.LayerNorm(2 * w), nn.GELU(), nn.Linear(2 * w, w), nn.GELU()
            )
            self.head = nn.Linear(w, num_classes)
        else:
            self.decoder = None
            self.head = nn.Sequential(nn.LayerNorm(w), nn.Linear(w, num_classes))
        for m in (self.decoder, self.head):
            if m is not None:
                m.apply(_init)

    def forward(
        self, feat: torch.Tensor, coord: torch.Tensor, grid_coord: torch.Tensor, offset: torch.Tensor
    ) -> torch.Tensor:
        """(N, num_classes) logits of the N input points."""
        return self.head(self.head_input(feat, coord, grid_coord, offset))

    def head_input(
        self, feat: torch.Tensor, coord: torch.Tensor, grid_coord: torch.Tensor, offset: torch.Tensor
    ) -> torch.Tensor:
        """(N, width): what the final linear layer sees; other heads (instances) read the same features."""
        per_point = self.point_features(feat, coord, grid_coord, offset)
        if self.decoder is not None:
            per_point = self.decoder(torch.cat([per_point, feat.to(per_point.dtype)], 1))
        return per_point

    def point_features(
        self, feat: torch.Tensor, coord: torch.Tensor, grid_coord: torch.Tensor, offset: torch.Tensor
    ) -> torch.Tensor:
        """(N, width) encoder features per input point: the event's tokens, encoded, propagated to the points."""
        tokens = tokenize(coord.float(), feat[:, 3:].float(), offset, self.cfg).to(feat.device)
        tok = self.backbone.encode(tokens)
        return interpolate_to_points(tok, tokens.centres, tokens.token_offset, coord, offset)

    def freeze_backbone(self) -> None:
        """lin / dec protocols (the paper's PEFT): the encoder stays as loaded, without gradients."""
        for p in self.backbone.parameters():
            p.requires_grad_(False)
