"""`raysvc bench launches`' counter: device ops and syncs by phase, views left out, the device path replayed."""

from __future__ import annotations

import pytest
import torch

from raysvc.bench.launches import LaunchCounter
from raysvc.ops import paths


def test_counter_counts_device_ops_and_syncs_by_phase_and_leaves_out_views_and_host_ops():
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 2)
    x = torch.randn(5, 3)
    counter = LaunchCounter([lin])
    with counter:
        host = x * 2  # on the host: not a device op
        xd = host.to("cpu")  # the replay's device: one host-to-device copy
        y = lin(xd)  # addmm (the transposed weight is a view)
        picked = (y[:, 0] > 0).nonzero()  # gt, and nonzero: a sync
        loss = y.sum() + picked.numel()
        loss.backward()
        loss.item()  # after backward: the optimizer phase, a sync
        assert paths._replay  # CPU tensors take the device path inside the counter
    s = counter.summary()
    assert s["host_ops"] == 1
    assert s["device_ops_by_phase"]["inputs"] == 1
    # addmm, gt, nonzero, sum, add, and the ones of backward()'s seed gradient (made before the engine runs a node)
    assert s["device_ops_by_phase"]["forward"] == 6
    assert s["device_ops_by_phase"]["backward"] > 0
    assert s["syncs_by_phase"] == {"inputs": 0, "forward": 1, "backward": 0, "optimizer": 1}
    assert s["top_syncs"] == {"nonzero": 1, "_local_scalar_dense": 1}
    assert not paths._replay


def test_host_list_reads_a_device_tensor_back_once_per_version():
    from raysvc.ops.packed import host_list, known_on_host

    t = torch.arange(4)
    counter = LaunchCounter([t])
    with counter:
        assert host_list(t) == [0, 1, 2, 3]
        assert host_list(t) == [0, 1, 2, 3]  # the level's patches read it; the neighbour search does not again
        t.add_(1)
        assert host_list(t) == [1, 2, 3, 4]  # changed in place: read again
        u = known_on_host(t * 2, [2, 4, 6, 8])
        assert host_list(u) == [2, 4, 6, 8]
    assert counter.summary()["top_syncs"] == {"tolist": 2}


@pytest.mark.parametrize(("task", "ops", "syncs"), [("panda", 3000, 20), ("seg", None, 10)])
def test_tiny_training_steps_stay_within_the_launch_targets(tmp_path, task, ops, syncs):
    """The GPU step's targets, counted as `raysvc bench launches` counts them (the worst of three serialization
    draws): Panda tiny at most 3,000 device ops and 20 syncs; segmentation tiny at most 10 syncs (its 1,200-op
    target is not met yet)."""
    from raysvc.bench.launches import TASKS, count_step
    from raysvc.bench.train import generate_bench_data

    torch.set_num_threads(1)
    generate_bench_data(tmp_path, 16, lambda *_: None)
    step, objects = TASKS[task](tmp_path, "tiny", 2, 1)
    got = count_step(step, objects)
    assert got["syncs"] <= syncs, got["top_syncs"]
    if ops is not None:
        assert got["device_ops"] <= ops, got["top_ops"]
