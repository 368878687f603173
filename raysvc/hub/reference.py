"""The reference PTv3 (Sonata's `PointTransformerV3`, pimm's registered "PT-v3m2") <-> our `PTv3`: configs and
weights, both ways (docs/reference-ptv3.md has the table).

A reference config (its constructor kwargs) becomes the overrides of our "ptv3" architecture that build the same
network in reference mode: linear stem, one serialization depth per batch, the reference's grid pooling and patching.
Reference keys are the bare model's (`embedding.stem.linear.weight`, `enc.enc1.block0.cpe.0.weight`, ...); prefixes
such as `module.` or `student.backbone.` are the caller's to strip. Tensors keep their layout: the submanifold conv
kernels are spconv 2.x's (Cout, 3, 3, 3, Cin) on both sides, and qkv is [q | k | v] with heads contiguous on both.
A decoder (reference `enc_mode=False`) maps to our segmentation model's `decoder.` keys.
"""

from __future__ import annotations

import re

import torch

from raysvc.models.ptv3 import Decoder, PTv3, PTv3Config
from raysvc.ops.serialization import ORDERS

REGISTRY_TYPE = "PT-v3m2"


class KeyMismatch(ValueError):
    """Source keys that map to no model weight (`unmapped`) and model weights that no source key fills (`missing`)."""

    def __init__(self, unmapped: list[str], missing: list[str], what: str = "reference weights"):
        self.unmapped, self.missing = sorted(unmapped), sorted(missing)
        parts = []
        if self.unmapped:
            parts.append(f"{len(self.unmapped)} key(s) that map to no weight of the model: {_listing(self.unmapped)}")
        if self.missing:
            parts.append(f"{len(self.missing)} model weight(s) left without a value: {_listing(self.missing)}")
        super().__init__(f"{what} do not fit the model: " + "; ".join(parts))


def _listing(keys: list[str], limit: int = 20) -> str:
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


# ---- configs ------------------------------------------------------------------------------------------------

# reference kwargs that have to hold one value here (ours has no other), with that value
_FIXED = {
    "pre_norm": True,
    "enable_rpe": False,
    "attn_drop": 0.0,
    "proj_drop": 0.0,
    # pimm-only switches
    "enable_cpe": True,
    "full_attention": False,
    "cpe_first_layer_only": False,
    "cpe_shared_weight": False,
    "embedding_act_layer": True,
    "add_iso_features": False,
}
# reference kwargs that change nothing this model computes in eval: the attention kernel and its precision (ours
# follows the flash path's patching in float32), bookkeeping of the pooling tree, freezing (a fine-tuning choice)
_IGNORED = {
    "enable_flash",
    "flash_backend",
    "upcast_attention",
    "upcast_softmax",
    "traceable",
    "freeze_encoder",
    "iso_k",
    "iso_r",
}
_MAPPED = {
    "type",
    "in_channels",
    "order",
    "stride",
    "enc_depths",
    "enc_channels",
    "enc_num_head",
    "enc_patch_size",
    "dec_depths",
    "dec_channels",
    "dec_num_head",
    "dec_patch_size",
    "mlp_ratio",
    "qkv_bias",
    "qk_scale",
    "drop_path",
    "layer_scale",
    "shuffle_orders",
    "mask_token",
    "enc_mode",
}
# the reference constructor's defaults where a config leaves a field out (Sonata's and pimm's agree on these)
_DEFAULTS = {
    "in_channels": 6,
    "order": ("z", "z-trans"),
    "stride": (2, 2, 2, 2),
    "mlp_ratio": 4,
    "qkv_bias": True,
    "qk_scale": None,
    "drop_path": 0.3,
    "layer_scale": None,
    "shuffle_orders": True,
    "mask_token": False,
    "enc_mode": False,
}


def _same(a, b) -> bool:
    return a == b or (isinstance(a, (int, float)) and isinstance(b, (int, float)) and float(a) == float(b))


def config_from_reference(kwargs: dict) -> dict:
    """Reference `PointTransformerV3(**kwargs)` (Sonata) or a "PT-v3m2" registry config (pimm, with `type`) -> the
    overrides of our "ptv3" config that build the same network in reference mode (one curve depth per batch).
    Unknown kwargs, and values this model cannot reproduce, are a ValueError listing them all."""
    if not isinstance(kwargs, dict):
        raise ValueError(f"a reference config is a dict of PointTransformerV3 kwargs, got {type(kwargs).__name__}")
    unknown = sorted(k for k in kwargs if k not in _MAPPED | _IGNORED | set(_FIXED))
    problems = [f"unknown key {k!r}" for k in unknown]
    if "type" in kwargs and kwargs["type"] != REGISTRY_TYPE:
        problems.append(f"type={kwargs['type']!r} (only {REGISTRY_TYPE!r} maps onto this PTv3)")
    for k, want in _FIXED.items():
        if k in kwargs and not _same(kwargs[k], want):
            problems.append(f"{k}={kwargs[k]!r} (only {want!r} is supported)")
    if "enc_depths" not in kwargs or "enc_channels" not in kwargs or "enc_num_head" not in kwargs:
        problems.append("enc_depths, enc_channels and enc_num_head are required (the defaults differ between releases)")
    if problems:
        raise ValueError("reference config not supported: " + "; ".join(problems))
    kw = {**_DEFAULTS, **kwargs}

    depths, channels, heads = (tuple(int(v) for v in kw[k]) for k in ("enc_depths", "enc_channels", "enc_num_head"))
    n = len(depths)
    order = kw["order"]
    orders = (order,) if isinstance(order, str) else tuple(order)
    bad_orders = [o for o in orders if o not in ORDERS]
    patch = _uniform("enc_patch_size", kw.get("enc_patch_size", (48,) * n))
    out = dict(
        in_channels=int(kw["in_channels"]),
        depths=depths,
        channels=channels,
        heads=heads,
        patch_size=patch,
        orders=orders,
        shuffle_orders=bool(kw["shuffle_orders"]),
        mlp_ratio=float(kw["mlp_ratio"]),
        layer_scale=None if kw["layer_scale"] is None else float(kw["layer_scale"]),
        drop_path=float(kw["drop_path"]),
        stem="linear",
        mask_token=bool(kw["mask_token"]),
        stride=None if all(int(v) == 2 for v in kw["stride"]) else tuple(int(v) for v in kw["stride"]),
        qkv_bias=bool(kw["qkv_bias"]),
        qk_scale=None if kw["qk_scale"] is None else float(kw["qk_scale"]),
        serialization_depth="batch",
    )
    if bad_orders:
        raise ValueError(f"reference config not supported: order {bad_orders} (known: {ORDERS})")
    has_decoder = not kw["enc_mode"]
    if has_decoder:
        for k in ("dec_depths", "dec_channels", "dec_num_head"):
            if k not in kwargs:
                raise ValueError(f"reference config not supported: enc_mode=False needs {k} (release defaults differ)")
        dec_patch = _uniform("dec_patch_size", kw.get("dec_patch_size", (patch,) * (n - 1)))
        if dec_patch != patch:
            raise ValueError(
                f"reference config not supported: dec_patch_size {dec_patch} != enc_patch_size {patch} "
                "(one patch size here)"
            )
    if has_decoder or all(k in kwargs for k in ("dec_depths", "dec_channels", "dec_num_head")):
        out.update(
            dec_depths=tuple(int(v) for v in kw["dec_depths"]),
            dec_channels=tuple(int(v) for v in kw["dec_channels"]),
            dec_heads=tuple(int(v) for v in kw["dec_num_head"]),
        )
    if not has_decoder and "dec_depths" in out and len(out["dec_depths"]) != n - 1:
        for k in ("dec_depths", "dec_channels", "dec_heads"):  # an encoder-only config with stray decoder fields
            out.pop(k)
    PTv3Config(**out)  # shapes that do not fit each other fail here, naming the field
    return out


def _uniform(name: str, values) -> int:
    vals = {int(v) for v in ((values,) if isinstance(values, int) else values)}
    if len(vals) != 1:
        raise ValueError(
            f"reference config not supported: {name} {tuple(values)} (one patch size for every stage here)"
        )
    return vals.pop()


def config_to_reference(cfg: PTv3Config, decoder: bool = False) -> dict:
    """Our config -> PT-v3m2 registry kwargs (with `type`) that build the same network; `decoder`: with our
    segmentation decoder (reference `enc_mode=False`). Only the linear stem exists there."""
    if cfg.stem != "linear":
        raise ValueError(
            f"stem={cfg.stem!r} has no PT-v3m2 equivalent (its stem is linear); only a model built with "
            "stem='linear' can be exported to the reference layout"
        )
    n = len(cfg.depths)
    kw = dict(
        type=REGISTRY_TYPE,
        in_channels=cfg.in_channels,
        order=list(cfg.orders),
        stride=list(cfg.stride or (2,) * (n - 1)),
        enc_depths=list(cfg.depths),
        enc_channels=list(cfg.channels),
        enc_num_head=list(cfg.heads),
        enc_patch_size=[cfg.patch_size] * n,
        dec_depths=list(cfg.dec_depths),
        dec_channels=list(cfg.dec_channels),
        dec_num_head=list(cfg.dec_heads),
        dec_patch_size=[cfg.patch_size] * (n - 1),
        mlp_ratio=cfg.mlp_ratio,
        qkv_bias=cfg.qkv_bias,
        qk_scale=cfg.qk_scale,
        attn_drop=0.0,
        proj_drop=0.0,
        drop_path=cfg.drop_path,
        layer_scale=cfg.layer_scale,
        pre_norm=True,
        shuffle_orders=cfg.shuffle_orders,
        enable_rpe=False,
        enable_flash=True,
        upcast_attention=False,
        upcast_softmax=False,
        traceable=True,
        mask_token=cfg.mask_token,
        enc_mode=not decoder,
    )
    return kw


# ---- weights ------------------------------------------------------------------------------------------------

# inside a block: reference sub-key <-> ours
_BLOCK = [
    ("cpe.0.", "cpe.conv."),
    ("cpe.1.", "cpe.linear."),
    ("cpe.2.", "cpe.norm."),
    ("norm1.0.", "norm1."),
    ("norm2.0.", "norm2."),
    ("ls1.0.", "ls1."),
    ("ls2.0.", "ls2."),
    ("mlp.0.", "mlp."),
    ("attn.", "attn."),
]
# whole keys: reference template <-> ours; {s} stage and {i} block are numbers, {b} a block's sub-key (translated by
# _BLOCK), {r} the rest (kept); a key whose translation is not a weight of the model counts as unmapped
_RULES = [
    ("embedding.{r}", "embedding.{r}"),
    ("enc.enc{s}.down.proj.{r}", "enc.{s}.down.proj.{r}"),
    ("enc.enc{s}.down.norm.0.{r}", "enc.{s}.down.norm.{r}"),
    ("enc.enc{s}.block{i}.{b}", "enc.{s}.blocks.{i}.{b}"),
    ("dec.dec{s}.up.{r}", "decoder.dec.{s}.up.{r}"),
    ("dec.dec{s}.block{i}.{b}", "decoder.dec.{s}.blocks.{i}.{b}"),
]


def _regex(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w)\}", template)
    return re.compile(
        "".join(
            (rf"(?P<{p}>\d+)" if p in "si" else rf"(?P<{p}>.+)") if j % 2 else re.escape(p) for j, p in enumerate(parts)
        )
    )


_FORWARD = [(_regex(ref), ours) for ref, ours in _RULES]
_BACKWARD = [(_regex(ours), ref) for ref, ours in _RULES]


def _block_key(sub: str, to_ours: bool) -> str | None:
    for ref, ours in _BLOCK:
        src, dst = (ref, ours) if to_ours else (ours, ref)
        if sub.startswith(src):
            return dst + sub[len(src) :]
    return None


def _translate(key: str, to_ours: bool) -> str | None:
    for rx, tpl in _FORWARD if to_ours else _BACKWARD:
        m = rx.fullmatch(key)
        if m is None:
            continue
        fields = m.groupdict()
        if "b" in fields:
            fields["b"] = _block_key(fields["b"], to_ours)
            if fields["b"] is None:
                return None
        return tpl.format(**fields)
    return None


def reference_key(key: str) -> str | None:
    """Our parameter name -> the reference's (None where there is none)."""
    return _translate(key, to_ours=False)


def our_key(key: str) -> str | None:
    """A reference parameter name -> ours (None where there is none)."""
    return _translate(key, to_ours=True)


def _model_shapes(cfg: PTv3Config, decoder: bool) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of our PTv3 (+ the segmentation decoder under `decoder.`), built without memory."""
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in PTv3(cfg).state_dict().items()}
        if decoder:
            shapes.update({"decoder." + k: tuple(v.shape) for k, v in Decoder(cfg).state_dict().items()})
    return shapes


def _convert(sd: dict[str, torch.Tensor], cfg: PTv3Config, to_ours: bool) -> dict[str, torch.Tensor]:
    if cfg.stem != "linear":
        raise ValueError(f"the reference layout has a linear stem; this config has stem={cfg.stem!r}")
    has_decoder = any(k.startswith("dec." if to_ours else "decoder.") for k in sd)
    shapes = _model_shapes(cfg, has_decoder)
    target_shapes = shapes if to_ours else {reference_key(k): s for k, s in shapes.items()}
    out, unmapped = {}, []
    for key, value in sd.items():
        new = _translate(key, to_ours)
        if new is None or new not in target_shapes:
            unmapped.append(key)
            continue
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"weight {key!r} is a {type(value).__name__}, not a tensor")
        if tuple(value.shape) != target_shapes[new]:
            raise ValueError(
                f"weight {key!r} has shape {tuple(value.shape)} but the model's {new!r} needs {target_shapes[new]}"
            )
        out[new] = value
    missing = [k for k in target_shapes if k not in out]
    if unmapped or missing:
        raise KeyMismatch(unmapped, missing, "reference weights" if to_ours else "raysvc weights")
    return out


def state_from_reference(sd: dict[str, torch.Tensor], cfg: PTv3Config) -> dict[str, torch.Tensor]:
    """Reference (bare PT-v3m2 / Sonata) weights -> our PTv3 state dict (decoder weights, if any, under `decoder.`,
    as our segmentation model names them). Keys that do not map or model weights left without one: KeyMismatch;
    a shape that differs: ValueError naming the key and both shapes."""
    return _convert(sd, cfg, to_ours=True)


def state_to_reference(sd: dict[str, torch.Tensor], cfg: PTv3Config) -> dict[str, torch.Tensor]:
    """The inverse of `state_from_reference`: our PTv3 state dict (optionally with `decoder.` keys) -> reference
    keys."""
    return _convert(sd, cfg, to_ours=False)
