"""The seams of the architecture without Ray: jobs pick their task by name, exports are typed and versioned records
(old ones still read), and a model or dataset of another detector is refused before anything is read or trained."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from raysvc.config import ConfigError, load_config
from raysvc.data.contract.detectors import DETECTORS, LARTPC
from raysvc.data.sources.synthetic import generate_dataset
from raysvc.data.streaming.transforms import PreprocessConfig
from raysvc.inference.batch import evaluate_dataset
from raysvc.inference.record import ExportedModel, ModelSpec, export_seeded_segmenter, load_export, save_export
from raysvc.inference.segmenter import Segmenter
from raysvc.models.heads import SegModel
from raysvc.models.ptv3 import preset
from raysvc.storage import resolve
from raysvc.train.driver import load_job
from raysvc.train.tasks import TASKS, get_task
from raysvc.train.tasks.panda import PretrainConfig
from raysvc.train.tasks.segmentation import FinetuneConfig, SegmentationTask

JOBS = Path(__file__).parents[1] / "jobs"


@pytest.fixture
def toy(monkeypatch):
    """A second registered detector: LArTPC's geometry under another name."""
    det = replace(LARTPC, name="toy")
    monkeypatch.setitem(DETECTORS, "toy", det)
    return det


@pytest.fixture(scope="module")
def events(tmp_path_factory):
    root = tmp_path_factory.mktemp("events")
    generate_dataset(resolve(str(root)), 8, seed=3, shard_events=4, show_progress=False)
    return root


def test_every_job_file_names_a_registered_task_of_its_command(tmp_path):
    for job in sorted(JOBS.glob("*.yaml")):
        task = yaml.safe_load(job.read_text())["task"]
        assert task in TASKS, job.name
        kind = get_task(task).kind
        cfg = load_job(str(job), None, "panda" if kind == "pretrain" else "segmentation")
        assert isinstance(cfg, get_task(task).config) and cfg.task == task


def test_load_job_refuses_the_wrong_command_and_unknown_tasks(tmp_path):
    with pytest.raises(ConfigError, match="is a finetune task: run it with `raysvc finetune`"):
        load_job(str(JOBS / "semseg-tiny.yaml"), None, "panda")
    with pytest.raises(ConfigError, match="is a pretrain task: run it with `raysvc pretrain`"):
        load_job(str(JOBS / "pretrain-panda-tiny.yaml"), None, "segmentation")
    with pytest.raises(ConfigError, match="task 'mae' is not one of"):
        load_job(str(JOBS / "semseg-tiny.yaml"), ["task=mae"], "segmentation")
    # a YAML without a task key runs the command's default task
    plain = tmp_path / "plain.yaml"
    plain.write_text(yaml.safe_dump({"data": {"uri": "x"}, "val_data": {"uri": "y"}}))
    assert isinstance(load_job(str(plain), None, "segmentation"), FinetuneConfig)
    with pytest.raises(ConfigError, match="task"):  # the config checks its own task name too
        load_config(PretrainConfig, str(plain), ["task=segmentation"])


def test_record_round_trip_rebuilds_the_same_network(tmp_path):
    loc = resolve(str(tmp_path / "m"))
    export_seeded_segmenter(loc, seed=5)
    state, record = load_export(loc)
    assert (record.format_version, record.kind, record.method, record.detector) == (
        2,
        "segmenter",
        "segmentation",
        "lartpc",
    )
    assert record.class_names == list(LARTPC.class_names) and record.weights_name == "model.safetensors"
    torch.manual_seed(5)
    again = SegModel(preset("tiny"), len(LARTPC.class_names), "dec").state_dict()
    model = record.build()
    model.load_state_dict(state)  # strict: the record rebuilds exactly the exported network
    assert all(torch.equal(again[k], v) for k, v in model.state_dict().items())


def test_unversioned_exports_still_read(tmp_path):
    """config.json as exports wrote it before the record was versioned: a fine-tuned model and a Panda backbone."""
    seg = tmp_path / "seg"
    export_seeded_segmenter(resolve(str(seg)), seed=0)
    (seg / "config.json").write_text(
        json.dumps(
            {
                "model": {
                    "size": "tiny",
                    "overrides": {},
                    "head": "dec",
                    "mode": "scratch",
                    "init": None,
                    "grid_voxels": 1.0,
                    "center_events": False,
                },
                "num_classes": 5,
                "class_names": list(LARTPC.class_names),
                "preprocess": PreprocessConfig().model_dump(mode="json"),
                "step": 7,
            }
        )
    )
    _, rec = load_export(resolve(str(seg)))
    assert (rec.kind, rec.method, rec.detector, rec.step, rec.num_classes) == (
        "segmenter",
        "segmentation",
        "lartpc",
        7,
        5,
    )
    bb = tmp_path / "bb"
    save_export(
        resolve(str(bb)),
        {"w": torch.zeros(1)},
        ExportedModel(kind="backbone", method="panda", model=ModelSpec(), preprocess=PreprocessConfig()),
    )
    (bb / "config.json").write_text(
        json.dumps(
            {
                "kind": "panda-backbone",
                "model": {"size": "tiny", "overrides": {}, "grid_voxels": 1.0, "center_events": True},
                "step": 3,
            }
        )
    )
    _, rec = load_export(resolve(str(bb)))
    assert (rec.kind, rec.method, rec.model.center_events, rec.weights_name) == (
        "backbone",
        "panda",
        True,
        "backbone.safetensors",
    )
    with pytest.raises(ValueError, match="no segmentation head"):
        rec.build()


def test_bad_records_are_named(tmp_path):
    loc = tmp_path / "m"
    export_seeded_segmenter(resolve(str(loc)), seed=0)
    config = json.loads((loc / "config.json").read_text())
    (loc / "config.json").write_text(json.dumps({**config, "format_version": 99}))
    with pytest.raises(ValueError, match=r"config.json: not a valid export record.*format_version 99 is newer"):
        load_export(resolve(str(loc)))
    (loc / "config.json").write_text(json.dumps({**config, "detector": "nope"}))
    with pytest.raises(ValueError, match="unknown detector 'nope'"):
        load_export(resolve(str(loc)))
    (loc / "config.json").write_text(json.dumps(config))
    (loc / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        load_export(resolve(str(loc)))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_export(resolve(str(tmp_path / "empty")))


def test_models_and_datasets_of_another_detector_are_refused(tmp_path, events, toy):
    # a segmenter trained on "toy" events, evaluated on a LArTPC dataset
    loc = resolve(str(tmp_path / "toy-model"))
    export_seeded_segmenter(loc, seed=0)
    _, record = load_export(loc)
    save_export(loc, Segmenter(loc).model.state_dict(), record.model_copy(update={"detector": "toy"}))
    with pytest.raises(ValueError, match=r"holds lartpc events; the model .* was trained on toy events"):
        evaluate_dataset(loc, resolve(str(events)), log=lambda m: None)
    # fine-tuning a LArTPC dataset from a "toy" backbone: refused on the driver, before any worker starts
    backbone = resolve(str(tmp_path / "toy-backbone"))
    save_export(
        backbone,
        {},
        ExportedModel(
            kind="backbone", method="panda", detector="toy", model=ModelSpec(), preprocess=PreprocessConfig()
        ),
    )
    cfg = load_config(
        FinetuneConfig,
        str(JOBS / "semseg-tiny.yaml"),
        [f"data.uri={events}", f"val_data.uri={events}", f"model.init={tmp_path / 'toy-backbone'}", "model.mode=fft"],
    )
    with pytest.raises(ValueError, match="was trained on toy events, the data holds lartpc events"):
        SegmentationTask.prepare(cfg, log=lambda m: None)


def test_segmentation_prepare_takes_class_names_from_the_data(events):
    cfg = load_config(FinetuneConfig, str(JOBS / "semseg-tiny.yaml"), [f"data.uri={events}", f"val_data.uri={events}"])
    inputs = SegmentationTask.prepare(cfg, log=lambda m: None)
    assert inputs["class_names"] == list(LARTPC.class_names) and inputs["detector"] == "lartpc"
    assert len(inputs["class_weights"]) == len(inputs["class_counts"]) == len(LARTPC.class_names)
    assert sum(inputs["class_counts"]) > 0


def test_pretraining_outcomes_print_their_probe_figures():
    """What `raysvc pretrain` prints of a finished run: the run, its steps and the method's probe figures (None for
    one the record lacks); a run without a probe prints only the first two."""
    base = {"uri": "file:///runs/p", "steps": 8}
    probe = {"pretrained_miou": 0.5, "random_miou": 0.25, "extra": 1}
    panda = get_task("panda").outcome(base | {"probe": probe, "last_monitor": {"rank_me": 3.0}})
    assert panda == {
        "run": "file:///runs/p",
        "steps": 8,
        "probe_pretrained_miou": 0.5,
        "probe_random_miou": 0.25,
        "monitor": {"rank_me": 3.0},
    }
    assert get_task("panda").outcome(base) == {"run": "file:///runs/p", "steps": 8}
    tokens = {"token_mean_f1": 0.7, "token_f1": [0.6, 0.8]}
    polarmae = get_task("polarmae").outcome(base | {"probe": tokens, "tokens": 12})
    assert list(polarmae.items()) == [
        ("run", "file:///runs/p"),
        ("steps", 8),
        ("probe_token_mean_f1", 0.7),
        ("probe_random_token_mean_f1", None),
        ("probe_token_f1", [0.6, 0.8]),
        ("tokens", 12),
    ]
    assert get_task("polarmae").outcome(base | {"probe": {}}) == {"run": "file:///runs/p", "steps": 8}
