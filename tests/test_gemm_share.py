"""bench/gemm_share: the share of a step's time in matrix multiplies, their GFLOP/s, and the same shapes alone."""

from __future__ import annotations

import pytest
import torch

from raysvc.bench.gemm_share import gemm_share


def test_the_multiplies_of_a_step_are_found_counted_and_timed_against_the_same_shapes_alone():
    torch.manual_seed(0)
    a, b = torch.randn(300, 200), torch.randn(200, 100)
    bias, a2, b2 = torch.randn(30), torch.randn(50, 40), torch.randn(40, 30)
    x, y = torch.randn(3, 20, 10), torch.randn(3, 10, 5)
    big = torch.randn(2_000_000)

    def step(i: int) -> None:
        torch.mm(a, b)
        torch.addmm(bias, a2, b2)
        torch.bmm(x, y)
        big.exp()  # time outside any multiply

    r = gemm_share(step, first=0, steps=3)
    # (m, n, k, calls over the 3 steps) of each multiply, the batched one as b*m rows
    assert sorted(r["top_gemm_shapes"]) == sorted([[300, 100, 200, 3], [50, 30, 40, 3], [60, 5, 10, 3]])
    assert 0 < r["gemm_share"] < 1 and r["step_s"] > 0
    assert r["gemm_gflops"] > 0 and r["top_gemm_gflops_in_step"] > 0 and r["top_gemm_gflops_alone"] > 0

    only_exp = gemm_share(lambda i: big.exp(), first=0, steps=2)
    assert only_exp["gemm_share"] == 0 and only_exp["top_gemm_shapes"] == []


@pytest.mark.slow
def test_profile_steps_times_and_profiles_the_tiny_segmentation_and_panda_steps(tmp_path):
    from raysvc.bench.train import profile_steps
    from raysvc.data.sources.synthetic import generate_dataset
    from raysvc.storage import resolve

    generate_dataset(resolve(str(tmp_path / "train")), 8, seed=5, shard_events=4, show_progress=False)
    generate_dataset(resolve(str(tmp_path / "val")), 2, seed=6, shard_events=2, show_progress=False)
    r = profile_steps(tmp_path, steps=2, warmup=1, log=lambda m: None)
    for task in ("seg", "panda"):
        p = r[f"{task}_tiny_profile"]
        assert r[f"{task}_tiny_s_per_step"] > 0 and 0.05 < p["gemm_share"] < 1 and p["gemm_share_of_timed_step"] > 0, (
            task
        )
        assert len(p["top_gemm_shapes"]) == 8 and all(m > 0 and n > 0 and k > 0 for m, n, k, _ in p["top_gemm_shapes"])
