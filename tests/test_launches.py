"""`raysvc bench launches`' counter: device ops and syncs by phase, views left out, the device path replayed."""

from __future__ import annotations

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
