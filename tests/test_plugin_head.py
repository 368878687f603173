"""A head defined outside raysvc (tests/plugins/energy_head.py: per-event deposited-energy regression) runs through
the real command line: `raysvc finetune` trains it, `raysvc predict` writes its column, `raysvc evaluate` its
figure, `raysvc serve` answers its field and lists it in /openapi.json, and no file under raysvc/ names it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests

from raysvc.data.sources.synthetic import generate_dataset
from raysvc.data.streaming.shards import load_manifest, read_shard
from raysvc.seaweed import free_port
from raysvc.serve.process import ServeProcess
from raysvc.storage import resolve
from tests.conftest import Commands, tiny_finetune_sets

ROOT = Path(__file__).resolve().parents[1]
RAYSVC = str(Path(sys.executable).parent / "raysvc")
PLUGIN = "tests.plugins.energy_head"
ENV = {"RAYSVC_PLUGINS": PLUGIN, "PYTHONPATH": str(ROOT)}
TOKEN = "plugin-token-0123456789abcdef"


def _raysvc(*args) -> subprocess.CompletedProcess:
    p = subprocess.run([RAYSVC, *args], capture_output=True, text=True, env={**os.environ, **ENV}, timeout=900)
    assert p.returncode == 0, f"raysvc {' '.join(args)}:\n{p.stdout}\n{p.stderr}"
    return p


def test_no_file_under_raysvc_names_the_plugin():
    names = ("tests.plugins", "energy_head.safetensors", "deposited_energy", "EnergyOutput", "EnergyTask")
    hits = [str(f) for f in (ROOT / "raysvc").rglob("*.py") if any(n in f.read_text() for n in names)]
    assert hits == []


def test_unknown_plugin_is_an_error_naming_it():
    p = subprocess.run(
        [RAYSVC, "finetune", str(ROOT / "jobs" / "semseg-tiny.yaml"), "--set", "task=energy"],
        capture_output=True,
        text=True,
        env={**os.environ, "RAYSVC_PLUGINS": "tests.plugins.no_such_head", "PYTHONPATH": str(ROOT)},
        timeout=300,
    )
    assert p.returncode != 0 and "tests.plugins.no_such_head" in p.stderr and "RAYSVC_PLUGINS" in p.stderr


def test_the_endpoint_loads_plugins_when_its_schema_is_asked_for_not_at_import():
    """Importing the Serve application loads no plug-in (a plug-in may import any part of raysvc); the first
    /openapi.json does, and the answer's schema then has the plug-in's field beside the built-in ones."""
    code = (
        "import json, raysvc.plugins as p\n"
        "from raysvc.serve.app import api\n"
        "before = sorted(p._loaded)\n"
        "props = api.openapi()['components']['schemas']['SegmentResponse']['properties']\n"
        "print(json.dumps([before, sorted(p._loaded), list(props)]))"
    )
    p = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **ENV}, timeout=300
    )
    assert p.returncode == 0, p.stderr
    before, after, fields = json.loads(p.stdout.strip().splitlines()[-1])
    assert before == [] and after == [PLUGIN]
    assert {"deposited_energy", "instances", "event"} <= set(fields) and fields[-1] == "timing_ms"


@pytest.mark.slow
def test_a_plugin_head_fine_tunes_predicts_evaluates_and_serves(tmp_path):
    train, val = tmp_path / "train", tmp_path / "val"
    generate_dataset(resolve(str(train)), 24, 61, 12, show_progress=False)
    generate_dataset(resolve(str(val)), 6, 62, 6, show_progress=False)
    _raysvc(
        "finetune",
        str(ROOT / "jobs" / "semseg-tiny.yaml"),
        *("--set", "task=energy"),
        *tiny_finetune_sets(train, val, tmp_path, "energy", 4),
    )
    model = tmp_path / "energy"
    assert json.loads((model / "summary.json").read_text())["steps"] == 4
    record = json.loads((model / "config.json").read_text())
    assert record["outputs"] == ["energy"] and record["method"] == "energy" and record["heads"]["energy"]["hidden"]
    assert (model / "energy_head.safetensors").exists()

    # the endpoint comes up (its own Ray and Serve) while predict and evaluate run
    env = {**ENV, "RAYSVC_SERVE_TOKEN": TOKEN}
    server = ServeProcess(
        ["--model", f"e={model}", "--torch-threads", "1"], free_port(), TOKEN, tmp_path / "s.log", env
    )
    with server.launched() as srv, Commands(tmp_path) as commands:
        # predict and evaluate at once; predict: the plug-in's column, equal to the same export loaded in process
        run, plugin_env = ["--model", str(model), "--data", str(val), "--out"], {**os.environ, **ENV}
        commands.start("predict", "predict", *run, str(tmp_path / "preds"), env=plugin_env)
        commands.start("evaluate", "evaluate", *run, str(tmp_path / "eval.json"), env=plugin_env)
        commands.finished("predict")
        info = json.loads((tmp_path / "preds" / "manifest.json").read_text())
        assert info["deposited_energy_unit"] == "MeV"
        preds = pa.concat_tables([pq.read_table(tmp_path / "preds" / f) for f in info["files"]])
        assert preds.schema.field("deposited_energy").type == pa.float32()
        import tests.plugins.energy_head  # noqa: F401  (registers the head in this process too)
        from raysvc.inference.segmenter import Segmenter

        seg = Segmenter(resolve(str(model)))
        table = pa.concat_tables([read_shard(resolve(str(val)), r) for r in load_manifest(resolve(str(val))).shards])
        want = seg.predict(table)
        np.testing.assert_allclose(
            preds.column("deposited_energy").to_numpy(), [10.0 ** e["energy"] - 1 for e in want], rtol=1e-4
        )
        assert [list(p) for p in preds.column("pred").to_pylist()] == [e["pred"].tolist() for e in want]

        # evaluate: the plug-in's figure beside the segmentation metrics
        commands.finished("evaluate")
        got = json.loads((tmp_path / "eval.json").read_text())
        assert got["deposited_energy_mae_log10"] >= 0 and "miou" in got

        # serve: the field in the answer and in the OpenAPI schema
        row = table.slice(0, 1).to_pylist()[0]
        body = {"points": row["coord"], "energies": row["energy"]}
        srv.wait_ready()
        auth = {"Authorization": f"Bearer {TOKEN}"}
        r = requests.post(f"{srv.url}/v1/segment", json=body, headers=auth, timeout=120)
        assert r.status_code == 200, r.text
        answer = r.json()
        assert answer["deposited_energy"]["log10_mev"] == pytest.approx(want[0]["energy"], rel=1e-4)
        assert answer["classes"] == want[0]["pred"].tolist()
        schema = requests.get(f"{srv.url}/openapi.json", timeout=30).json()
        props = schema["components"]["schemas"]["SegmentResponse"]["properties"]
        assert "deposited_energy" in props and "instances" in props and "event" in props
        models = requests.get(f"{srv.url}/v1/models", headers=auth, timeout=30)
        assert models.json()["models"][0]["outputs"] == ["energy"]


def test_a_taken_task_name_is_an_error_naming_its_holder():
    """Plug-ins share one registry class: re-registering raysvc's own task class is a no-op; another class under its
    name is an error naming the class that holds it."""
    from raysvc.train.tasks import get_task, register_task

    seg = get_task("segmentation")
    assert register_task(seg) is seg

    class Impostor(seg):
        pass

    with pytest.raises(ValueError, match=r"another task is registered as 'segmentation' already \(raysvc\.train"):
        register_task(Impostor)
    assert get_task("segmentation") is seg
