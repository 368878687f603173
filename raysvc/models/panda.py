"""Panda: Sonata-style self-distillation of a PTv3 encoder (docs/methods.md, "Panda").

    global views (2 per event) --mask--> student PTv3 --upcast to level `up_cast_level`--> mask head  -> student sims
    global views (unmasked)          --> teacher PTv3 (EMA of the student) ----------------> mask / unmask heads
    local views (6 per event)        --> student PTv3 ------------------------------------> unmask head -> sims
    targets: Sinkhorn-Knopp over the teacher's prototype similarities (all-reduced over workers), matched to the
    student's points by nearest neighbour on the original (pre-augmentation) coordinates.
    losses: mask (masked view vs the same view), roll-mask (vs the other global view), unmask (local views vs the
    principal global view), each a cross-entropy averaged per view and then over views.

Heads: MLP (hidden, GELU) -> embed -> L2 norm -> weight-normalised linear onto the prototypes (norm fixed at 1).
No centring and no KoLeo: the Sinkhorn targets keep the prototypes in use.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from raysvc.models.ptv3 import Level, PTv3, PTv3Config, upcast
from raysvc.models.stems import DetectorStems
from raysvc.ops.neighbors import knn
from raysvc.ops.packed import batch_to_offset, host_list, known_on_host, offset_to_batch, segment_mean


class PandaConfig(BaseModel):
    """The method's hyperparameters; defaults are Panda-Base's (docs/methods.md), lengths in normalised units."""

    model_config = ConfigDict(extra="forbid")
    up_cast_level: int = Field(2, ge=0, description="features of this level and every coarser one feed the heads")
    head_hidden: int = Field(4096, gt=0)
    head_embed: int = Field(256, gt=0)
    prototypes: int = Field(4096, gt=1)
    teacher_temp: tuple[float, float] = Field((0.04, 0.07), description="warmed from the first to the second")
    teacher_temp_warmup_frac: float = Field(0.05, ge=0, le=1)
    student_temp: float = Field(0.1, gt=0)
    sinkhorn_iters: int = Field(3, ge=1)
    mask_weight: float = Field(2 / 8, ge=0)
    roll_mask_weight: float = Field(2 / 8, ge=0)
    unmask_weight: float = Field(4 / 8, ge=0)
    momentum: tuple[float, float] = Field((0.994, 1.0), description="EMA momentum, cosine over the run")
    mask_size: tuple[float, float] = Field((0.01, 0.075), description="side of the masked grid patches, warmed")
    mask_ratio: tuple[float, float] = Field((0.5, 0.9), description="fraction of patches masked, warmed")
    mask_warmup_frac: float = Field(0.05, ge=0, le=1)
    mask_jitter: float | None = Field(0.0005, description="sigma of N(0, s) added to masked coordinates (grid / 2)")
    match_radius: float = Field(0.002, gt=0, description="max distance of matched points between views (2 * grid)")


def warm(step: int, total: int, start: float, end: float, warmup_frac: float) -> float:
    """Cosine from `start` to `end` over the first `warmup_frac` of the steps, then `end`."""
    n = int(total * warmup_frac)
    if n <= 0 or step >= n:
        return end
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * step / n))


def cosine(step: int, total: int, start: float, end: float) -> float:
    """Cosine from `start` (step 0) to `end` (last step)."""
    t = min(step / max(total - 1, 1), 1.0)
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * t))


class ProtoHead(nn.Module):
    """MLP -> L2-normalised embedding -> cosine similarity to each prototype (weight norm, gain fixed at 1)."""

    def __init__(self, cin: int, hidden: int, embed: int, prototypes: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(cin, hidden), nn.GELU(), nn.Linear(hidden, embed))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.prototype = nn.utils.parametrizations.weight_norm(nn.Linear(embed, prototypes, bias=False))
        self.prototype.parametrizations.weight.original0.data.fill_(1.0)
        self.prototype.parametrizations.weight.original0.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.prototype(F.normalize(self.mlp(x), dim=-1, eps=1e-6))


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@torch.no_grad()
def sinkhorn_knopp(scores: torch.Tensor, temp: float, iters: int = 3) -> torch.Tensor:
    """Soft assignments (n, K) whose rows sum to 1 and whose prototype columns share the mass equally, computed
    jointly over every worker's points (sums all-reduced): the teacher targets that prevent collapse."""
    # in place on the one (K, n) buffer that exp makes: the same operations in the same order as fresh tensors, so
    # the same numbers, without allocating (and page-faulting) a new (K, n) array for each of ~10 divisions
    q = (scores.float() - 1.0).div_(temp).exp_().t()  # sims <= 1: shifting by the max keeps exp finite
    k = q.shape[0]
    n = torch.tensor(float(q.shape[1]), device=q.device)
    total = q.sum()
    if _world() > 1:
        dist.all_reduce(n)
        dist.all_reduce(total)
    q.div_(total)
    for _ in range(iters):
        rows = q.sum(dim=1, keepdim=True)
        if _world() > 1:
            dist.all_reduce(rows)
        q.div_(rows.clamp_min(1e-30)).div_(k)
        q.div_(q.sum(dim=0, keepdim=True).clamp_min(1e-30)).div_(n)
    return q.mul_(n).t()


@torch.no_grad()
def grid_mask(
    coord: torch.Tensor,
    offset: torch.Tensor,
    size: float,
    ratio: float,
    gen: torch.Generator | None = None,
) -> torch.Tensor:
    """(N,) bool: cubes of side `size` (from each view's minimum corner) chosen at random, int(ratio * cubes) of
    them over the batch, have all their points masked."""
    batch = offset_to_batch(offset, len(coord))
    lo = coord.new_zeros(len(offset), 3).scatter_reduce(
        0, batch[:, None].expand(-1, 3), coord, "amin", include_self=False
    )
    cell = torch.floor((coord - lo[batch]) / size).long()
    span = int(cell.max()) + 1 if len(cell) else 1
    key = ((batch * span + cell[:, 0]) * span + cell[:, 1]) * span + cell[:, 2]
    unique, inverse = torch.unique(key, return_inverse=True)
    cells = len(unique)  # known on the host once unique returns
    chosen = torch.randperm(cells, generator=gen, device="cpu")[: int(cells * ratio)].to(coord.device)
    masked = torch.zeros(cells, dtype=torch.bool, device=coord.device)
    masked[chosen] = True
    return masked[inverse]


def level_mean(values: torch.Tensor, levels: list[Level], level: int) -> torch.Tensor:
    """Per-cell means of level-0 `values` carried up to `level` through the pooling maps (mean of member means)."""
    for s in range(1, level + 1):
        values = segment_mean(values, levels[s].parent_inverse, len(levels[s].coord))
    return values


def match(
    query: torch.Tensor,
    q_offset: torch.Tensor,
    ref: torch.Tensor,
    r_offset: torch.Tensor,
    radius: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(query rows, ref rows) of nearest-neighbour pairs closer than `radius`; query event i pairs with ref event i."""
    idx, d = knn(query.detach(), q_offset, ref.detach(), r_offset, 1)
    keep = (idx[:, 0] >= 0) & (d[:, 0] < radius)
    rows = torch.nonzero(keep).squeeze(1)
    return rows, idx[rows, 0]


class Encoded:
    """A view batch through a backbone at level `level`: features up-cast to it, per-cell origins, offsets, batch."""

    def __init__(self, levels: list[Level], level: int, origin0: torch.Tensor):
        self.feat = upcast(levels, level)
        self.origin = level_mean(origin0, levels, level)
        self.offset = levels[level].offset
        self.batch = levels[level].batch


class PandaStudent(nn.Module):
    """What trains: backbone, mask token and heads. One forward runs the masked globals and the locals."""

    def __init__(self, backbone_cfg: PTv3Config, cfg: PandaConfig, stems: dict[str, int] | None = None):
        """`stems`: {detector: input channels} for one stem per detector in front of the shared trunk
        (cross-experiment pretraining, models/stems.py); None: the backbone's own single stem."""
        super().__init__()
        if cfg.up_cast_level >= len(backbone_cfg.channels):
            raise ValueError(f"up_cast_level {cfg.up_cast_level} needs more than {len(backbone_cfg.channels)} stages")
        self.cfg = cfg
        self.backbone = PTv3(backbone_cfg)
        self.stems = dict(stems) if stems else None
        if self.stems:
            self.backbone.embedding = DetectorStems(self.stems, backbone_cfg.channels[0], backbone_cfg.sparse_conv)
        self.mask_token = nn.Parameter(torch.zeros(backbone_cfg.channels[0]))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        cin = sum(backbone_cfg.channels[cfg.up_cast_level :])
        head = (cin, cfg.head_hidden, cfg.head_embed, cfg.prototypes)
        self.mask_head = ProtoHead(*head) if cfg.mask_weight + cfg.roll_mask_weight > 0 else None
        self.unmask_head = ProtoHead(*head) if cfg.unmask_weight > 0 else None

    def encode(self, view: dict, mask: torch.Tensor | None = None) -> Encoded:
        feat = view["feat"]
        token = None
        if mask is not None:
            feat = feat.masked_fill(mask[:, None], 0.0)  # the stem must not see masked energies either
            token = self.mask_token
        levels = self.backbone(
            feat, view["coord"], view["grid_coord"], view["offset"], mask, token, view.get("geometry")
        )
        return Encoded(levels, self.cfg.up_cast_level, view["origin"])

    def forward(self, masked_global: dict, mask: torch.Tensor, local: dict | None):
        out = {}
        if self.mask_head is not None:
            enc = self.encode(masked_global, mask)
            out["global"] = (enc, self.mask_head(enc.feat))
        if self.unmask_head is not None and local is not None:
            enc = self.encode(local)
            out["local"] = (enc, self.unmask_head(enc.feat))
        return out


def make_teacher(student: PandaStudent, backbone_cfg: PTv3Config) -> PandaStudent:
    """The EMA teacher: the student's copy without drop path, never trained by gradients."""
    teacher = PandaStudent(backbone_cfg.model_copy(update={"drop_path": 0.0}), student.cfg, student.stems)
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- m * teacher + (1 - m) * student, parameter by parameter (buffers copied)."""
    t = [p for p in teacher.parameters()]
    s = [p.detach() for p in student.parameters()]
    torch._foreach_mul_(t, momentum)
    torch._foreach_add_(t, s, alpha=1 - momentum)


def _ce(target: torch.Tensor, sims: torch.Tensor, temp: float, batch: torch.Tensor, views: int) -> torch.Tensor:
    """Cross-entropy of student sims against soft targets, averaged per view, then over the views present."""
    per_point = (target * F.log_softmax(sims.float() / temp, dim=-1)).sum(-1).neg()  # negated per point, not per entry
    total = torch.zeros(views, device=sims.device).index_add(0, batch, per_point)
    count = torch.zeros(views, device=sims.device).index_add_(0, batch, torch.ones_like(per_point))
    present = count > 0  # masked, not indexed: nothing is read back from the device
    per_view = torch.where(present, total / count.clamp_min(1), 0.0)
    return per_view.sum() / present.sum().clamp_min(1)


def _view_counts(enc: Encoded) -> list[int]:
    """Rows per view, on the host: the level's offsets were read back once already (by its attention patches)."""
    ends = host_list(enc.offset)
    return [b - a for a, b in zip([0, *ends[:-1]], ends, strict=True)]


def _swap_views(enc: Encoded, n_views: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row order and offsets that swap global views 0 and 1 of every event (views are event-major)."""
    dev = enc.offset.device
    starts = torch.cat([enc.offset.new_zeros(1), enc.offset[:-1]])
    order = torch.arange(len(enc.offset), device=dev).view(-1, n_views).flip(1).reshape(-1)
    counts = (enc.offset - starts)[order]
    new_offset = torch.cumsum(counts, 0)
    n = len(enc.feat)  # the row count is known on the host: no view's bounds are read back
    view = torch.repeat_interleave(torch.arange(len(order), device=dev), counts, output_size=n)
    rows = starts[order][view] + torch.arange(n, device=dev) - (new_offset - counts)[view]
    host = _view_counts(enc)
    swapped = [host[e + n_views - 1 - v] for e in range(0, len(host), n_views) for v in range(n_views)]
    return rows, known_on_host(new_offset, list(itertools.accumulate(swapped)))


def panda_losses(
    student_out: dict,
    teacher_global: Encoded,
    teacher_sims: dict,
    cfg: PandaConfig,
    temp: float,
    n_global: int,
    n_local: int,
) -> dict:
    """The three losses and their weighted sum, plus monitors. `teacher_sims` holds the teacher's "mask" and
    "unmask" head outputs on the unmasked global views (encoded as `teacher_global`)."""
    out: dict = {"loss": 0.0}
    tg = teacher_global
    if "global" in student_out:
        enc, sims = student_out["global"]
        views = len(enc.offset)
        if cfg.mask_weight > 0:
            q, r = match(enc.origin, enc.offset, tg.origin, tg.offset, cfg.match_radius)
            target = sinkhorn_knopp(teacher_sims["mask"][r], temp, cfg.sinkhorn_iters)
            out["mask_loss"] = _ce(target, sims[q], cfg.student_temp, enc.batch[q], views)
            out["loss"] = out["loss"] + cfg.mask_weight * out["mask_loss"]
            out["mask_matched"] = len(q) / max(len(enc.origin), 1)
        if cfg.roll_mask_weight > 0 and n_global > 1:
            rows, offs = _swap_views(tg, n_global)
            q, r = match(enc.origin, enc.offset, tg.origin[rows], offs, cfg.match_radius)
            target = sinkhorn_knopp(teacher_sims["mask"][rows[r]], temp, cfg.sinkhorn_iters)  # one gather of the rows
            out["roll_mask_loss"] = _ce(target, sims[q], cfg.student_temp, enc.batch[q], views)
            out["loss"] = out["loss"] + cfg.roll_mask_weight * out["roll_mask_loss"]
            out["roll_matched"] = len(q) / max(len(enc.origin), 1)
    if "local" in student_out:
        enc, sims = student_out["local"]
        p_rows = teacher_sims.get("principal_rows")
        if p_rows is None:
            p_rows = principal_rows(tg, n_global)
            principal_sims = teacher_sims["unmask"][p_rows]
        else:  # `teacher_forward` ran the unmask head on these rows only
            principal_sims = teacher_sims["unmask"]
        p_offset = batch_to_offset(tg.batch[p_rows] // n_global, len(tg.offset) // n_global)
        known_on_host(p_offset, list(itertools.accumulate(_view_counts(tg)[::n_global])))
        q_offset = enc.offset[n_local - 1 :: n_local]  # an event's local views together query its principal view
        known_on_host(q_offset, host_list(enc.offset)[n_local - 1 :: n_local])
        q, r = match(enc.origin, q_offset, tg.origin[p_rows], p_offset, cfg.match_radius)
        target = sinkhorn_knopp(principal_sims[r], temp, cfg.sinkhorn_iters)
        out["unmask_loss"] = _ce(target, sims[q], cfg.student_temp, enc.batch[q], len(enc.offset))
        out["loss"] = out["loss"] + cfg.unmask_weight * out["unmask_loss"]
        out["unmask_matched"] = len(q) / max(len(enc.origin), 1)
    return out


@torch.no_grad()
def collapse_monitors(teacher_sims: torch.Tensor, feat: torch.Tensor) -> dict:
    """Prototype usage of hard assignments argmax(sims) (fraction of prototypes used, perplexity = exp(entropy) of
    their histogram; over all workers) and the std over points of the L2-normalised features (0 when collapsed)."""
    k = teacher_sims.shape[1]
    hist = torch.bincount(teacher_sims.argmax(1), minlength=k).float()
    if _world() > 1:
        dist.all_reduce(hist)
    p = hist / hist.sum().clamp_min(1)
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    f = F.normalize(feat.float(), dim=-1)
    return {
        "proto_used_frac": float((hist > 0).float().mean()),
        "proto_perplexity": float(entropy.exp()),
        "feat_std": float(f.std(0).mean()) if len(f) > 1 else 0.0,
    }


def principal_rows(enc: Encoded, n_global: int) -> torch.Tensor:
    """Rows of each event's principal (first) global view in an event-major batch of `n_global` views per event;
    their count is known on the host, so no mask is read back."""
    dev = enc.offset.device
    starts = torch.cat([enc.offset.new_zeros(1), enc.offset[:-1]])[::n_global]
    counts = (enc.offset[::n_global] - starts).contiguous()
    n = sum(_view_counts(enc)[::n_global])
    view = torch.repeat_interleave(torch.arange(len(counts), device=dev), counts, output_size=n)
    return starts[view] + torch.arange(n, device=dev) - (torch.cumsum(counts, 0) - counts)[view]


def teacher_forward(teacher: PandaStudent, global_view: dict, n_global: int | None = None) -> tuple[Encoded, dict]:
    """The teacher on the unmasked global views: (encoded, {"mask": sims, "unmask": sims}). Given `n_global`
    (views per event) and a mask head beside the unmask head, the unmask head runs on the principal views' rows
    only, the only ones its targets use (`principal_rows` says which; the collapse monitors read the mask head's):
    a quarter less teacher head arithmetic, the same numbers on those rows."""
    with torch.no_grad():
        enc = teacher.encode(global_view)
        sims = {}
        if teacher.mask_head is not None:
            sims["mask"] = teacher.mask_head(enc.feat)
        if teacher.unmask_head is not None:
            if n_global is not None and teacher.mask_head is not None:
                sims["principal_rows"] = principal_rows(enc, n_global)
                sims["unmask"] = teacher.unmask_head(enc.feat[sims["principal_rows"]])
            else:
                sims["unmask"] = teacher.unmask_head(enc.feat)
    return enc, sims
