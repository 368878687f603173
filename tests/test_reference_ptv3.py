"""Our PTv3 in reference mode against the reference implementation (Sonata's PointTransformerV3, run once by
tests/fixtures/reference/make_golden.py): configs and weights map both ways, and every encoder stage, the masked
embedding and the decoder give the reference's numbers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from raysvc.hub.encode import encode
from raysvc.hub.reference import (
    KeyMismatch,
    config_from_reference,
    config_to_reference,
    state_from_reference,
    state_to_reference,
)
from raysvc.models.heads import SegModel
from raysvc.models.ptv3 import PTv3, PTv3Config, count_parameters, preset
from raysvc.ops.paths import device_path

FIXTURES = Path(__file__).parent / "fixtures" / "reference"
FIELDS = ("coord", "grid_coord", "feat", "offset")
RTOL = 1e-4  # relative to the stage's largest feature


@pytest.fixture(scope="module")
def golden():
    return dict(np.load(FIXTURES / "golden.npz"))


def _checkpoint(name: str = "sonata_tiny.pth") -> dict:
    return torch.load(FIXTURES / name, weights_only=True)


def _model(ckpt: dict, **change) -> PTv3:
    cfg = PTv3Config(**{**config_from_reference(ckpt["config"]), **change})
    model = PTv3(cfg)
    model.load_state_dict(state_from_reference(ckpt["state_dict"], cfg), strict=True)
    return model


def _close(ours: np.ndarray, ref: np.ndarray) -> float:
    assert ours.shape == ref.shape
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("b", [0, 1, 2])
def test_every_encoder_stage_equals_the_reference(golden, b):
    """Batch 0: four events in one batch (one serialization depth for all, an event smaller than the patch);
    batches 1 and 2: one event of exactly 16 patches, one of 203 points."""
    model = _model(_checkpoint())
    stages = encode(model, {k: golden[f"b{b}_{k}"] for k in FIELDS})
    assert len(stages) == 5
    for s, st in enumerate(stages):
        np.testing.assert_array_equal(st["grid_coord"], golden[f"b{b}_s{s}_grid_coord"], err_msg=f"stage {s}")
        np.testing.assert_array_equal(st["offset"], golden[f"b{b}_s{s}_offset"], err_msg=f"stage {s}")
        assert _close(st["feat"], golden[f"b{b}_s{s}_feat"]) < RTOL, f"stage {s}"


def test_the_device_path_equals_the_reference_too(golden):
    """What a GPU runs (serialization depths as tensors, gather-GEMM conv), replayed on the CPU."""
    model = _model(_checkpoint())
    with device_path():
        stages = encode(model, {k: golden[f"b0_{k}"] for k in FIELDS})
    for s, st in enumerate(stages):
        np.testing.assert_array_equal(st["grid_coord"], golden[f"b0_s{s}_grid_coord"], err_msg=f"stage {s}")
        assert _close(st["feat"], golden[f"b0_s{s}_feat"]) < RTOL, f"stage {s}"


def test_encode_takes_a_model_holding_the_backbone_and_leaves_its_mode(golden):
    ckpt = _checkpoint()
    seg = SegModel(PTv3Config(**config_from_reference(ckpt["config"])), 3, "lin")
    seg.backbone.load_state_dict(state_from_reference(ckpt["state_dict"], seg.backbone.cfg))
    seg.train()
    stages = encode(seg, {k: golden[f"b0_{k}"] for k in FIELDS})
    assert seg.backbone.training
    assert _close(stages[-1]["feat"], golden["b0_s4_feat"]) < RTOL


def test_masked_points_take_the_embeddings_mask_token(golden):
    model = _model(_checkpoint()).eval()
    t = {k: torch.from_numpy(golden[f"b0_{k}"]) for k in FIELDS}
    with torch.no_grad():
        levels = model(t["feat"], t["coord"], t["grid_coord"], t["offset"], mask=torch.from_numpy(golden["mask_b0"]))
    for s, lv in enumerate(levels):
        assert _close(lv.feat.numpy(), golden[f"mask_b0_s{s}_feat"]) < RTOL, f"stage {s}"
    assert _close(lv.feat.numpy(), golden["b0_s4_feat"]) > 1e-2  # the mask changes the answer


def test_decoder_equals_the_reference(golden):
    ckpt = _checkpoint("sonata_tiny_dec.pth")
    cfg = PTv3Config(**config_from_reference(ckpt["config"]))
    state = state_from_reference(ckpt["state_dict"], cfg)
    seg = SegModel(cfg, 3, "dec").eval()
    own = {("backbone." + k if not k.startswith("decoder.") else k): v for k, v in state.items()}
    missing, unexpected = seg.load_state_dict(own, strict=False)
    assert not unexpected and sorted(missing) == ["head.bias", "head.weight"]
    t = {k: torch.from_numpy(golden[f"b0_{k}"]) for k in FIELDS}
    with torch.no_grad():
        out = seg.head_input(t["feat"], t["coord"], t["grid_coord"], t["offset"])
    assert _close(out.numpy(), golden["dec_b0_feat"]) < RTOL


def test_serialization_depth_per_event_is_a_different_network_on_a_mixed_batch(golden):
    """The fixture would notice the depth rule: per event, batch 0 (events of different extents) differs."""
    model = _model(_checkpoint(), serialization_depth="event")
    stages = encode(model, {k: golden[f"b0_{k}"] for k in FIELDS})
    assert max(_close(st["feat"], golden[f"b0_s{s}_feat"]) for s, st in enumerate(stages)) > 1e-3


@pytest.mark.parametrize("name", ["sonata_tiny.pth", "sonata_tiny_dec.pth"])
def test_weights_and_config_round_trip_exactly(name):
    ckpt = _checkpoint(name)
    cfg = PTv3Config(**config_from_reference(ckpt["config"]))
    ours = state_from_reference(ckpt["state_dict"], cfg)
    back = state_to_reference(ours, cfg)
    assert back.keys() == ckpt["state_dict"].keys()
    assert all(torch.equal(back[k], v) for k, v in ckpt["state_dict"].items())
    exported = config_to_reference(cfg, decoder="dec" in name)
    assert PTv3Config(**config_from_reference(exported)) == cfg
    assert exported["type"] == "PT-v3m2" and exported["enc_mode"] == ("dec" not in name)


def test_keys_that_do_not_map_and_weights_left_empty_are_listed():
    ckpt = _checkpoint()
    cfg = PTv3Config(**config_from_reference(ckpt["config"]))
    sd = dict(ckpt["state_dict"])
    gone = sd.pop("enc.enc2.block0.cpe.0.weight")
    with pytest.raises(KeyMismatch) as err:
        state_from_reference(sd, cfg)
    assert err.value.missing == ["enc.2.blocks.0.cpe.conv.weight"] and not err.value.unmapped
    assert "enc.2.blocks.0.cpe.conv.weight" in str(err.value)
    sd["enc.enc2.block0.cpe.0.weight"] = gone
    sd["seg_head.weight"] = torch.zeros(3)
    sd["enc.enc2.block0.attn.rpe.rpe_table"] = torch.zeros(3)
    with pytest.raises(KeyMismatch) as err:
        state_from_reference(sd, cfg)
    assert err.value.unmapped == ["enc.enc2.block0.attn.rpe.rpe_table", "seg_head.weight"] and not err.value.missing
    sd.pop("seg_head.weight"), sd.pop("enc.enc2.block0.attn.rpe.rpe_table")
    sd["enc.enc1.down.proj.weight"] = torch.zeros(8, 9)
    with pytest.raises(ValueError, match=r"enc\.enc1\.down\.proj\.weight.*\(8, 9\).*\(8, 8\)"):
        state_from_reference(sd, cfg)


def test_configs_the_model_cannot_reproduce_are_refused_with_every_reason():
    kwargs = _checkpoint()["config"]
    with pytest.raises(ValueError, match=r"unknown key 'foo'.*enable_rpe=True.*only False"):
        config_from_reference({**kwargs, "foo": 1, "enable_rpe": True})
    with pytest.raises(ValueError, match="'PT-v3m1'"):
        config_from_reference({**kwargs, "type": "PT-v3m1"})
    with pytest.raises(ValueError, match="enc_patch_size"):
        config_from_reference({**kwargs, "enc_patch_size": (16, 16, 16, 16, 32)})
    with pytest.raises(ValueError, match="stem"):
        config_to_reference(preset("tiny"))


PANDA_BASE = dict(  # pimm's Panda pretraining backbone config (PT-v3m2)
    type="PT-v3m2",
    in_channels=4,
    order=("hilbert", "hilbert-trans", "z", "z-trans"),
    stride=(2, 2, 2, 2),
    enc_depths=(3, 3, 3, 9, 3),
    enc_channels=(48, 96, 192, 384, 512),
    enc_num_head=(3, 6, 12, 24, 32),
    enc_patch_size=(256, 256, 256, 256, 256),
    mlp_ratio=4,
    qkv_bias=True,
    qk_scale=None,
    layer_scale=1e-5,
    attn_drop=0.0,
    proj_drop=0.0,
    drop_path=0.3,
    shuffle_orders=True,
    pre_norm=True,
    enable_rpe=False,
    enable_flash=True,
    upcast_attention=False,
    upcast_softmax=False,
    traceable=True,
    enc_mode=True,
    mask_token=True,
    cpe_first_layer_only=False,
    cpe_shared_weight=False,
)


def test_base_preset_is_panda_base():
    """Published: 90.8M. The preset leaves the 48-value mask token to the Panda pretraining model."""
    imported = PTv3Config(**config_from_reference(PANDA_BASE))
    assert imported == preset("base", mask_token=True, serialization_depth="batch")
    with torch.device("meta"):
        assert count_parameters(PTv3(preset("base"))) == 90_758_784
        assert count_parameters(PTv3(imported)) == 90_758_832
        assert count_parameters(PTv3(preset("sonata"))) == 108_461_376


def test_encode_names_bad_input(golden):
    model = _model(_checkpoint())
    pts = {k: golden[f"b1_{k}"] for k in FIELDS}
    with pytest.raises(ValueError, match="offset"):
        encode(model, {**pts, "offset": np.array([100, 90, 256])})
    with pytest.raises(ValueError, match=r"feat.*\(256, 4\)"):
        encode(model, {**pts, "feat": pts["feat"][:, :3]})
    with pytest.raises(ValueError, match="missing"):
        encode(model, {k: pts[k] for k in ("coord", "feat", "offset")})
