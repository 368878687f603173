"""Segmentation training under Ray Train: config errors before any worker, export + metrics that reproduce offline,
and resumption that ends with the same weights as an uninterrupted run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from raysvc.config import ConfigError, load_config
from raysvc.data.contract.detectors import LARTPC
from raysvc.data.streaming.config import DataConfig
from raysvc.data.streaming.pipeline import DirectStream
from raysvc.storage import resolve
from raysvc.train.tasks.segmentation import FinetuneConfig
from tests.conftest import Commands, generate_train_val

RAYSVC = str(Path(sys.executable).parent / "raysvc")
CLASS_NAMES = LARTPC.class_names
JOB = str(Path(__file__).parents[1] / "jobs" / "semseg-tiny.yaml")


@pytest.fixture(scope="module")
def seg_data(tmp_path_factory):
    """Small train (4 shards) and validation (2 shards) sets of generated events."""
    return generate_train_val(tmp_path_factory.mktemp("segdata"), (32, 5, 8), (12, 6, 6))


def _cfg(seg_data, tmp_path, name: str, **train) -> FinetuneConfig:
    sets = [
        f"data.uri={seg_data / 'train'}",
        f"val_data.uri={seg_data / 'val'}",
        f"run.storage={tmp_path}",
        f"run.name={name}",
        "scaling.workers=2",
        "scaling.cpus_per_worker=0.5",
        "scaling.torch_threads=1",
        "train.steps=6",
        "train.val_every=3",
        "train.checkpoint_every=2",
        "train.log_every=2",
        "train.batch_events=2",
        "run.max_failures=0",
        "run.wandb_mode=offline",
        "data.read_cpus=0.25",
        "val_data.read_cpus=0.25",
    ] + [f"train.{k}={v}" for k, v in train.items()]
    return load_config(FinetuneConfig, JOB, sets)


def _weights(tmp_path, name: str) -> dict:
    from raysvc.inference.record import load_export

    return load_export(resolve(str(tmp_path / name)))[0]


def test_bad_configs_fail_before_any_worker_starts(tmp_path, seg_data):
    env = {**os.environ, "RAY_TMPDIR": str(tmp_path / "ray")}  # a Ray start would create this

    def fails(*sets, extra_env=None):
        p = subprocess.run(
            [RAYSVC, "finetune", JOB, *[a for s in sets for a in ("--set", s)]],
            capture_output=True,
            text=True,
            env={**env, **(extra_env or {})},
            timeout=120,
        )
        assert p.returncode == 2, p.stderr
        return p.stderr

    good = [f"data.uri={seg_data / 'train'}", f"val_data.uri={seg_data / 'val'}", f"run.storage={tmp_path}"]
    no_store = {
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
        "AWS_ACCESS_KEY_ID": "x",
        "AWS_SECRET_ACCESS_KEY": "y",
        "AWS_DEFAULT_REGION": "us-east-1",
        "RAYSVC_STORAGE_RETRY_S": "1",  # the retry budget (default 120 s) spent quickly: the same named error
    }
    cases = [
        (*good, "train.stepz=3"),  # unknown key, by its dotted name
        (*good, "train.steps=many"),  # wrong type
        (*good, "scaling.workers=3"),  # batch not divisible by workers
        (*good, "data.preprocess.remove_led=true"),  # 4 classes to train, 5 to validate on
        (*good, "train.focal_gamma=-1"),
        (f"data.uri={tmp_path / 'nowhere'}", f"val_data.uri={seg_data / 'val'}"),
    ]
    with ThreadPoolExecutor(4) as pool:  # a command that fails early is mostly Python starting: several at once
        unreachable = pool.submit(fails, "data.uri=s3://raysvc-none/train", good[1], extra_env=no_store)
        stepz, steps, workers, mixed, focal, missing = pool.map(lambda c: fails(*c), cases)
    assert "train.stepz" in stepz and "train.steps" in steps and "scaling.workers" in workers
    assert "val_data.preprocess.remove_led" in mixed and "one label space" in mixed
    assert "focal_gamma" in focal
    assert "nowhere" in missing and "not found" in missing
    assert "s3://raysvc-none/train" in unreachable.result()
    assert not (tmp_path / "ray").exists()


def test_finetune_exports_a_model_whose_metrics_reproduce_offline(ray_local, seg_data, tmp_path):
    from raysvc.inference.featurize import model_inputs
    from raysvc.inference.metrics import ConfusionMatrix, compute
    from raysvc.inference.record import load_export
    from raysvc.train.driver import run_job

    cfg = _cfg(seg_data, tmp_path, "export")
    summary = run_job(cfg, log=lambda m: None)
    run = tmp_path / "export"
    on_disk = json.loads((run / "summary.json").read_text())
    assert on_disk["steps"] == 6 and set(on_disk["val"]["iou"]) == set(CLASS_NAMES)
    assert set(on_disk["val"]["f1"]) == set(CLASS_NAMES) and 0 <= on_disk["val"]["miou"] <= 1
    assert [v["step"] for v in on_disk["history"]["val"]] == [3, 6]
    assert (run / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert len([p for p in run.glob("checkpoint_*") if p.is_dir()]) == 2  # run.keep_checkpoints
    assert list((tmp_path / "wandb").glob("offline-run-*"))  # wandb offline run of rank 0, beside the runs

    # raysvc predict, evaluate and evaluate on a missing GPU, started at once (each starts its own Ray, most of its
    # time), while the exported weights are evaluated here
    out = tmp_path / "preds"
    val_uri = str(seg_data / "val")
    model_data = ["--model", str(run), "--data", val_uri]
    cmds = {
        "predict": ["predict", *model_data, "--out", str(out), "--batch-events", "5"],
        "evaluate": ["evaluate", *model_data, "--batch-events", "3", "--out", str(tmp_path / "eval.json")],
    }
    if not torch.cuda.is_available():  # asking for a GPU that is not there is an error naming the device
        cmds["cuda"] = ["evaluate", *model_data, "--device", "cuda"]
    with Commands(tmp_path) as commands:
        for name, args in cmds.items():
            commands.start(name, *args)
        # the exported weights, evaluated here on every validation event, give the metrics the two workers reported
        state, record = load_export(resolve(str(run)))
        assert record.kind == "segmenter" and record.detector == "lartpc" and record.class_names == list(CLASS_NAMES)
        model = record.build()
        model.load_state_dict(state)
        model.eval()
        cm = ConfusionMatrix(len(CLASS_NAMES))
        pre = record.preprocess  # the run's, as its export states it
        with torch.no_grad():
            for batch in DirectStream(DataConfig(uri=val_uri)).iter_packed(4):
                x = model_inputs(batch, pre.center, pre.scale, cfg.model.grid_voxels, torch.device("cpu"))
                logits = model(x["feat"], x["coord"], x["grid_coord"], x["offset"])
                cm.update(logits.argmax(1)[x["inverse"]], x["labels"])
        offline = compute(cm.matrix, CLASS_NAMES)
        assert offline["confusion"] == summary["val"]["confusion"]
        assert offline["miou"] == pytest.approx(summary["val"]["miou"])

        # raysvc predict: every input point gets a class (-1 below the energy threshold), in the input's order; over
        # the events that pass the training cuts it agrees with the metrics above
        commands.finished("predict")
        import pyarrow as pa
        import pyarrow.parquet as pq

        from raysvc.data.contract.schema import flat_values
        from raysvc.data.streaming.shards import load_manifest, read_shard

        val = resolve(val_uri)
        inputs = pa.concat_tables([read_shard(val, r) for r in load_manifest(val).shards])
        preds = pa.concat_tables([pq.read_table(f) for f in sorted(out.glob("preds-*.parquet"))])
        assert preds.column("event_id").to_pylist() == inputs.column("event_id").to_pylist()
        assert preds.column("num_points").to_pylist() == inputs.column("num_points").to_pylist()
        pred = preds.column("pred").combine_chunks().flatten().to_numpy()
        energy, sem = flat_values(inputs, "energy"), flat_values(inputs, "semantic")
        assert ((pred == -1) == (energy <= pre.energy_threshold)).all()
        counts = np.diff(np.concatenate([[0], np.cumsum(inputs.column("num_points").to_numpy())]))
        event_of_point = np.repeat(np.arange(inputs.num_rows), counts)
        kept_per_event = np.bincount(event_of_point, weights=energy > pre.energy_threshold, minlength=inputs.num_rows)
        mask = (energy > pre.energy_threshold) & (kept_per_event[event_of_point] >= pre.min_points)
        again = ConfusionMatrix(len(CLASS_NAMES)).update(
            torch.from_numpy(pred[mask].astype(np.int64)), torch.from_numpy(sem[mask].astype(np.int64))
        )
        assert again.matrix.tolist() == summary["val"]["confusion"]

        # raysvc evaluate: the same events, the same confusion as the run's own validation, and the cut counted
        commands.finished("evaluate")
        ev = json.loads((tmp_path / "eval.json").read_text())
        assert ev["confusion"] == summary["val"]["confusion"] and ev["miou"] == pytest.approx(summary["val"]["miou"])
        scored = int((kept_per_event >= pre.min_points).sum())
        assert ev["events"]["events_read"] == inputs.num_rows and ev["events"]["events_out"] == scored
        assert ev["events"]["cut_min_points"] == inputs.num_rows - scored
        if "cuda" in cmds:
            err = commands.finished("cuda", ok=False)
            assert "device 'cuda'" in err and "sees no CUDA device" in err, err


@pytest.mark.slow
@pytest.mark.long
def test_resume_after_failures_ends_with_the_weights_of_an_uninterrupted_run(ray_local, seg_data, tmp_path):
    from ray.train import TrainingFailedError

    from raysvc.train.driver import run_job

    quiet = lambda m: None  # noqa: E731
    run_job(_cfg(seg_data, tmp_path, "straight"), log=quiet)
    want = _weights(tmp_path, "straight")

    # a worker process is SIGKILLed at step 5; Ray Train restarts the group, which resumes from the step-4 checkpoint.
    # This run's workers run under jemalloc (train.allocator): another allocator changes no arithmetic.
    cfg = _cfg(seg_data, tmp_path, "retried", allocator="jemalloc")
    cfg.run.max_failures = 1
    run_job(cfg, log=quiet, fault={"step": 5, "marker": str(tmp_path / "fault-retried"), "kind": "sigkill"})
    assert (tmp_path / "fault-retried").exists()
    got = _weights(tmp_path, "retried")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    history = json.loads((tmp_path / "retried" / "summary.json").read_text())["history"]["train"]
    assert {r["allocator"] for r in history} == {"jemalloc"} and "heap_live_mb" not in history[-1]
    straight = json.loads((tmp_path / "straight" / "summary.json").read_text())["history"]["train"]
    assert {r["allocator"] for r in straight} == {"glibc"} and straight[-1]["heap_live_mb"] > 50

    # no retries: the run fails; running it again under the same name resumes it. This run reads through Ray Data
    # (data.loader): the other loader, same events in the same order, same resume, so the same weights again.
    cfg = _cfg(seg_data, tmp_path, "rerun")
    cfg.data.loader = "ray_data"
    with pytest.raises(TrainingFailedError):
        run_job(cfg, log=quiet, fault={"step": 3, "marker": str(tmp_path / "fault-rerun")})
    run_job(cfg, log=quiet)
    got = _weights(tmp_path, "rerun")
    assert all(torch.equal(got[k], want[k]) for k in want)
    summary = json.loads((tmp_path / "rerun" / "summary.json").read_text())
    assert [r["step"] for r in summary["history"]["train"]] == [2, 4, 6]  # history carried over the restart
    assert all(r["private_mb"] > 100 for r in summary["history"]["train"])  # the worker's own memory (torch alone)


def test_held_encoder_gets_no_update_no_decay_and_no_optimizer_state(seg_data, tmp_path):
    """encoder_frozen_steps (LP-FT): while held, AdamW leaves the encoder exactly as loaded (no step, no weight decay,
    no moments) and trains the rest; the next unheld step moves it."""
    from raysvc.models.heads import SegModel
    from raysvc.models.ptv3 import preset
    from raysvc.train.losses import SegLoss
    from raysvc.train.optim import param_groups
    from raysvc.train.tasks.segmentation import build_model, train_step

    cfg = load_config(
        FinetuneConfig,
        JOB,
        [
            f"data.uri={seg_data / 'train'}",
            f"val_data.uri={seg_data / 'val'}",
            f"run.storage={tmp_path}",
            "model.mode=fft",
            f"model.init={tmp_path}",
            "train.encoder_frozen_steps=1",
            "train.backbone_lr_scale=1.0",
        ],
    )
    cfg.data.resolve_preprocess()  # the dataset's frame, as a run's prepare sets it
    torch.manual_seed(0)
    init = SegModel(preset("tiny"), len(CLASS_NAMES)).state_dict()
    model = build_model(cfg, len(CLASS_NAMES), init)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(param_groups(model, model.backbone.cfg.depths, 1e-2, cfg.train.layer_decay, 0.5), lr=1e-2)
    encoder = list(model.backbone.parameters())
    batch = next(DirectStream(DataConfig(uri=str(seg_data / "train"))).iter_packed(2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_step(model, params, opt, SegLoss(None), batch, cfg, torch.device("cpu"), hold=encoder)
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before if k.startswith("backbone.")), "held encoder moved"
    assert all(torch.equal(after[k], v) for k, v in init.items() if k.startswith("backbone."))  # as loaded
    assert not torch.equal(after["head.weight"], before["head.weight"])  # the head (dec: a linear after the decoder)
    assert not any(p in opt.state for p in encoder) and all(p in opt.state for p in model.head.parameters())
    train_step(model, params, opt, SegLoss(None), batch, cfg, torch.device("cpu"))
    now = model.state_dict()
    moved = [k for k in before if k.startswith("backbone.") and not torch.equal(now[k], before[k])]
    assert len(moved) > len(encoder) // 2  # released: the encoder trains (parameters without a gradient excepted)


def test_encoder_frozen_steps_needs_a_pretrained_encoder(seg_data, tmp_path):
    sets = [f"data.uri={seg_data / 'train'}", f"val_data.uri={seg_data / 'val'}", "train.encoder_frozen_steps=5"]
    with pytest.raises(ConfigError, match="encoder_frozen_steps.*fft"):
        load_config(FinetuneConfig, JOB, sets)
