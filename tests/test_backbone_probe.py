"""`raysvc probe`: a PTv3 token's feature is the mean over its group's real points (brute force); the CLI's per-point
probe of a random PTv3 (features by a Ray Data actor) is the online probe's figure for the same seeded encoder, and
the in-process path gives the same figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from raysvc.storage import resolve
from tests.conftest import Commands

RAYSVC = str(Path(sys.executable).parent / "raysvc")


def test_group_mean_averages_only_the_real_points_of_each_group():
    from raysvc.models.polarmae import preset, tokenize
    from raysvc.train.backbone_probe import group_mean

    g = torch.Generator().manual_seed(0)
    coord = torch.rand(300, 3, generator=g) * 0.05
    offset = torch.tensor([180, 300])
    feat = torch.randn(300, 7, generator=g, dtype=torch.float64)
    tokens = tokenize(coord, torch.rand(300, generator=g), offset, preset("tiny", radius=0.01, max_points=8))
    assert (tokens.sizes < 8).any() and (tokens.sizes == 8).any()  # padded and full groups both occur
    got = group_mean(feat, tokens.groups, tokens.sizes).numpy()
    want = np.stack([feat.numpy()[tokens.groups[t, : tokens.sizes[t]].numpy()].mean(0) for t in range(len(tokens))])
    np.testing.assert_allclose(got, want, rtol=1e-12)


@pytest.fixture(scope="module")
def val_data(tmp_path_factory):
    from raysvc.data.sources.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("probedata")
    generate_dataset(resolve(str(root / "val")), 12, seed=3, shard_events=6, show_progress=False)
    return root / "val"


def test_cli_probe_of_a_random_ptv3_matches_the_online_probe(val_data, tmp_path):
    from raysvc.data.contract.detectors import get_detector
    from raysvc.data.streaming.config import DataConfig
    from raysvc.data.streaming.pipeline import DirectStream
    from raysvc.inference.featurize import model_inputs
    from raysvc.models.ptv3 import PTv3, preset
    from raysvc.train.probe import ProbeConfig, run_probe
    from raysvc.train.tasks.panda import probe_batches

    def probe(name: str, *extra: str) -> None:
        args = ["probe", "--random", "ptv3", "--center-events", "--data", str(val_data), "--seed", "3"]
        commands.start(name, *args, "--train-events", "5", "--val-events", "5", "--out", str(out[name]), *extra)

    def result(name: str) -> dict:
        commands.finished(name)
        return json.loads(out[name].read_text())

    # the three runs (each its own private Ray) at once, beside the in-process reference: most of a run is starting
    out = {name: tmp_path / f"{name}.json" for name in ("probe", "local", "fit")}
    with Commands(tmp_path) as commands:
        probe("probe", "--actors", "1")
        probe("local", "--actors", "0")  # Ray tasks read, features in process
        probe("fit", "--actors", "0", "--fit-data", str(val_data))
        # the same seeded encoder through the online probe's own code path
        torch.manual_seed(3)
        backbone = PTv3(preset("tiny"))
        cfg = DataConfig(uri=str(val_data))
        train, val = probe_batches(DirectStream(cfg).tables(), 5, 5, "val")
        pre = cfg.preprocess  # as the stream resolved it against the dataset's detector
        cpu = torch.device("cpu")
        names = list(get_detector("lartpc").class_names)
        want = run_probe(
            backbone,
            train,
            val,
            lambda b: model_inputs(b, pre.center, pre.scale, 1.0, cpu, True),
            cpu,
            ProbeConfig(train_events=5, val_events=5),
            names,
            seed=3,
        )
        got = result("probe")
        assert got["backbone"] == {
            "init": None,
            "method": "random",
            "arch": "ptv3",
            "size": "tiny",
            "center_events": True,
        }
        assert got["token"]["classes"] == ["shower", "track", "michel", "delta"]
        assert got["token"]["tokens"]["train"] > 100 and got["token"]["mean_f1"] is not None
        assert got["point"]["miou"] == pytest.approx(want["miou"], abs=1e-9)

        local = result("local")  # features in process: the same numbers
        assert local["point"] == got["point"] and local["token"] == got["token"]
        # fitted on another set's first events (here the same set: its first 5, which the scored events then are too)
        fitted = result("fit")
        assert fitted["fit_data"] == str(val_data) and fitted["point"] != local["point"]

    p = subprocess.run([RAYSVC, "probe", "--data", str(val_data)], capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "--random" in p.stderr  # neither an export nor --random
