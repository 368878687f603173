"""Panda pretraining under Ray Train (2 gloo workers): config errors before any worker, the summary / probe / export
contract, the exported backbone loading into fine-tuning, and resumption ending with the weights of an uninterrupted
run (student, teacher and data order included)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from raysvc.config import load_config
from raysvc.storage import resolve
from raysvc.train.tasks.panda import PretrainConfig
from tests.conftest import generate_train_val

RAYSVC = str(Path(sys.executable).parent / "raysvc")
JOB = str(Path(__file__).parents[1] / "jobs" / "pretrain-panda-tiny.yaml")


@pytest.fixture(scope="module")
def pt_data(tmp_path_factory):
    """Unlabelled-use training events (4 shards) and labelled held-out events for the probe (2 shards)."""
    return generate_train_val(tmp_path_factory.mktemp("ptdata"), (32, 7, 8), (16, 8, 8))


def _cfg(pt_data, tmp_path, name: str, *extra: str) -> PretrainConfig:
    sets = [
        f"data.uri={pt_data / 'train'}",
        f"probe_data.uri={pt_data / 'val'}",
        f"run.storage={tmp_path}",
        f"run.name={name}",
        "scaling.workers=2",
        "scaling.cpus_per_worker=0.5",
        "scaling.torch_threads=1",
        "train.steps=6",
        "train.checkpoint_every=2",
        "train.log_every=2",
        "train.monitor_every=2",
        "train.batch_events=2",
        "probe.every=3",
        "probe.train_events=4",
        "probe.val_events=4",
        "probe.points_per_class=300",
        "views.local_views=2",
        "views.max_points=1500",
        "panda.head_hidden=64",
        "panda.head_embed=32",
        "panda.prototypes=64",
        "run.max_failures=0",
        "run.wandb_mode=offline",
        "data.read_cpus=0.25",
        "probe_data.read_cpus=0.25",
        *extra,
    ]
    return load_config(PretrainConfig, JOB, sets)


def test_bad_pretrain_configs_fail_before_any_worker_starts(tmp_path, pt_data):
    env = {**os.environ, "RAY_TMPDIR": str(tmp_path / "ray")}

    def fails(*sets):
        p = subprocess.run(
            [RAYSVC, "pretrain", JOB, *[a for s in sets for a in ("--set", s)]],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert p.returncode == 2, p.stderr
        return p.stderr

    good = [f"data.uri={pt_data / 'train'}", f"probe_data.uri={pt_data / 'val'}", f"run.storage={tmp_path}"]
    cases = [
        (*good, "panda.prototypez=3"),
        (*good, "views.global_scale=[0.5,0.2]"),
        (*good, "views.global_views=1"),
        (f"data.uri={tmp_path / 'nowhere'}", f"probe_data.uri={pt_data / 'val'}"),
    ]
    with ThreadPoolExecutor(4) as pool:  # a command that fails early is mostly Python starting: several at once
        unknown, scale, roll, missing = pool.map(lambda c: fails(*c), cases)
    assert "panda.prototypez" in unknown and "views.global_scale" in scale and "panda.roll_mask_weight" in roll
    assert "nowhere" in missing and "not found" in missing
    assert not (tmp_path / "ray").exists()


@pytest.mark.long
def test_pretrain_writes_probe_summary_and_a_backbone_that_finetuning_loads(ray_local, pt_data, tmp_path):
    from raysvc.data.streaming.config import DataConfig
    from raysvc.data.streaming.pipeline import DirectStream
    from raysvc.inference.featurize import model_inputs
    from raysvc.inference.record import load_export
    from raysvc.models.ptv3 import PTv3, preset
    from raysvc.train.driver import run_job
    from raysvc.train.probe import run_probe
    from raysvc.train.tasks.panda import probe_batches
    from raysvc.train.tasks.segmentation import FinetuneConfig

    summary = run_job(_cfg(pt_data, tmp_path, "panda"), log=lambda m: None)
    run = tmp_path / "panda"
    on_disk = json.loads((run / "summary.json").read_text())
    probe = on_disk["probe"]
    assert [s for s, _ in probe["curve"]] == [0, 3, 6]  # step 0 = the random initialisation
    assert probe["random_miou"] == probe["curve"][0][1] and probe["pretrained_miou"] == probe["curve"][-1][1]
    assert 0 <= probe["pretrained_miou"] <= 1 and set(probe["pretrained"]["f1"]) == set(probe["classes"])
    mon = on_disk["history"]["monitor"]
    assert [m["step"] for m in mon] == [2, 4, 6]
    assert all(0 < m["proto_used_frac"] <= 1 and m["feat_std"] > 0 for m in mon)
    train = on_disk["history"]["train"]
    assert all(k in train[-1] for k in ("mask_loss", "roll_mask_loss", "unmask_loss", "unmask_matched"))
    assert all(r["private_mb"] > 100 for r in train)  # the worker's own memory (torch alone)
    assert (
        on_disk["data"]["events_read"]
        == on_disk["data"]["events_out"]
        + on_disk["data"]["cut_min_points"]
        + on_disk["data"]["selected_out"]
        + on_disk["data"]["skipped_bad_total"]
    )
    assert on_disk["data"]["events_out"] >= 6 * 2  # every step consumed a batch of 2 events
    assert (run / "probe.png").read_bytes()[:4] == b"\x89PNG" and (run / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert summary["steps"] == 6

    state, config = load_export(resolve(str(run)))
    assert (run / "backbone.safetensors").exists() and config.kind == "backbone" and config.method == "panda"
    assert all(not k.startswith(("backbone.", "mask_head", "unmask_head", "mask_token")) for k in state)

    # the probe, redone here on the exported backbone and the same held-out events, gives the reported figure
    cfg = _cfg(pt_data, tmp_path, "panda")
    probe_train, probe_val = probe_batches(DirectStream(DataConfig(uri=str(pt_data / "val"))).tables(), 4, 4, "val")
    backbone = PTv3(preset("tiny"))
    backbone.load_state_dict(state)
    cfg.data.resolve_preprocess()  # the datasets' frames, as the run's prepare set them (the grid is in data's)
    cfg.probe_data.resolve_preprocess()
    pre, cpu = cfg.probe_data.preprocess, torch.device("cpu")
    again = run_probe(
        backbone,
        probe_train,
        probe_val,
        lambda b: model_inputs(b, pre.center, pre.scale, cfg.grid_voxels, cpu, True),
        cpu,
        cfg.probe,
        probe["classes"],
    )
    assert again["miou"] == pytest.approx(probe["pretrained_miou"], abs=0.01)

    # fine-tuning from the export: the linear head on the frozen backbone starts from exactly these weights
    ft = load_config(
        FinetuneConfig,
        str(Path(JOB).parent / "semseg-tiny.yaml"),
        [
            f"data.uri={pt_data / 'train'}",
            f"val_data.uri={pt_data / 'val'}",
            f"run.storage={tmp_path}",
            "run.name=probe-ft",
            f"model.init={run}",
            "model.mode=lin",
            "model.head=lin",
            "train.steps=2",
            "train.batch_events=2",
            "train.val_every=2",
            "train.checkpoint_every=2",
            "train.val_events=4",
            "scaling.cpus_per_worker=0.5",
            "run.wandb_mode=offline",
            "data.read_cpus=0.25",
            "val_data.read_cpus=0.25",
        ],
    )
    run_job(ft, log=lambda m: None)
    tuned, _ = load_export(resolve(str(tmp_path / "probe-ft")))
    for k, v in state.items():
        assert torch.equal(tuned["backbone." + k], v), k  # frozen and loaded: unchanged

    # fft with the encoder held for all its steps (encoder_frozen_steps): unchanged too
    held = ft.model_copy(
        update={
            "model": ft.model.model_copy(update={"mode": "fft", "head": "dec"}),
            "train": ft.train.model_copy(update={"encoder_frozen_steps": 2}),
            "run": ft.run.model_copy(update={"name": "held-ft"}),
        }
    )
    run_job(FinetuneConfig.model_validate(held.model_dump()), log=lambda m: None)
    tuned, _ = load_export(resolve(str(tmp_path / "held-ft")))
    assert all(torch.equal(tuned["backbone." + k], v) for k, v in state.items())


@pytest.mark.slow
def test_pretrain_resumes_to_the_weights_of_an_uninterrupted_run(ray_local, pt_data, tmp_path):
    from raysvc.train.driver import run_job

    quiet = lambda m: None  # noqa: E731
    no_probe = ("probe.every=100",)
    run_job(_cfg(pt_data, tmp_path, "straight", *no_probe), log=quiet)
    want = torch.load(_last_state(tmp_path / "straight"), weights_only=False)

    # a worker process is SIGKILLed at step 3; Ray Train restarts the group from the step-2 checkpoint. The views
    # come through the other loader (Ray Data, as Arrow rows): the same views in the same order, the same weights.
    cfg = _cfg(pt_data, tmp_path, "retried", *no_probe, "data.loader=ray_data")
    cfg.run.max_failures = 1
    run_job(cfg, log=quiet, fault={"step": 3, "marker": str(tmp_path / "fault-retried"), "kind": "sigkill"})
    assert (tmp_path / "fault-retried").exists()
    got = torch.load(_last_state(tmp_path / "retried"), weights_only=False)
    for part in ("student", "teacher"):
        assert all(torch.equal(got[part][k], want[part][k]) for k in want[part]), part
    assert [r["step"] for r in got["history"]["train"]] == [2, 4, 6]
    # a failed run resumed by running the same command again goes through the same restore: tests/test_train.py


def _last_state(run: Path) -> Path:
    return max((p for p in run.glob("checkpoint_*") if p.is_dir()), key=lambda p: p.name) / "state.pt"
