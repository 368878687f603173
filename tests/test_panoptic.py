"""Panoptic fine-tuning (task `panoptic`): the instance labels a batch gives each task, a 2-worker run whose
summary.json has the particle and interaction metrics, a crashed-and-rerun run that ends with the same weights,
`predict` on its export writing instance columns consistent with the instance list, `evaluate` reproducing the run's
instance metrics, and the endpoint answering the same instances as `predict`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import requests
import torch

from raysvc.config import load_config
from raysvc.data.contract.detectors import LARTPC
from raysvc.inference.instances import instance_labels
from raysvc.seaweed import free_port
from raysvc.serve.process import ServeProcess
from raysvc.storage import resolve
from raysvc.train.tasks.panoptic import PanopticConfig
from tests.conftest import generate_train_val

JOB = str(Path(__file__).parents[1] / "jobs" / "panoptic-tiny.yaml")
TOKEN = "test-token-panoptic-0123456789"


def test_instance_labels_make_stuff_of_led_and_of_points_without_an_instance_or_pid():
    led = LARTPC.stuff_class
    batch = {
        "particle": torch.tensor([4, 4, -1, 7, 9, 9]),
        "pid": torch.tensor([2, 2, -1, -1, 0, 0]),
        "interaction": torch.tensor([0, 0, -1, 1, 1, 1]),
        "semantic": torch.tensor([1, 1, led, 0, led, 0]),
    }
    ids, cls, stuff = instance_labels(batch, "particle", led)
    assert ids.tolist() == [4, 4, -1, -1, -1, 9] and cls.tolist() == [2, 2, -1, -1, -1, 0]
    assert stuff.tolist() == [False, False, True, True, True, False]
    ids, cls, stuff = instance_labels(batch, "interaction", led)
    assert ids.tolist() == [0, 0, -1, 1, -1, 1] and cls.tolist() == [0, 0, -1, 0, -1, 0]


@pytest.fixture(scope="module")
def pan_data(tmp_path_factory):
    return generate_train_val(tmp_path_factory.mktemp("pandata"), (16, 11, 4), (8, 12, 4))


def _cfg(data: Path, out: Path, name: str) -> PanopticConfig:
    sets = [
        f"data.uri={data / 'train'}",
        f"val_data.uri={data / 'val'}",
        f"run.storage={out}",
        f"run.name={name}",
        "scaling.workers=2",
        "scaling.cpus_per_worker=0.5",
        "train.steps=4",
        "train.val_every=2",
        "train.checkpoint_every=2",
        "train.log_every=2",
        "train.batch_events=2",
        "run.max_failures=0",
        "run.wandb_mode=offline",
        "data.read_cpus=0.25",
        "val_data.read_cpus=0.25",
        "instances.particle.queries=8",
        "instances.interaction.queries=4",
        "instances.particle.depth=2",
        "instances.interaction.depth=2",
        "instances.postprocess.min_confidence=0.0",  # an untrained head: keep what it finds, to exercise the paths
        "instances.particle.regress=[momentum,direction,vertex]",
    ]
    return load_config(PanopticConfig, JOB, sets)


@pytest.mark.slow
def test_panoptic_finetune_reports_instance_metrics_resumes_exactly_and_predicts_instances(
    ray_local, pan_data, tmp_path
):
    from ray.train import TrainingFailedError

    from raysvc.data.streaming.config import DataConfig
    from raysvc.data.streaming.pipeline import DirectStream
    from raysvc.data.tools.display import show_instances
    from raysvc.inference.batch import evaluate_dataset, predict_dataset, preds_schema
    from raysvc.inference.record import load_export
    from raysvc.train.driver import run_job

    quiet = lambda m: None  # noqa: E731
    run_job(_cfg(pan_data, tmp_path, "straight"), log=quiet)
    summary = json.loads((tmp_path / "straight" / "summary.json").read_text())
    val = summary["val"]
    assert {"pq", "sq", "rq", "ari", "pid_accuracy"} <= set(val["particle"]) and {"pq", "ari"} <= set(
        val["interaction"]
    )
    assert set(val["particle"]["pid_accuracy"]) == set(LARTPC.labels["pid"].classes)
    after_cuts = sum(t.num_rows for t in DirectStream(DataConfig(uri=str(pan_data / "val"))).tables())
    assert val["particle"]["counts"]["events"] == after_cuts >= 6  # both ranks' validation events, pooled
    assert val["semantic"]["miou"] is not None
    if val["particle"]["counts"]["tp"] or val["particle"]["precision"]:  # matched particles: their regression errors
        assert val["particle"]["regression"]["momentum"]["n"] > 0
    want, record = load_export(resolve(str(tmp_path / "straight")))
    assert record.kind == "panoptic" and set(record.instances) == {"particle", "interaction"}

    # the endpoint of the straight run comes up (its own Ray and Serve) while the rerun, predict and evaluate run
    model = tmp_path / "straight"
    server = ServeProcess(["--model", f"p={model}", "--torch-threads", "1"], free_port(), TOKEN, tmp_path / "s.log")
    with server.launched() as srv:
        # no retries: the run fails at step 3; running it again resumes from the step-2 checkpoint, same weights
        cfg = _cfg(pan_data, tmp_path, "rerun")
        with pytest.raises(TrainingFailedError):
            run_job(cfg, log=quiet, fault={"step": 3, "marker": str(tmp_path / "fault")})
        run_job(cfg, log=quiet)
        got, _ = load_export(resolve(str(tmp_path / "rerun")))
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)

        info = predict_dataset(
            resolve(str(model)), resolve(str(pan_data / "val")), resolve(str(tmp_path / "preds")), batch_events=1
        )
        assert info["events"] == 8
        table = pq.read_table(tmp_path / "preds" / info["files"][0])
        assert {"pred", "instance", "instance_class", "interaction", "instances"} <= set(table.column_names)
        # an empty input shard gets an empty file with the same columns (one schema for the whole output)
        assert table.schema == preds_schema(record, ["instances"])
        for row in table.to_pylist():
            inst, cls = np.array(row["instance"]), np.array(row["instance_class"])
            assert len(inst) == len(cls) == len(row["pred"]) == row["num_points"]
            for item in row["instances"]:  # the list and the per-point columns agree
                assert (inst == item["id"]).sum() == item["points"] and set(cls[inst == item["id"]]) == {item["class"]}
                # the regression outputs, decoded: |p| > 0, a unit direction, a start point in voxel coordinates
                assert item["momentum"] > 0 and np.linalg.norm(item["direction"]) == pytest.approx(1, abs=1e-4)
                assert np.all(np.isfinite(item["vertex"]))
            assert set(inst[inst >= 0]) == {i["id"] for i in row["instances"]}
            assert np.all(cls[inst < 0] == -1)

        # the event display of true vs predicted instances draws from the dataset and these predictions
        png = show_instances(
            resolve(str(pan_data / "val")),
            resolve(str(tmp_path / "preds")),
            table["event_id"][0].as_py(),
            str(tmp_path / "ev.png"),
        )
        assert Path(png).stat().st_size > 20_000

        # evaluate: each validation rank packed one shard's events (after cuts) into one batch, as evaluate's chunks of
        # 4 events are: the same instance metrics as the run's last validation
        ev = evaluate_dataset(resolve(str(model)), resolve(str(pan_data / "val")), batch_events=4)
        for task in ("particle", "interaction"):
            assert ev[task]["counts"] == val[task]["counts"]
            assert ev[task]["pq"] == pytest.approx(val[task]["pq"])
            assert ev[task]["ari"] == pytest.approx(val[task]["ari"])

        # the endpoint answers the same instances as predict (one event per request, one per predict chunk above)
        events = pq.read_table(pan_data / "val" / "events-00000.parquet").to_pylist()
        srv.wait_ready()
        for ev, row in zip(events, table.to_pylist(), strict=True):
            body = {"points": ev["coord"], "energies": ev["energy"]}
            r = requests.post(
                f"{srv.url}/v1/segment", json=body, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120
            )
            assert r.status_code == 200, r.text
            got = r.json()
            assert got["classes"] == row["pred"]
            part = got["instances"]["particle"]
            assert part["instance"] == row["instance"] and part["instance_class"] == row["instance_class"]
            assert got["instances"]["interaction"]["instance"] == row["interaction"]
            assert [(i["id"], i["class_id"], i["points"]) for i in part["instances"]] == [
                (i["id"], i["class"], i["points"]) for i in row["instances"]
            ]
            for a, b in zip(part["instances"], row["instances"], strict=True):
                assert a["momentum"] == pytest.approx(b["momentum"], rel=1e-5)
                np.testing.assert_allclose(a["vertex"], b["vertex"], rtol=1e-5)


def test_regression_heads_refuse_a_dataset_without_particle_truth(tmp_path, pan_data):
    from raysvc.data.streaming.config import DataConfig
    from raysvc.data.streaming.prepared import prepare
    from raysvc.data.streaming.shards import write_manifest, write_shard
    from raysvc.train.tasks.panoptic import check_particle_truth
    from tests.conftest import make_table

    check_particle_truth(prepare(DataConfig(uri=str(pan_data / "train"))), "data.uri")  # generated: has truth
    old = resolve(str(tmp_path / "old"))
    table, _ = make_table(3)
    write_manifest(old, [write_shard(old, "events-00000.parquet", table.drop_columns(["particles"]))], {})
    with pytest.raises(ValueError, match=r"instances.particle.regress needs .* data.uri x has none"):
        check_particle_truth(prepare(DataConfig(uri=str(tmp_path / "old"))), "data.uri x")
