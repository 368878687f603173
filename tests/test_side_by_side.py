"""Two raysvc jobs on one machine, each with its own private Ray, as a user runs them: two fine-tunes at once, and a
pretraining beside a serving endpoint. Each ends with the weights it gets alone, no placement group is removed, and
no process of either Ray finds "multiple active Ray instances" (a process that sees both lets one run's Ray Train
PlacementGroupCleaner ask the other Ray's State API about its controller, hear that it is gone, and remove the
healthy run's placement group)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import torch

from raysvc.inference.record import export_seeded_segmenter, load_export
from raysvc.seaweed import free_port
from raysvc.serve.process import ServeProcess
from raysvc.storage import resolve
from tests.conftest import generate_train_val

pytestmark = pytest.mark.slow

RAYSVC = str(Path(sys.executable).parent / "raysvc")
JOBS = Path(__file__).parents[1] / "jobs"
TOKEN = "side-by-side-token-0123456789"
# What Ray logs when one Ray's processes reach the other's, and when a run's placement group goes away under it.
CROSSTALK = (
    "multiple active Ray instances",
    "Cleaning up placement group",
    "placement group was removed",
    "State API may be temporarily unavailable",
)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return generate_train_val(tmp_path_factory.mktemp("sbs"), (16, 11, 8), (8, 12, 8))


@pytest.fixture
def ray_tmp():
    """Each job's Ray gets its own temp dir (short: Ray's socket paths must fit 107 bytes), so its logs can be read
    afterwards; removed at the end."""
    made: list[str] = []

    def new() -> str:
        made.append(tempfile.mkdtemp(prefix="rsbs-"))
        return made[-1]

    yield new
    for d in made:
        shutil.rmtree(d, ignore_errors=True)


def _job(kind: str, data: Path, storage: Path, name: str) -> list[str]:
    common = [
        f"data.uri={data / 'train'}",
        f"run.storage={storage}",
        f"run.name={name}",
        "scaling.workers=1",
        "scaling.cpus_per_worker=1",
        "scaling.torch_threads=1",
        "train.batch_events=2",
        "train.log_every=4",
        "run.max_failures=0",
        "run.wandb_mode=disabled",
        "data.read_cpus=0.25",
    ]
    if kind == "finetune":
        sets = [
            f"val_data.uri={data / 'val'}",
            "val_data.read_cpus=0.25",
            "train.steps=16",
            "train.val_every=8",
            "train.val_events=4",
            "train.checkpoint_every=8",
        ]
        return [RAYSVC, "finetune", str(JOBS / "semseg-tiny.yaml"), *_sets(common + sets)]
    sets = [
        f"probe_data.uri={data / 'val'}",
        "probe_data.read_cpus=0.25",
        "train.steps=8",
        "train.monitor_every=4",
        "train.checkpoint_every=4",
        "probe.every=100",
        "probe.train_events=3",
        "probe.val_events=3",
        "probe.points_per_class=300",
        "views.local_views=2",
        "views.max_points=1500",
        "panda.head_hidden=64",
        "panda.head_embed=32",
        "panda.prototypes=64",
    ]
    return [RAYSVC, "pretrain", str(JOBS / "pretrain-panda-tiny.yaml"), *_sets(common + sets)]


def _sets(sets: list[str]) -> list[str]:
    return [a for s in sets for a in ("--set", s)]


def _start(cmd: list[str], log: Path, ray_tmp: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": ray_tmp}
    return subprocess.Popen(cmd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def _finish(p: subprocess.Popen, log: Path, timeout: float = 600) -> None:
    p.wait(timeout=timeout)
    assert p.returncode == 0, log.read_text()[-4000:]


def _crosstalk(*places: str | Path) -> list[str]:
    """Lines of the CLI logs and of every Ray log file under the given places that show one Ray reaching another."""
    hits = []
    for place in map(Path, places):
        for f in [place] if place.is_file() else (p for p in place.rglob("*") if p.is_file()):
            try:
                text = f.read_text(errors="replace")
            except OSError:
                continue
            hits += [
                f"{f.name}: {line.strip()[:200]}" for line in text.splitlines() if any(c in line for c in CROSSTALK)
            ]
    return hits


def _finetuned(storage: Path, name: str) -> dict:
    return load_export(resolve(str(storage / name)))[0]


def _pretrained(storage: Path, name: str) -> dict:
    last = max((p for p in (storage / name).glob("checkpoint_*") if p.is_dir()), key=lambda p: p.name)
    return torch.load(last / "state.pt", map_location="cpu", weights_only=False)["student"]


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_finetunes_at_once_end_as_each_does_alone(data, tmp_path, ray_tmp):
    alone_tmp = ray_tmp()
    _finish(
        _start(_job("finetune", data, tmp_path, "alone"), tmp_path / "alone.log", alone_tmp), tmp_path / "alone.log"
    )
    want = _finetuned(tmp_path, "alone")

    tmps = {name: ray_tmp() for name in ("left", "right")}
    procs = {n: _start(_job("finetune", data, tmp_path, n), tmp_path / f"{n}.log", t) for n, t in tmps.items()}
    for n, p in procs.items():
        _finish(p, tmp_path / f"{n}.log")
    for n in procs:
        assert _equal(_finetuned(tmp_path, n), want), f"{n}: weights differ from the run alone"
    assert not _crosstalk(*tmps.values(), *(tmp_path / f"{n}.log" for n in procs))


@pytest.mark.long
def test_pretraining_beside_an_endpoint_ends_as_alone_and_the_endpoint_keeps_answering(data, tmp_path, ray_tmp):
    from raysvc.data.sources.lartpc_generator import GeneratorConfig, generate_event

    _finish(
        _start(_job("pretrain", data, tmp_path, "alone"), tmp_path / "alone.log", ray_tmp()), tmp_path / "alone.log"
    )
    want = _pretrained(tmp_path, "alone")

    export_seeded_segmenter(resolve(str(tmp_path / "model")), 1)
    ev = generate_event(GeneratorConfig(), 21, 0)
    body = {"points": ev["coord"].astype(np.float32).tolist(), "energies": ev["energy"].astype(np.float32).tolist()}
    serve_tmp, train_tmp = ray_tmp(), ray_tmp()
    with ServeProcess(
        ["--model", f"m={tmp_path / 'model'}", "--torch-threads", "1"],
        free_port(),
        TOKEN,
        tmp_path / "serve.log",
        env={"RAY_TMPDIR": serve_tmp},
    ) as srv:
        p = _start(_job("pretrain", data, tmp_path, "beside"), tmp_path / "beside.log", train_tmp)
        codes = []
        while p.poll() is None:  # the endpoint answers all through the pretraining
            r = requests.post(
                f"{srv.url}/v1/segment", json=body, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60
            )
            codes.append(r.status_code)
            time.sleep(0.5)
        _finish(p, tmp_path / "beside.log")
    assert len(codes) >= 10 and set(codes) == {200}, codes
    assert _equal(_pretrained(tmp_path, "beside"), want)
    assert not _crosstalk(serve_tmp, train_tmp, tmp_path / "serve.log", tmp_path / "beside.log")
