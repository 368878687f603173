"""Point Transformer V3 as Panda uses it (PT-v3m2, docs/methods.md, "Panda"), with tiny / small / base / sonata
presets, and a reference mode that computes what the published implementation does (docs/reference-ptv3.md).

Data flow (packed batches: concatenated points + cumulative per-event `offset`):

    stem: conv (3x3x3 submanifold conv + LN + GELU) or linear (Linear + LN + GELU, the reference's)
    [-> masked points' embeddings replaced by a mask token]
    -> stage 0 blocks -> [grid pool (grid // stride) -> stage s blocks] for s = 1..4   (`forward` returns all levels)
    block = xCPE (subm conv 3x3x3 -> linear -> LN, residual)
            -> x + drop_path(ls1 * attn(LN(x)))   attention inside patches of K points in one serialized order
            -> x + drop_path(ls2 * mlp(LN(x)))
    block i of a stage uses order i mod 4 of the (per forward, in training, shuffled) order list.
    Serialization depth: per event by default (an event's answer does not depend on its batch), or one depth per
    batch as the reference takes it (`serialization_depth`).

`Decoder` (the "dec" protocol head) unpools level by level (proj(coarse)[inverse] + proj_skip(skip)) with its own
blocks; `upcast` concatenates every level's features down to level 0 (the "lin" protocol's input).

Parameter names (hub.reference maps them to the reference's; spconv kernels are (Cout,3,3,3,Cin) on both sides):
    embedding.stem.weight/.bias, embedding.norm.*          conv stem and its LayerNorm
    embedding.stem.linear.*, embedding.stem.norm.*         linear stem (the reference's names)
    embedding.mask_token                                   (1, C0), with `mask_token`
    enc.{s}.down.proj.*, enc.{s}.down.norm.*               grid pooling of stage s >= 1 (Linear, LayerNorm)
    enc.{s}.blocks.{i}.cpe.conv.*, .cpe.linear.*, .cpe.norm.*
    enc.{s}.blocks.{i}.norm1.*, .attn.qkv.*, .attn.proj.*, .norm2.*, .mlp.fc1.*, .mlp.fc2.*, .ls1.gamma, .ls2.gamma
    dec.{s}.up.proj.*, dec.{s}.up.proj_skip.*, dec.{s}.blocks.{i}.*   (decoder, s = 3..0)
"""

from __future__ import annotations

import random
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from raysvc.models.layers import MLP, DropPath
from raysvc.models.presets import build_preset
from raysvc.ops import spconv_backend
from raysvc.ops.attention import Patches, make_patches, patch_attention
from raysvc.ops.packed import batch_to_offset, offset_to_batch, permute_rows, segment_mean, unique_cells
from raysvc.ops.paths import cpu_path
from raysvc.ops.ranges import known_in, mark_range
from raysvc.ops.serialization import (
    ORDERS,
    batch_depths,
    coarsen_codes,
    codes_by_event,
    event_depths,
    point_depths,
    serialize_by_event,
    sort_codes,
)
from raysvc.ops.sparse_conv import KernelPairs, NeighbourMap, SubMConv3d, kernel_map, subm_conv3d


class PTv3Config(BaseModel):
    """Backbone shape; `preset(name)` gives tiny / small / base."""

    model_config = ConfigDict(extra="forbid")
    in_channels: int = Field(4, ge=1, description="xyz + energy")
    depths: tuple[int, ...] = (3, 3, 3, 9, 3)
    channels: tuple[int, ...] = (48, 96, 192, 384, 512)
    heads: tuple[int, ...] = (3, 6, 12, 24, 32)
    patch_size: int = Field(256, ge=1)
    orders: tuple[str, ...] = ("hilbert", "hilbert-trans", "z", "z-trans")
    shuffle_orders: bool = True
    mlp_ratio: float = 4.0
    layer_scale: float | None = Field(1e-5, description="init of the per-channel residual scale; None: off")
    drop_path: float = Field(0.3, ge=0, lt=1, description="max rate, linear over blocks")
    dec_depths: tuple[int, ...] = (2, 2, 2, 2)
    dec_channels: tuple[int, ...] = (64, 96, 192, 384)
    dec_heads: tuple[int, ...] = (4, 6, 12, 24)
    stem: str = Field(
        "conv",
        pattern="^(conv|linear)$",
        description="conv: 3x3x3 submanifold conv -> LN -> GELU; linear: Linear -> LN -> GELU (PT-v3m2's)",
    )
    mask_token: bool = Field(
        False, description="the embedding owns a learned mask token (PT-v3m2's embedding.mask_token)"
    )
    stride: tuple[int, ...] | None = Field(None, description="grid pooling stride per pooled stage; None: 2 each")
    qkv_bias: bool = True
    qk_scale: float | None = Field(None, description="attention logit scale; None: head_dim^-0.5")
    serialization_depth: str = Field(
        "event",
        pattern="^(event|batch)$",
        description="event: each event's own curve depth (its answer does not depend on its batch); batch: one depth "
        "for the whole batch (the reference implementation's)",
    )
    sparse_conv: str = Field(
        "auto",
        pattern="^(auto|torch|spconv|gather|pairs)$",
        description="auto: spconv on CUDA if present, else torch: gather on devices, pairs on the CPU",
    )

    @model_validator(mode="after")
    def _shapes(self) -> PTv3Config:
        n = len(self.depths)
        if not (len(self.channels) == len(self.heads) == n):
            raise ValueError(
                f"depths, channels and heads need one entry per stage, got {n}, {len(self.channels)}, {len(self.heads)}"
            )
        if not (len(self.dec_depths) == len(self.dec_channels) == len(self.dec_heads) == n - 1):
            raise ValueError(f"decoder depths/channels/heads need {n - 1} entries (one per stage below the last)")
        for c, h in [
            *zip(self.channels, self.heads, strict=True),
            *zip(self.dec_channels, self.dec_heads, strict=True),
        ]:
            if c % h:
                raise ValueError(f"channels {c} not divisible by heads {h}")
        if self.stride is not None and (len(self.stride) != n - 1 or min(self.stride, default=2) < 1):
            raise ValueError(f"stride needs {n - 1} positive entries (one per pooled stage), got {self.stride}")
        bad = [o for o in self.orders if o not in ORDERS]
        if bad or not self.orders:
            raise ValueError(f"orders must be a non-empty subset of {ORDERS}, got {self.orders}")
        return self


PRESETS: dict[str, dict] = {
    # a few M parameters: trains on 2 CPU cores
    "tiny": dict(
        depths=(1, 1, 1, 1, 1),
        channels=(16, 32, 64, 128, 192),
        heads=(1, 2, 4, 8, 12),
        patch_size=128,
        dec_depths=(1, 1, 1, 1),
        dec_channels=(32, 32, 64, 128),
        dec_heads=(2, 2, 4, 8),
        drop_path=0.1,
        layer_scale=None,
    ),
    "small": dict(
        depths=(2, 2, 2, 6, 2),
        channels=(32, 64, 128, 256, 384),
        heads=(2, 4, 8, 16, 24),
        dec_depths=(1, 1, 1, 1),
        dec_channels=(48, 64, 128, 256),
        dec_heads=(3, 4, 8, 16),
        drop_path=0.2,
    ),
    # Panda-Base: pimm's published PT-v3m2 backbone (linear stem, layer scale 1e-5, patch 256, four orders):
    # 90,758,784 parameters (published: 90.8M); its embedding.mask_token (48 more) lives in the Panda pretraining
    # model here, and an import of Panda-Base turns it on (hub.reference). Serialization depth stays per event.
    "base": dict(stem="linear"),
    # Sonata's released encoder (facebookresearch/sonata; xyz + colour + normal in): 108,461,376 parameters
    "sonata": dict(
        in_channels=9,
        depths=(3, 3, 3, 12, 3),
        patch_size=1024,
        orders=("z", "z-trans", "hilbert", "hilbert-trans"),
        layer_scale=None,
        stem="linear",
        mask_token=True,
    ),
}


def preset(name: str, **overrides) -> PTv3Config:
    return build_preset(PTv3Config, PRESETS, name, overrides)


# ---- the point set at one resolution ------------------------------------------------------------------------


def _codes(node: dict, name: str) -> torch.Tensor:
    """A level's `serialize_by_event` codes of the order `name`. A pooled level's node points down to its points'
    node ("from": node, inverse, levels pooled), whose codes it coarsens (`coarsen_codes`), asking for them in turn
    if that level had no use for the order: one curve encoded per order and forward, at the finest level. The nodes
    point down only (a level's cache holds its node; a node never holds a cache), so no reference cycle keeps a
    step's geometry alive after the step."""
    key = f"code:{name}"
    if key not in node:
        if node["from"] is not None:
            below, inverse, levels = node["from"]
            node[key] = coarsen_codes(_codes(below, name), inverse, len(node["grid"]), levels)
        else:
            if "depths" not in node:  # shared by the level's orders; on a device per point: no read-back
                depths = event_depths if cpu_path(node["grid"]) else point_depths
                node["depths"] = depths(node["grid"], node["batch"])
            node[key] = codes_by_event(node["grid"], node["batch"], name, node["depths"])
    return node[key]


@dataclass
class Level:
    """Points of one resolution level with everything the layers of a stage share."""

    feat: torch.Tensor  # (N, C)
    coord: torch.Tensor  # (N, 3) float, mean of the member points
    grid_coord: torch.Tensor  # (N, 3) int64, per event from its minimum corner
    offset: torch.Tensor  # (B,) cumulative
    parent_inverse: torch.Tensor | None = None  # (N_child,) this level's cell of each point of the level below
    _cache: dict = field(default_factory=dict)

    @property
    def batch(self) -> torch.Tensor:
        if "batch" not in self._cache:
            self._cache["batch"] = offset_to_batch(self.offset, len(self.feat))
        return self._cache["batch"]

    def conv_map(self, pairs: bool) -> NeighbourMap | KernelPairs:
        """The level's neighbour table, built once and shared by its convolutions: per-offset pairs (the CPU path)
        or the padded (N, 27) gather map (the device path)."""
        key = "pairs" if pairs else "neighbours"
        if key not in self._cache:
            if "nbr" not in self._cache:
                self._cache["nbr"] = kernel_map(self.grid_coord, self.batch, len(self.offset))
            nbr = self._cache["nbr"]
            self._cache[key] = KernelPairs.from_map(nbr) if pairs else NeighbourMap.from_map(nbr)
        return self._cache[key]

    def order(self, name: str, batch_depth: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(perm, inverse) of the serialized order `name`; with `batch_depth`, at one curve depth for the whole
        level (the reference's rule) instead of each event's own."""
        key = f"order:{name}:{batch_depth}"
        if key not in self._cache:
            if batch_depth:
                if "depths:batch" not in self._cache:  # shared by the level's orders
                    self._cache["depths:batch"] = batch_depths(self.grid_coord, self.batch)
                _, perm, inv = serialize_by_event(self.grid_coord, self.batch, name, self._cache["depths:batch"])
            else:
                _, perm, inv = sort_codes(_codes(self.curves(), name))
            self._cache[key] = (perm, inv)
        return self._cache[key]

    def curves(self) -> dict:
        """The level's node of serialization codes (see `_codes`)."""
        if "curves" not in self._cache:
            self._cache["curves"] = {"grid": self.grid_coord, "batch": self.batch, "from": None}
        return self._cache["curves"]

    def patches(self, size: int) -> Patches:
        key = f"patches:{size}"
        if key not in self._cache:
            self._cache[key] = make_patches(self.offset, size)
        return self._cache[key]

    def with_feat(self, feat: torch.Tensor) -> Level:
        return Level(feat, self.coord, self.grid_coord, self.offset, self.parent_inverse, self._cache)


# ---- layers -------------------------------------------------------------------------------------------------


class SparseConv(SubMConv3d):
    """Submanifold 3x3x3 conv on a Level: spconv on CUDA when installed (mode "auto"); else ours, one gather and one
    GEMM on devices ("gather") and one GEMM per kernel offset on the CPU ("pairs": it multiplies only the ~4 of 27
    neighbours that exist, 3-10x faster there; a GPU step is launch-bound instead)."""

    def __init__(self, cin: int, cout: int, mode: str = "auto"):
        super().__init__(cin, cout)
        self.mode = mode

    def forward(self, feat: torch.Tensor, level: Level) -> torch.Tensor:  # type: ignore[override]
        use_spconv = self.mode == "spconv" or (self.mode == "auto" and feat.is_cuda and spconv_backend.cuda_available())
        if use_spconv:
            cache = level._cache.setdefault("spconv", {})
            return spconv_backend.subm_conv3d(feat, level.grid_coord, level.batch, self.weight, self.bias, cache)
        pairs = self.mode == "pairs" or (self.mode in ("auto", "torch") and cpu_path(feat))
        return subm_conv3d(feat, level.conv_map(pairs), self.weight, self.bias)


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class CPE(nn.Module):
    """xCPE: conditional positional encoding by a submanifold conv, added to the block input."""

    def __init__(self, dim: int, mode: str):
        super().__init__()
        self.conv = SparseConv(dim, dim, mode)
        self.linear = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, level: Level) -> torch.Tensor:
        return self.norm(self.linear(self.conv(x, level)))


class SerializedAttention(nn.Module):
    def __init__(self, dim: int, heads: int, cfg: PTv3Config):
        super().__init__()
        self.heads, self.patch_size, self.scale = heads, cfg.patch_size, cfg.qk_scale
        self.batch_depth = cfg.serialization_depth == "batch"
        self.qkv = nn.Linear(dim, 3 * dim, bias=cfg.qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, level: Level, order: str) -> torch.Tensor:
        perm, inverse = level.order(order, self.batch_depth)
        n, c = x.shape
        qkv = self.qkv(permute_rows(x, perm, inverse)).view(n, 3, self.heads, c // self.heads)  # [q | k | v]
        out = patch_attention(qkv, level.patches(self.patch_size), self.scale).reshape(n, c)
        return self.proj(permute_rows(out, inverse, perm))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, cfg: PTv3Config, drop_path: float):
        super().__init__()
        self.cpe = CPE(dim, cfg.sparse_conv)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SerializedAttention(dim, heads, cfg)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, cfg.mlp_ratio)
        self.ls1 = LayerScale(dim, cfg.layer_scale) if cfg.layer_scale is not None else nn.Identity()
        self.ls2 = LayerScale(dim, cfg.layer_scale) if cfg.layer_scale is not None else nn.Identity()
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, level: Level, order: str) -> torch.Tensor:
        x = x + self.cpe(x, level)
        x = x + self.drop_path(self.ls1(self.attn(self.norm1(x), level, order)))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))


class GridPool(nn.Module):
    """Grid pooling: cells of `stride` grid units (grid_coord // stride, no re-centring), linear, then per cell the max
    of features and the mean of coordinates, LN, GELU; cells sorted by (event, x, y, z), as the reference does."""

    def __init__(self, cin: int, cout: int, stride: int = 2):
        super().__init__()
        self.stride = stride
        self.proj = nn.Linear(cin, cout)
        self.norm = nn.LayerNorm(cout)

    def forward(self, level: Level) -> Level:
        key = f"pool:{self.stride}"
        if key not in level._cache:  # the cells depend on the grid alone: shared by every pass over the same grid
            cells = level.grid_coord // self.stride
            if known_in(level.grid_coord, 0, 1 << 16):  # so are the cells: no second range check on the device
                mark_range(cells, 0, 1 << 16)
            cell_batch, cell_grid, inverse = unique_cells(level.batch, cells)
            cache = {"batch": cell_batch}  # known here: the level need not expand its offsets again
            if self.stride & (self.stride - 1) == 0:  # the cells' orders come from the points' codes (`_codes`)
                source = (level.curves(), inverse, self.stride.bit_length() - 1)
                cache["curves"] = {"grid": cell_grid, "batch": cell_batch, "from": source}
            level._cache[key] = (cell_grid, batch_to_offset(cell_batch, len(level.offset)), inverse, cache)
        cell_grid, offset, inverse, cache = level._cache[key]
        m = len(cell_grid)
        f = self.proj(level.feat)
        idx = inverse[:, None].expand(-1, f.shape[1])
        pooled = f.new_full((m, f.shape[1]), float("-inf")).scatter_reduce(0, idx, f, "amax", include_self=True)
        coord = segment_mean(level.coord, inverse, m)  # per pass: a pass may jitter the coordinates
        return Level(F.gelu(self.norm(pooled)), coord, cell_grid, offset, inverse, cache)


class Stage(nn.Module):
    def __init__(self, blocks: list[Block], down: GridPool | None):
        super().__init__()
        self.down = down
        self.blocks = nn.ModuleList(blocks)

    def forward(self, level: Level, orders: list[str]) -> Level:
        if self.down is not None:
            level = self.down(level)
        x = level.feat
        for i, block in enumerate(self.blocks):
            x = block(x, level, orders[i % len(orders)])
        return level.with_feat(x)


def _drop_rates(depths: tuple[int, ...], max_rate: float) -> list[list[float]]:
    total = sum(depths)
    rates = [max_rate * i / max(total - 1, 1) for i in range(total)]
    out, i = [], 0
    for d in depths:
        out.append(rates[i : i + d])
        i += d
    return out


class Embedding(nn.Module):
    """Our stem: 3x3x3 submanifold conv -> LN -> GELU (each point sees its neighbours before the first block)."""

    def __init__(self, cin: int, cout: int, mode: str, mask_token: bool = False):
        super().__init__()
        self.stem = SparseConv(cin, cout, mode)
        self.norm = nn.LayerNorm(cout)
        self.mask_token = nn.Parameter(torch.zeros(1, cout)) if mask_token else None

    def forward(self, level: Level) -> Level:
        return level.with_feat(F.gelu(self.norm(self.stem(level.feat, level))))


class LinearEmbedding(nn.Module):
    """PT-v3m2's stem: per point Linear -> LN -> GELU (exact erf); parameter names as the reference's."""

    def __init__(self, cin: int, cout: int, mask_token: bool = False):
        super().__init__()
        self.stem = nn.Sequential(
            OrderedDict(linear=nn.Linear(cin, cout), norm=nn.LayerNorm(cout), act=nn.GELU(approximate="none"))
        )
        self.mask_token = nn.Parameter(torch.zeros(1, cout)) if mask_token else None

    def forward(self, level: Level) -> Level:
        return level.with_feat(self.stem(level.feat))


class PTv3(nn.Module):
    """The encoder. `forward(feat, coord, grid_coord, offset)` returns the list of levels, finest first."""

    def __init__(self, cfg: PTv3Config):
        super().__init__()
        self.cfg = cfg
        if cfg.stem == "linear":
            self.embedding = LinearEmbedding(cfg.in_channels, cfg.channels[0], cfg.mask_token)
        else:
            self.embedding = Embedding(cfg.in_channels, cfg.channels[0], cfg.sparse_conv, cfg.mask_token)
        rates = _drop_rates(cfg.depths, cfg.drop_path)
        strides = cfg.stride or (2,) * (len(cfg.depths) - 1)
        stages = []
        for s, (depth, dim, heads) in enumerate(zip(cfg.depths, cfg.channels, cfg.heads, strict=True)):
            down = GridPool(cfg.channels[s - 1], dim, strides[s - 1]) if s > 0 else None
            stages.append(Stage([Block(dim, heads, cfg, rates[s][i]) for i in range(depth)], down))
        self.enc = nn.ModuleList(stages)

    def orders(self) -> list[str]:
        orders = list(self.cfg.orders)
        if self.training and self.cfg.shuffle_orders:
            random.shuffle(orders)  # Python's RNG: seeded and checkpointed by the training loop
        return orders

    def forward(
        self,
        feat: torch.Tensor,
        coord: torch.Tensor,
        grid_coord: torch.Tensor,
        offset: torch.Tensor,
        mask: torch.Tensor | None = None,
        mask_token: torch.Tensor | None = None,
        geometry: dict | None = None,
    ) -> list[Level]:
        """`mask` (N,) bool with `mask_token` (C0,): masked points' embeddings are replaced by the token (Panda's
        masked global views); the stem still sees their coordinates, as every point keeps its place in the grid.
        Without `mask_token`, the embedding's own token (config `mask_token`) is used.
        `geometry`: a dict shared by the forwards over one `grid_coord` tensor and its offsets (Panda's teacher and
        masked student): the kernel maps, orders, patches and pooling cells of every level are built by the first
        and reused by the others (they depend on the grid alone)."""
        if geometry is None:
            geometry = {}
        elif geometry.setdefault("grid_coord", grid_coord) is not grid_coord:
            raise ValueError("geometry was built on another grid_coord tensor; pass one dict per coordinate set")
        level = self.embedding(Level(feat, coord, grid_coord.long(), offset, None, geometry.setdefault("levels", {})))
        if mask is not None:
            if mask_token is None:
                mask_token = getattr(self.embedding, "mask_token", None)
                if mask_token is None:
                    raise ValueError("a mask needs a mask_token: pass one, or build the model with mask_token=True")
            level = level.with_feat(torch.where(mask[:, None], mask_token.to(level.feat.dtype), level.feat))
        orders = self.orders()
        levels = []
        for stage in self.enc:
            level = stage(level, orders)
            levels.append(level)
        return levels


def upcast(levels: list[Level], to_level: int = 0) -> torch.Tensor:
    """Features of every level from the coarsest down to `to_level`, concatenated per point of `to_level` (each
    point takes its cells' features): the multi-stage features of the lin protocol and the Panda heads."""
    feat = levels[-1].feat
    for s in range(len(levels) - 1, to_level, -1):
        feat = torch.cat([levels[s - 1].feat, feat[levels[s].parent_inverse]], 1)
    return feat


class Unpool(nn.Module):
    def __init__(self, cin: int, cskip: int, cout: int):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(cin, cout), nn.LayerNorm(cout), nn.GELU())
        self.proj_skip = nn.Sequential(nn.Linear(cskip, cout), nn.LayerNorm(cout), nn.GELU())

    def forward(self, coarse: torch.Tensor, skip: Level, inverse: torch.Tensor) -> Level:
        return skip.with_feat(self.proj(coarse)[inverse] + self.proj_skip(skip.feat))


class DecoderStage(nn.Module):
    def __init__(self, up: Unpool, blocks: list[Block]):
        super().__init__()
        self.up = up
        self.blocks = nn.ModuleList(blocks)


class Decoder(nn.Module):
    """U-Net decoder of PTv3 (the "dec" protocol): returns level-0 features with dec_channels[0] channels."""

    def __init__(self, cfg: PTv3Config):
        super().__init__()
        rates = _drop_rates(cfg.dec_depths, cfg.drop_path)
        stages = []
        for s in range(len(cfg.dec_depths)):
            cin = cfg.channels[-1] if s == len(cfg.dec_depths) - 1 else cfg.dec_channels[s + 1]
            dim = cfg.dec_channels[s]
            blocks = [Block(dim, cfg.dec_heads[s], cfg, rates[s][i]) for i in range(cfg.dec_depths[s])]
            stages.append(DecoderStage(Unpool(cin, cfg.channels[s], dim), blocks))
        self.dec = nn.ModuleList(stages)
        self.out_channels = cfg.dec_channels[0]

    def forward(self, levels: list[Level], orders: list[str]) -> torch.Tensor:
        x = levels[-1].feat
        for s in range(len(self.dec) - 1, -1, -1):
            stage = self.dec[s]
            level = stage.up(x, levels[s], levels[s + 1].parent_inverse)
            x = level.feat
            for i, block in enumerate(stage.blocks):
                x = block(x, level, orders[i % len(orders)])
        return x


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
