"""A model from elsewhere through the real command line: a pimm export directory shaped like Panda-Base (PT-v3m2:
linear stem, layer scale, mask token, the four orders) fine-tunes with `raysvc finetune --init`, the result goes back
to pimm's layout, and that directory predicts and serves directly, its licence carried all the way and printed by
`serve`. Once at tiny widths (CI) and once at Panda-Base's own size, 90.8 M parameters (`long`: minutes on 2 cores)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
import requests
import torch

from raysvc.data.sources.synthetic import generate_dataset
from raysvc.data.streaming.shards import load_manifest, read_shard
from raysvc.hub.pimm import write_pimm
from raysvc.hub.reference import config_to_reference, state_to_reference
from raysvc.inference.record import ModelSpec
from raysvc.models.ptv3 import PTv3, preset
from raysvc.seaweed import free_port
from raysvc.serve.process import ServeProcess
from raysvc.storage import resolve
from tests.conftest import Commands, tiny_finetune_sets

ROOT = Path(__file__).resolve().parents[1]
RAYSVC = str(Path(sys.executable).parent / "raysvc")
TOKEN = "weights-token-0123456789abcdef"
# Panda-Base's PT-v3m2 choices at tiny widths
PANDA_TINY_WIDTHS = dict(
    depths=(1, 1, 1, 1, 1),
    channels=(16, 32, 64, 128, 192),
    heads=(1, 2, 4, 8, 12),
    patch_size=128,
    layer_scale=1e-5,
    mask_token=True,
)


def _raysvc(*args) -> subprocess.CompletedProcess:
    p = subprocess.run([RAYSVC, *args], capture_output=True, text=True, env=dict(os.environ), timeout=900)
    assert p.returncode == 0, f"raysvc {' '.join(args)}:\n{p.stdout}\n{p.stderr}"
    return p


def pimm_backbone(folder: Path, shape: dict) -> None:
    """A pimm export directory as pimm writes one (no raysvc record): the encoder and an MIT model card."""
    cfg = preset("base", **shape)
    torch.manual_seed(0)
    state = PTv3(cfg).state_dict()
    folder.mkdir()
    write_pimm(str(folder), state_to_reference(state, cfg), config_to_reference(cfg))
    (folder / "README.md").write_text("---\nlicense: mit\nlibrary_name: pimm\n---\n\nPanda-shaped test encoder\n")


@pytest.mark.slow
def test_a_panda_shaped_pimm_encoder_fine_tunes_predicts_and_serves(tmp_path):
    fine_tune_predict_serve(tmp_path, PANDA_TINY_WIDTHS)


@pytest.mark.long
@pytest.mark.timeout(3600)
def test_a_panda_base_size_pimm_encoder_fine_tunes_predicts_and_serves(tmp_path):
    fine_tune_predict_serve(tmp_path, dict(mask_token=True))


def fine_tune_predict_serve(tmp_path: Path, shape: dict) -> None:
    train, val = tmp_path / "train", tmp_path / "val"
    generate_dataset(resolve(str(train)), 12, 71, 12, show_progress=False)
    generate_dataset(resolve(str(val)), 4, 72, 4, show_progress=False)
    pimm_backbone(tmp_path / "panda", shape)

    # a foreign encoder cannot predict: it has no head, and the command says what to do
    p = subprocess.run(
        [RAYSVC, "predict", "--model", str(tmp_path / "panda"), "--data", str(val), "--out", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 2 and "panda does not state detector, grid_voxels, center_events" in p.stderr

    _raysvc(
        "finetune",
        str(ROOT / "jobs" / "semseg-tiny.yaml"),
        *("--init", str(tmp_path / "panda"), "--set", "model.mode=fft"),
        *tiny_finetune_sets(train, val, tmp_path, "ft", 3),
    )
    run = tmp_path / "ft"
    assert json.loads((run / "summary.json").read_text())["steps"] == 3
    record = json.loads((run / "config.json").read_text())
    assert record["licence"] == "mit" and record["model"]["size"] == "base"
    cfg = ModelSpec(**record["model"]).backbone_config()  # the imported encoder's, not the job file's tiny PTv3
    assert cfg == preset("base", **shape, serialization_depth="batch", in_channels=4)

    # back to pimm's layout (a DefaultSegmentorV2), which predicts and serves directly; the endpoint comes up while
    # the predictions run
    _raysvc("weights", "export", str(run), "--format", "pimm", "--out", str(tmp_path / "ft-pimm"))
    server = ServeProcess(
        ["--model", f"panda={tmp_path / 'ft-pimm'}", "--torch-threads", "1"], free_port(), TOKEN, tmp_path / "serve.log"
    )
    with server.launched() as srv, Commands(tmp_path) as commands:
        models = {"preds": tmp_path / "ft-pimm", "preds-run": run}  # the pimm layout and the run it came from
        for name, model in models.items():
            commands.start(name, "predict", "--model", str(model), "--data", str(val), "--out", str(tmp_path / name))
        for name in models:
            commands.finished(name)
            assert json.loads((tmp_path / name / "manifest.json").read_text())["events"] == 4
        table = pa.concat_tables([read_shard(resolve(str(val)), r) for r in load_manifest(resolve(str(val))).shards])
        row = table.slice(0, 1).to_pylist()[0]
        srv.wait_ready()
        r = requests.post(
            f"{srv.url}/v1/segment",
            json={"points": row["coord"], "energies": row["energy"]},
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=120,
        )
        assert r.status_code == 200, r.text
        assert len(r.json()["classes"]) == len(row["coord"])
    assert "model panda: licence mit" in (tmp_path / "serve.log").read_text()
