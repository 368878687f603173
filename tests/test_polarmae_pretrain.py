"""PoLAr-MAE pretraining under Ray Train (2 gloo workers): config errors before any worker, the summary / token
probe / export contract, the probe reproduced offline from the export, the export fine-tuned (lin, fft) and
served by the inference layer like a PTv3 segmenter, and a SIGKILLed worker resuming to the weights of an
uninterrupted run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from raysvc.config import ConfigError, load_config
from raysvc.storage import resolve
from raysvc.train.tasks.polarmae import PolarMAEJob
from tests.conftest import generate_train_val, make_table

RAYSVC = str(Path(sys.executable).parent / "raysvc")
JOBS = Path(__file__).parents[1] / "jobs"
JOB = str(JOBS / "pretrain-polarmae-tiny.yaml")


@pytest.fixture(scope="module")
def mae_data(tmp_path_factory):
    """Training events (4 shards) and labelled held-out events for the token probe (2 shards)."""
    return generate_train_val(tmp_path_factory.mktemp("maedata"), (32, 7, 8), (16, 8, 8))


def _cfg(data: Path, storage: Path, name: str, *extra: str) -> PolarMAEJob:
    sets = [
        f"data.uri={data / 'train'}",
        f"probe_data.uri={data / 'val'}",
        f"run.storage={storage}",
        f"run.name={name}",
        "scaling.workers=2",
        "scaling.cpus_per_worker=0.5",
        "scaling.torch_threads=1",
        "train.steps=6",
        "train.checkpoint_every=2",
        "train.log_every=2",
        "train.batch_events=2",
        "probe.every=3",
        "probe.train_events=4",
        "probe.val_events=4",
        "probe.pca_dims=16",
        "model.max_tokens=200",  # below the ~300 tokens of the larger events: the context cap is exercised
        "run.max_failures=0",
        "run.wandb_mode=offline",
        "data.read_cpus=0.25",
        "probe_data.read_cpus=0.25",
        *extra,
    ]
    return load_config(PolarMAEJob, JOB, sets)


def _last_state(run: Path) -> dict:
    last = max((p for p in run.glob("checkpoint_*") if p.is_dir()), key=lambda p: p.name)
    return torch.load(last / "state.pt", weights_only=False)


@pytest.fixture(scope="module")
def straight(ray_local, mae_data, tmp_path_factory):
    """One uninterrupted 6-step run: (storage root, summary)."""
    from raysvc.train.driver import run_job

    root = tmp_path_factory.mktemp("maeruns")
    return root, run_job(_cfg(mae_data, root, "straight"), log=lambda m: None)


def test_bad_polarmae_configs_fail_before_any_worker_starts(tmp_path, mae_data):
    good = [f"data.uri={mae_data / 'train'}", f"probe_data.uri={mae_data / 'val'}", f"run.storage={tmp_path}"]
    with pytest.raises(ConfigError, match="model.size"):
        load_config(PolarMAEJob, JOB, [*good, "model.size=huge"])
    with pytest.raises(ConfigError, match="radius_voxels"):
        load_config(PolarMAEJob, JOB, [*good, "model.overrides={radius: 0.1}"])
    with pytest.raises(ConfigError, match="model.mask_ratio"):
        load_config(PolarMAEJob, JOB, [*good, "model.mask_ratio=1.0"])
    env = {**os.environ, "RAY_TMPDIR": str(tmp_path / "ray")}
    p = subprocess.run(
        [RAYSVC, "finetune", JOB, *[a for s in good for a in ("--set", s)]],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert p.returncode == 2 and "raysvc pretrain" in p.stderr, p.stderr  # a pretraining job, not a fine-tune
    p = subprocess.run(
        [RAYSVC, "pretrain", JOB, "--set", good[0], "--set", f"probe_data.uri={tmp_path / 'nowhere'}"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert p.returncode == 2 and "nowhere" in p.stderr, p.stderr
    assert not (tmp_path / "ray").exists()


def test_pretrain_writes_the_token_probe_and_an_encoder_export(straight, mae_data):
    from raysvc.data.streaming.config import DataConfig
    from raysvc.data.streaming.pipeline import DirectStream
    from raysvc.inference.record import load_export
    from raysvc.models.polarmae import PolarMAE
    from raysvc.train.tasks.panda import probe_batches
    from raysvc.train.tasks.polarmae import token_features
    from raysvc.train.token_probe import fit_and_score

    root, summary = straight
    run = root / "straight"
    on_disk = json.loads((run / "summary.json").read_text())
    assert on_disk["task"] == "polarmae" and summary["steps"] == 6
    probe = on_disk["probe"]
    assert [s for s, _ in probe["curve"]] == [0, 3, 6]  # step 0 = the random initialisation
    assert probe["classes"] == ["shower", "track", "michel", "delta"]  # the stuff class (LED) is not scored
    assert set(probe["token_f1"]) == set(probe["classes"])
    assert probe["token_mean_f1"] == probe["curve"][-1][1] and probe["random_token_mean_f1"] == probe["curve"][0][1]
    f1 = [v for v in probe["token_f1"].values() if v is not None]
    assert f1 and all(0 <= v <= 1 for v in f1) and probe["token_mean_f1"] == pytest.approx(sum(f1) / len(f1))
    train = on_disk["history"]["train"]
    assert [r["step"] for r in train] == [2, 4, 6]
    assert all(r["chamfer_loss"] > 0 and r["energy_loss"] > 0 and 0.5 < r["masked_frac"] < 0.7 for r in train)
    tokens = on_disk["tokens"]
    assert 50 < tokens["per_event_mean"] <= 200 and tokens["max_tokens"] == 200
    assert tokens["truncated_events"] > 0  # counted, not silent (the cap is below the larger events' tokens)
    assert (run / "curves.png").read_bytes()[:4] == b"\x89PNG"

    state, record = load_export(resolve(str(run)))
    assert record.kind == "backbone" and record.method == "polarmae" and record.model.arch == "polarmae"
    assert record.model.overrides["max_tokens"] == 200 and (run / "backbone.safetensors").exists()
    assert not any(k.startswith(("encoder.", "decoder", "point_head", "energy_head", "mask_token")) for k in state)

    # the token probe, redone here on the exported encoder and the same held-out events, gives the reported figure
    cfg = _cfg(mae_data, root, "straight")
    cfg.data.resolve_preprocess()  # the dataset's frame (the tokens' radius is in its units), as the run's prepare
    model = PolarMAE(cfg.network)
    model.encoder.load_state_dict(state)
    probe_train, probe_val = probe_batches(DirectStream(DataConfig(uri=str(mae_data / "val"))).tables(), 4, 4, "v")
    names = ["shower", "track", "michel", "delta", "led"]
    cpu = torch.device("cpu")
    again = fit_and_score(
        token_features(model, probe_train, cfg.network, 5, cpu),
        token_features(model, probe_val, cfg.network, 5, cpu),
        cfg.probe,
        names,
        probe["classes"],
    )
    assert again["mean_f1"] == pytest.approx(probe["token_mean_f1"], abs=0.02)

    # `raysvc probe`'s path (export loaded into a segmenter, tokens from the record's tokenizer) gives it too, beside
    # the per-point probe of the propagated token features
    from raysvc.train.backbone_probe import probe_backbone
    from raysvc.train.probe import ProbeConfig

    offline = probe_backbone(
        str(run),
        DataConfig(uri=str(mae_data / "val")),
        point=ProbeConfig(train_events=4, val_events=4),
        token=cfg.probe,
        log=lambda m: None,
    )
    assert offline["backbone"]["arch"] == "polarmae" and offline["backbone"]["method"] == "polarmae"
    assert offline["token"]["mean_f1"] == pytest.approx(probe["token_mean_f1"], abs=1e-9)
    assert offline["tokenizer"]["max_tokens"] == 200 and 0 < offline["point"]["miou"] <= 1


@pytest.mark.long
def test_the_export_fine_tunes_and_serves_like_a_ptv3_segmenter(straight, mae_data, tmp_path):
    from raysvc.inference.record import load_export
    from raysvc.inference.segmenter import Segmenter
    from raysvc.models.polarmae import PolarMAESegModel
    from raysvc.train.driver import run_job
    from raysvc.train.tasks.segmentation import FinetuneConfig

    root, _ = straight
    encoder, _ = load_export(resolve(str(root / "straight")))

    def finetune(name: str, *sets: str) -> dict:
        cfg = load_config(
            FinetuneConfig,
            str(JOBS / "semseg-tiny.yaml"),
            [
                f"data.uri={mae_data / 'train'}",
                f"val_data.uri={mae_data / 'val'}",
                f"run.storage={tmp_path}",
                f"run.name={name}",
                f"model.init={root / 'straight'}",
                "train.steps=2",
                "train.batch_events=2",
                "train.val_every=2",
                "train.checkpoint_every=2",
                "train.val_events=4",
                "scaling.cpus_per_worker=0.5",
                "run.wandb_mode=offline",
                "data.read_cpus=0.25",
                "val_data.read_cpus=0.25",
                *sets,
            ],
        )
        assert cfg.model.arch == "ptv3"  # the job file's; the driver takes the export's
        summary = run_job(cfg, log=lambda m: None)
        assert summary["val"]["miou"] >= 0
        return load_export(resolve(str(tmp_path / name)))[0]

    # lin (the paper's PEFT): the frozen encoder is exactly the export's
    tuned = finetune("mae-lin", "model.mode=lin", "model.head=lin")
    assert all(torch.equal(tuned["backbone." + k], v) for k, v in encoder.items())
    # fft: everything trains (the encoder at a scaled lr with layer decay)
    tuned = finetune("mae-fft", "model.mode=fft", "model.head=dec")
    assert any(not torch.equal(tuned["backbone." + k], v) for k, v in encoder.items())

    # evaluate / predict / serving load it through the same record as a PTv3 segmenter
    seg = Segmenter(resolve(str(tmp_path / "mae-fft")))
    assert isinstance(seg.model, PolarMAESegModel) and seg.record.model.arch == "polarmae"
    table, events = make_table(2, points=(1100, 1500), seed=4)
    pred = seg.predict_table(table)
    assert [len(p) for p in pred] == [len(ev["energy"]) for ev in events]
    assert all(p.min() >= 0 and p.max() < 5 for p in pred)  # every point above the threshold gets a class

    # the paper's protocol: LED removed (4 classes) and focal loss
    finetune(
        "mae-4class",
        "model.mode=fft",
        "data.preprocess.remove_led=true",
        "val_data.preprocess.remove_led=true",
        "train.focal_gamma=2.0",
    )
    run = json.loads((tmp_path / "mae-4class" / "summary.json").read_text())
    things = ["shower", "track", "michel", "delta"]
    assert list(run["val"]["iou"]) == things and list(run["class_counts"]) == things
    seg = Segmenter(resolve(str(tmp_path / "mae-4class")))
    assert seg.class_names == things and seg.record.preprocess.remove_led
    pred = seg.predict_table(table)  # every point of a raw event, LED too, gets one of the 4 classes
    assert [len(p) for p in pred] == [len(ev["energy"]) for ev in events]
    assert all(p.min() >= 0 and p.max() < 4 for p in pred)
    # evaluation under the training cuts scores exactly the non-LED points above the threshold, class by class
    from raysvc.data.streaming.shards import iter_tables, load_manifest
    from raysvc.inference.batch import evaluate_dataset

    val = resolve(str(mae_data / "val"))
    got = evaluate_dataset(resolve(str(tmp_path / "mae-4class")), val, log=lambda m: None)
    want = {c: 0 for c in things}
    for ev in (ev for _, t in iter_tables(val, load_manifest(val)) for ev in t.to_pylist()):
        sem, e = torch.tensor(ev["semantic"]), torch.tensor(ev["energy"])
        keep = (e > 0.13) & (sem != 4)
        if int(keep.sum()) >= seg.record.preprocess.min_points:
            for c, name in enumerate(things):
                want[name] += int((sem[keep] == c).sum())
    assert got["support"] == want and sum(want.values()) > 0


@pytest.mark.slow
@pytest.mark.long
def test_a_sigkilled_worker_resumes_to_the_weights_of_an_uninterrupted_run(straight, mae_data, tmp_path):
    from raysvc.train.driver import run_job

    root, _ = straight
    want = _last_state(root / "straight")
    cfg = _cfg(mae_data, tmp_path, "retried")
    cfg.run.max_failures = 1
    run_job(cfg, log=lambda m: None, fault={"step": 3, "marker": str(tmp_path / "fault"), "kind": "sigkill"})
    assert (tmp_path / "fault").exists()
    got = _last_state(tmp_path / "retried")
    assert all(torch.equal(got["model"][k], want["model"][k]) for k in want["model"])
    assert [r["step"] for r in got["history"]["probe"]] == [0, 3, 6]
    assert got["history"]["probe"] == want["history"]["probe"]
