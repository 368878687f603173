"""A detector defined outside raysvc (tests/plugins/toy_detector.py: a 100-unit cube, one feature channel, three
classes, its own generator) works in every command once registered: through RAYSVC_PLUGINS or a `raysvc.detectors`
entry point, in the CLI, its subprocesses and Ray's workers, with no file under raysvc/ naming it."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from raysvc.data.contract.detectors import DETECTORS, LARTPC, register_detector
from raysvc.data.streaming.transforms import PreprocessConfig

REPO = Path(__file__).parents[1]
RAYSVC = str(Path(sys.executable).parent / "raysvc")
PLUGIN = "tests.plugins.toy_detector"
TOY_CLASSES = ["blob", "line", "noise"]
# what a job that states no preprocess gets on toy events: the cube's frame and the toy's cuts
TOY_PREPROCESS = {
    "center": 50.0,
    "scale": 100 * math.sqrt(3) / 2,
    "volume": 100.0,
    "energy_threshold": 0.0,
    "min_points": 8,
    "log_emax": 10.0,
}


def _env(plugins: str | None = PLUGIN, path: tuple[str, ...] = ()) -> dict:
    """This process's environment with the repository root (and `path`) on PYTHONPATH, where the plug-in module lives,
    and RAYSVC_PLUGINS naming it (None: no plug-ins)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAYSVC_PLUGINS")}
    env["PYTHONPATH"] = os.pathsep.join([*path, str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    if plugins is not None:
        env["RAYSVC_PLUGINS"] = plugins
    return env


def raysvc(*args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([RAYSVC, *args], capture_output=True, text=True, env=env or _env(), timeout=900)
    if check and p.returncode != 0:
        raise AssertionError(
            f"raysvc {' '.join(args)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
        )
    return p


def _registered(env: dict) -> subprocess.CompletedProcess:
    """The detectors a fresh Python process registers under `env`."""
    code = "from raysvc.data.contract.detectors import detector_names; print(detector_names())"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


@pytest.fixture
def registry():
    """The registry as it was, restored after the test."""
    saved = dict(DETECTORS)
    yield DETECTORS
    DETECTORS.clear()
    DETECTORS.update(saved)


def test_no_file_under_raysvc_names_the_plugin():
    named = re.compile(r"toy_detector|tests\.plugins|['\"]toy['\"]")
    hits = [p for p in (REPO / "raysvc").rglob("*") if p.is_file() and named.search(p.read_text(errors="ignore"))]
    assert hits == []


def test_the_plugin_variable_and_the_entry_point_group_register_it(tmp_path):
    assert _registered(_env(None)).stdout.strip() == "['lartpc', 'wch']"
    assert _registered(_env()).stdout.strip() == "['lartpc', 'toy', 'wch']"
    bad = _registered(_env("tests.plugins.nowhere"))
    assert (
        bad.returncode != 0 and "plug-in 'tests.plugins.nowhere' (from RAYSVC_PLUGINS) failed to import" in bad.stderr
    )
    # an installed package's entry point: a distribution's metadata on the path is what an install leaves
    dist = tmp_path / "toy_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[raysvc.detectors]\ntoy = {PLUGIN}:TOY\n")
    assert _registered(_env(None, (str(tmp_path),))).stdout.strip() == "['lartpc', 'toy', 'wch']"


def test_a_plugin_detector_decides_its_preprocessing_and_generator(registry):
    from raysvc.data.sources.synthetic import generator_for
    from tests.plugins.toy_detector import TOY, ToyConfig, draw

    registry["toy"] = TOY  # what importing the module did, unless an earlier test imported it already
    assert PreprocessConfig().resolved(TOY).model_dump() == {**PreprocessConfig().model_dump(), **TOY_PREPROCESS}
    assert TOY.in_channels == 4 and list(TOY.class_names) == TOY_CLASSES
    assert generator_for("toy") == (ToyConfig, draw)
    assert register_detector(TOY) is TOY  # the same record again: a no-op
    assert register_detector(replace(TOY)) == TOY  # an equal record (a module imported twice): a no-op too
    with pytest.raises(ValueError, match="another detector is registered as 'toy'"):
        register_detector(replace(TOY, extent=200.0))
    with pytest.raises(ValueError, match="preprocess must give exactly"):
        replace(LARTPC, name="cutless", preprocess={})


def test_generate_inspect_show_verify_through_the_cli(tmp_path):
    assert "lartpc, toy, wch" in raysvc("data", "generate", "--help").stdout  # the choices are the registry's
    out = str(tmp_path / "toy")
    raysvc("data", "generate", "--detector", "toy", "--events", "6", "--seed", "1", "--out", out, "--shard-events", "3")
    assert json.loads((tmp_path / "toy" / "manifest.json").read_text())["detector"] == "toy"
    stats = json.loads(raysvc("data", "inspect", out, "--json").stdout)
    assert (stats["detector"], stats["events"], stats["shards"]) == ("toy", 6, 2)
    assert list(stats["class_fractions"]) == TOY_CLASSES
    assert json.loads(raysvc("data", "verify", out).stdout)["bad_events"] == 0
    png = tmp_path / "ev.png"
    raysvc("data", "show", out, "--event", "2", "--out", str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # without the plug-in the same dataset is refused by name, with the way to register it
    p = raysvc("data", "inspect", out, env=_env(None), check=False)
    assert p.returncode == 2 and "unknown detector 'toy'" in p.stderr and "RAYSVC_PLUGINS" in p.stderr


@pytest.mark.slow
def test_finetune_on_the_plugin_detector_trains_and_exports_its_classes(tmp_path):
    """The real `raysvc finetune` (Ray Train, its read tasks and workers in processes of their own) on toy events:
    the toy's classes and preprocessing in the export, and `raysvc evaluate` of it on the same terms."""
    for name, seed in (("train", 1), ("val", 2)):
        raysvc(
            "data",
            "generate",
            "--detector",
            "toy",
            "--events",
            "8",
            "--seed",
            str(seed),
            "--out",
            str(tmp_path / name),
            "--shard-events",
            "4",
            "--workers",
            "1",
        )
    sets = [
        f"data.uri={tmp_path / 'train'}",
        f"val_data.uri={tmp_path / 'val'}",
        f"run.storage={tmp_path / 'runs'}",
        "run.name=toy",
        "train.steps=4",
        "train.batch_events=2",
        "train.val_every=4",
        "train.checkpoint_every=4",
        "train.log_every=2",
        "scaling.cpus_per_worker=0.5",
        "scaling.torch_threads=1",
        "data.read_cpus=0.25",
        "val_data.read_cpus=0.25",
        "run.max_failures=0",
        "run.wandb_mode=disabled",
    ]
    raysvc("finetune", str(REPO / "jobs" / "semseg-tiny.yaml"), *[a for s in sets for a in ("--set", s)])
    run = tmp_path / "runs" / "toy"
    record = json.loads((run / "config.json").read_text())
    assert (record["detector"], record["class_names"]) == ("toy", TOY_CLASSES)
    assert {k: record["preprocess"][k] for k in TOY_PREPROCESS} == pytest.approx(TOY_PREPROCESS)
    assert record["model"]["overrides"] == {}  # 4 input channels, as the preset has
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 4 and list(summary["val"]["iou"]) == TOY_CLASSES
    assert summary["config"]["data"]["preprocess"] == record["preprocess"]
    result = json.loads(
        raysvc("evaluate", "--model", str(run), "--data", str(tmp_path / "val"), "--actors", "0").stdout
    )
    assert list(result["iou"]) == TOY_CLASSES
