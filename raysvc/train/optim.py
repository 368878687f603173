"""AdamW parameter groups with layer-wise lr decay over the PTv3 encoder (Panda pretraining and the fft protocol).

A parameter's depth: the stem 0, encoder blocks 1..n in order (a stage's grid pooling goes with its first block),
everything outside the encoder (heads, decoder, mask token) n + 1; in the PoLAr-MAE encoder, its patch and positional
embeddings 0 and its Transformer blocks 1..n. Its lr is lr x layer_decay^(n + 1 - depth), times `backbone_scale`
inside the encoder. Weight decay applies to matrices only (`decay` marks the groups a weight-decay
schedule updates); norms, biases and tokens are spared.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices


def encoder_depths(cfg) -> tuple[int, ...]:
    """Blocks per stage of a backbone config: PTv3's `depths`, or the one stage of a plain Transformer (`depth`)."""
    return tuple(cfg.depths) if hasattr(cfg, "depths") else (cfg.depth,)


def layer_id(name: str, depths: tuple[int, ...], prefix: str = "backbone.") -> int:
    if name.startswith((prefix + "embedding", prefix + "patch_embed", prefix + "pos_embed")):
        return 0
    if name.startswith(prefix + "transformer.blocks."):
        return int(name[len(prefix) :].split(".")[2]) + 1
    if name.startswith(prefix + "enc."):
        parts = name[len(prefix) :].split(".")
        stage = int(parts[1])
        block = int(parts[3]) if parts[2] == "blocks" else 0
        return sum(depths[:stage]) + block + 1
    return sum(depths) + 1


def param_groups(
    model: nn.Module,
    depths: tuple[int, ...],
    lr: float,
    layer_decay: float,
    weight_decay: float,
    backbone_scale: float = 1.0,
    prefix: str = "backbone.",
) -> list[dict]:
    """Groups of the trainable parameters of `model`, whose encoder sits under `prefix`."""
    top = sum(depths) + 1
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lid, decay = layer_id(name, depths, prefix), p.ndim > 1
        scale = layer_decay ** (top - lid) * (backbone_scale if lid < top else 1.0)
        g = groups.setdefault(
            (lid, decay),
            {"params": [], "lr": lr * scale, "decay": decay, "weight_decay": weight_decay if decay else 0.0},
        )
        g["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def adamw(params, lr: float, **kwargs) -> torch.optim.AdamW:
    """AdamW that updates each parameter group in one fused kernel (CUDA and CPU), else with foreach kernels: a fixed
    number of ops per group instead of ~10 per parameter, and no `item()` of each parameter's step counter (the
    unfused path reads them on the host every step)."""
    groups = list(params)
    first = groups[0]["params"][0] if isinstance(groups[0], dict) else groups[0]
    fused = first.device.type in _get_fused_kernels_supported_devices()
    return torch.optim.AdamW(groups, lr=lr, fused=fused, foreach=None if fused else True, **kwargs)
