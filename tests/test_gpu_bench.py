"""`raysvc bench gpu` on the CPU: its checks run, pass, and fail when the op they check is broken."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from raysvc.bench import gpu

RAYSVC = str(Path(sys.executable).parent / "raysvc")
CPU = torch.device("cpu")


def test_sparse_conv_check_agrees_with_dense_conv3d_and_catches_a_lost_offset(monkeypatch):
    ok = gpu.check_sparse_conv(CPU)
    assert ok["sites"] > 500 and all(gpu.verdicts({"sparse_conv": ok}).values())

    real = gpu.kernel_map

    def lossy_map(grid, batch):  # one kernel offset never found: the output misses those neighbours
        nbr = real(grid, batch).clone()
        nbr[:, 0] = -1
        return nbr

    monkeypatch.setattr(gpu, "kernel_map", lossy_map)
    broken = gpu.check_sparse_conv(CPU)
    v = gpu.verdicts({"sparse_conv": broken})
    assert not v["sparse_conv.out_err"] and not v["sparse_conv.grad_feat_err"]


def test_attention_check_against_float64_catches_a_wrong_scale(monkeypatch):
    ok = gpu.check_attention(CPU)
    assert ok["sdpa_fp32_err"] < 1e-5 and gpu.verdicts({"attention": ok}) == {"attention.sdpa_fp32_err": True}
    real = gpu.patch_attention
    monkeypatch.setattr(
        gpu,
        "patch_attention",
        lambda qkv, patches, **kw: (
            real(qkv, patches, scale=0.2, **kw) if qkv.dtype == torch.float32 else real(qkv, patches, **kw)
        ),
    )
    assert gpu.verdicts({"attention": gpu.check_attention(CPU)}) == {"attention.sdpa_fp32_err": False}


def test_flash_kernel_check_runs_full_patches_unmasked_and_reports_a_refusal(monkeypatch):
    # the CPU flash kernel exists too: full patches under it match float64 to bf16 rounding
    ok = gpu.check_sdpa_flash_kernel(CPU, torch.Generator().manual_seed(0), 4, 16, 64)
    assert ok["sdpa_flash_kernel_runs"] and ok["sdpa_flash_kernel_bf16_err"] < 3e-2
    assert gpu.verdicts({"attention": ok})["attention.sdpa_flash_kernel_bf16_err"]

    # the CUDA flash kernel (bf16 only) refuses masks: a patch path that masks everything fails the check there
    def refuse_masks(q, *a, attn_mask=None, **kw):
        if attn_mask is not None and q.dtype == torch.bfloat16:
            raise RuntimeError("No available kernel. Aborting execution.")
        return real_sdpa(q, *a, attn_mask=attn_mask, **kw)

    real_sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", refuse_masks)
    monkeypatch.setattr(gpu, "make_patches", _all_short)
    bad = gpu.check_sdpa_flash_kernel(CPU, torch.Generator().manual_seed(0), 4, 16, 64)
    assert bad["sdpa_flash_kernel_runs"] is False
    assert gpu.verdicts({"attention": bad}) == {"attention.sdpa_flash_kernel_runs": False}


def _all_short(offset, size):
    """The patch layout with every patch sent down the masked path (as all patches were before the split)."""
    from raysvc.ops.attention import Patches
    from raysvc.ops.attention import make_patches as real

    p = real(offset, size)
    rows = torch.arange(len(p.index))
    return Patches(p.index, p.lengths, p.first, size, rows[:0], rows, p.lengths)


def test_polarmae_check_compares_device_and_cpu_losses_and_catches_a_changed_weight(monkeypatch, tmp_path):
    import copy
    from types import SimpleNamespace

    from raysvc.bench.train import _job, first_batches, generate_bench_data

    generate_bench_data(tmp_path, 4, log=lambda m: None)
    batches = first_batches(_job(tmp_path, tmp_path / "runs", "tiny", 3, 2, 1), 2)
    ok = gpu.time_polarmae(tmp_path, batches, CPU, 2, 1)
    assert ok["fp32_loss_err"] == 0.0 and ok["cpu_loss"] > 0 and ok["cpu_losses_finite"] and ok["cpu_step_s"] > 0
    assert all(gpu.verdicts({"polarmae_tiny": ok}).values())

    def shifted(model):  # a "device" copy whose point head is off by a little: its loss must differ
        model = copy.deepcopy(model)
        with torch.no_grad():
            model.point_head.bias.add_(0.05)
        return model

    monkeypatch.setattr(gpu, "copy", SimpleNamespace(deepcopy=shifted))
    broken = gpu.time_polarmae(tmp_path, batches, CPU, 2, 1)
    assert broken["fp32_loss_err"] > 1e-3 and not gpu.verdicts({"polarmae_tiny": broken})["polarmae_tiny.fp32_loss_err"]


def test_verdicts_apply_each_limit_and_skip_checks_that_did_not_run():
    result = {
        "model": {"fp32_logits_err": 2e-3, "fp32_argmax_agree": 1.0, "bf16_argmax_agree_fp32": 0.9},
        "neighbours": {"knn_equals_cpu": True, "codes_equal_cpu": {"z": True, "hilbert": False}},
        "panda_tiny": {"cpu_losses_finite": True},
        "polarmae_tiny": {"fp32_loss_err": 0.0, "bf16_loss_err_fp32": 0.08, "device_bf16_losses_finite": False},
    }
    assert gpu.verdicts(result) == {
        "model.fp32_logits_err": False,
        "model.fp32_argmax_agree": True,
        "model.bf16_argmax_agree_fp32": False,
        "neighbours.knn_equals_cpu": True,
        "panda_tiny.cpu_losses_finite": True,
        "polarmae_tiny.fp32_loss_err": True,
        "polarmae_tiny.bf16_loss_err_fp32": False,
        "polarmae_tiny.device_bf16_losses_finite": False,
        "neighbours.codes_equal_cpu.z": True,
        "neighbours.codes_equal_cpu.hilbert": False,
    }


@pytest.mark.slow
def test_cli_runs_every_check_and_timing_on_cpu_and_refuses_a_missing_gpu(tmp_path):
    out = tmp_path / "gpu.json"
    p = subprocess.run(
        [
            RAYSVC,
            "bench",
            "gpu",
            "--device",
            "cpu",
            "--events",
            "8",
            "--steps",
            "2",
            "--batch-events",
            "2",
            "--json",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["all_passed"] and r["checks"]["sparse_conv.out_err"] and r["checks"]["panda_tiny.cpu_losses_finite"]
    assert r["model"]["points"] > 1000 and r["model"]["fp32_logits_err"] == 0.0  # CPU against itself: bit-equal
    for key in ("seg_tiny", "seg_small", "panda_tiny", "polarmae_tiny"):
        assert r[key]["cpu_step_s"] > 0 and r[key]["events_per_step"] == 2
    assert r["checks"]["polarmae_tiny.cpu_losses_finite"] and r["polarmae_tiny"]["fp32_loss_err"] == 0.0
    assert "panda_base" not in r and r["settings"]["panda_base_events"] == 0  # the base model: on a GPU only
    if not torch.cuda.is_available():
        p = subprocess.run([RAYSVC, "bench", "gpu"], capture_output=True, text=True, timeout=120)
        assert p.returncode == 2 and "device 'cuda'" in p.stderr and "sees no CUDA device" in p.stderr, p.stderr


def test_panda_base_step_times_the_base_jobs_recipe_beside_the_a100_figure(tmp_path):
    """The Panda-Base timing runs the base job's recipe at the events asked for; on the CPU shrunk (the tiny model,
    small heads and views: the base recipe is for GPUs), in fp32, with no launch count (CUDA's alone)."""
    from raysvc.bench.train import generate_bench_data

    generate_bench_data(tmp_path, 8, lambda *_: None)
    small = ("model.size=tiny", "panda.head_hidden=64", "panda.prototypes=64", "views.max_points=300")
    r = gpu.time_panda_base(tmp_path, CPU, steps=2, warmup=0, batch_events=2, overrides=small)
    assert r["events_per_step"] == 2 and r["size"] == "tiny" and r["bf16"] is False
    assert r["losses_finite"] and r["step_s"] > 0 and r["ops_launched"] is None
    assert r["step_vs_a100_reference"] == r["step_s"] / 0.895
    assert gpu.verdicts({"panda_base": r}) == {"panda_base.losses_finite": True}
