"""`raysvc results run` on a miniature experiment, end to end with real training (a few minutes on 2 cores): tiny
generated sets from four seeds, one Panda pretraining of 2 steps, a scratch and a Panda arm fine-tuned 2 steps at one
label count with 2 seeds, each scored on the test set; then the records, the rebuilt tables, `--check`, and a resumed
run that does nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
KEYS = ["config", "seeds", "split", "metrics", "git_commit", "wall_s"]

SMALL = [
    "scaling.workers=1",
    "scaling.cpus_per_worker=0.5",
    "scaling.torch_threads=1",
    "train.steps=2",
    "train.checkpoint_every=2",
    "train.log_every=1",
    "train.batch_events=2",
    "run.max_failures=0",
    "run.wandb_mode=disabled",
    "data.read_cpus=0.25",
]

SPEC = {
    "name": "mini",
    "storage": "runs",
    "data": {
        "pretrain": {"uri": "runs/data/pretrain", "events": 8, "seed": 43, "shard_events": 4},
        "train": {"uri": "runs/data/train", "events": 16, "seed": 40, "shard_events": 8},
        "val": {"uri": "runs/data/val", "events": 6, "seed": 41, "shard_events": 3},
        "test": {"uri": "runs/data/test", "events": 8, "seed": 42, "shard_events": 4},
    },
    "split": {"train": "train", "validation": "val", "test": "test"},
    "pretrain": {
        "panda": {
            "job": f"{ROOT}/jobs/pretrain-panda-tiny.yaml",
            "set": [
                "data.uri={data.pretrain}",
                "probe_data.uri={data.val}",
                "probe.every=100",
                "probe.train_events=2",
                "probe.val_events=2",
                "probe.points_per_class=100",
                "views.local_views=2",
                "views.max_points=1000",
                "panda.head_hidden=32",
                "panda.head_embed=16",
                "panda.prototypes=32",
                "train.monitor_every=1",
                "probe_data.read_cpus=0.25",
                *SMALL,
            ],
        }
    },
    "finetune": {
        "job": f"{ROOT}/jobs/semseg-100-tiny.yaml",
        "set": [
            "data.uri={data.train}",
            "val_data.uri={data.val}",
            "train.val_every=2",
            "train.val_events=4",
            "val_data.read_cpus=0.25",
            *SMALL,
        ],
    },
    "arms": {
        "scratch": {"set": ["model.mode=scratch", "model.center_events=true"]},
        "panda": {"backbone": "panda", "set": ["model.mode=fft"]},
    },
    "factors": {"labels": {"values": [8], "set": ["data.subset_events={labels}", "data.subset_seed={seed}"]}},
    "seeds": {"finetune": [0, 1], "pretrain": [0]},
    "test": {"data": "test", "batch_events": 2},
    "probes": {"fit_data": "val", "data": "test", "train_events": 2, "val_events": 2, "points_per_class": 100},
    "tables": [
        {
            "name": "mini",
            "rows": "labels",
            "control": "scratch",
            "metrics": {"test mIoU": "test.miou", "val mIoU": "validation.miou"},
        },
        {"name": "mini-probe", "arms": ["probe-panda"], "metrics": {"token F1": "test.token.mean_f1"}},
    ],
    "plots": [{"file": "mini.png", "x": "labels", "metrics": {"test mIoU": "test.miou"}}],
}

README = """# mini

<!-- table:mini -->
<!-- /table:mini -->

<!-- table:mini-probe -->
<!-- /table:mini-probe -->
"""


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "raysvc.cli", "results", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_results_run_runs_a_miniature_experiment_end_to_end(ray_local, tmp_path, monkeypatch):
    from raysvc.train.experiment import run_experiment

    exp = tmp_path / "results" / "mini"
    exp.mkdir(parents=True)
    (exp / "experiment.yaml").write_text(yaml.safe_dump(SPEC, sort_keys=False))
    (exp / "README.md").write_text(README)
    monkeypatch.chdir(tmp_path)

    dry = _cli("run", "results/mini", "--dry-run", cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    assert [line.split()[2].rstrip(":") for line in dry.stdout.splitlines()] == [
        "mini-pretrain-panda-p0",
        "scratch-labels8-s0",
        "scratch-labels8-s1",
        "panda-labels8-p0-s0",
        "panda-labels8-p0-s1",
        "probe-panda-p0",
    ]
    assert "--fit-data runs/data/val --train-events 2" in dry.stdout.splitlines()[-1]
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing

    run_experiment(exp, log=lambda _: None)
    recs = {p.stem: json.loads(p.read_text()) for p in sorted((exp / "runs").glob("*.json"))}
    probe = recs.pop("probe-panda-p0")
    assert sorted(recs) == ["panda-labels8-p0-s0", "panda-labels8-p0-s1", "scratch-labels8-s0", "scratch-labels8-s1"]
    assert list(probe) == KEYS and probe["config"]["init"] == "runs/mini-pretrain-panda-p0"
    assert probe["split"]["train"]["events"] == 2 and probe["split"]["test"]["events"] == 2
    assert probe["seeds"] == {
        "probe": 0,
        "pretrain": 0,
        "data": {"train": ["generated lartpc seed 41"]} | {"test": ["generated lartpc seed 42"]},  # fit on val
    }
    for name, rec in recs.items():
        assert list(rec) == KEYS
        assert set(rec["split"]) == {"train", "validation", "test"}
        assert rec["split"]["test"]["origins"][0]["origin"] == "generated lartpc seed 42"
        assert rec["split"]["train"]["events"] == 8  # the label subset, not the whole set
        assert set(rec["metrics"]["test"]["iou"]) == {"shower", "track", "michel", "delta", "led"}
        assert rec["config"]["job"]["train"]["steps"] == 2 and rec["config"]["experiment"]["run"] == name
        assert str(tmp_path) not in json.dumps(rec)
    assert recs["panda-labels8-p0-s1"]["seeds"] | {"data": None} == {
        "finetune": 1,
        "subset": 1,
        "pretrain": 0,
        "data": None,
    }
    assert recs["panda-labels8-p0-s0"]["config"]["job"]["model"]["init"] == "runs/mini-pretrain-panda-p0"

    table = _cli("table", "results/mini", cwd=tmp_path)
    assert table.returncode == 0, table.stderr
    text = (exp / "README.md").read_text()
    miou = {n: r["metrics"]["test"]["miou"] for n, r in recs.items()}
    mean = (miou["scratch-labels8-s0"] + miou["scratch-labels8-s1"]) / 2
    assert f"| 8 | scratch | 2 | {mean:.3f} ± " in text
    assert "1 comparisons" in text and "| 8 | panda - scratch | 2 |" in text
    assert (exp / "mini.png").read_bytes()[:4] == b"\x89PNG"
    assert f"| probe-panda | 1 | {probe['metrics']['test']['token']['mean_f1']:.3f} |" in text
    assert _cli("table", "results/mini", "--check", cwd=tmp_path).returncode == 0

    (exp / "README.md").write_text(text.replace(f"{mean:.3f} ± ", f"{mean + 0.1:.3f} ± ", 1))
    bad = _cli("table", "results/mini", "--check", cwd=tmp_path)
    assert bad.returncode == 1 and "table mini, line 3" in bad.stdout

    again = _cli("run", "results/mini", "--dry-run", cwd=tmp_path)
    assert all(line.startswith("done") for line in again.stdout.splitlines())
    before = {p: p.stat().st_mtime_ns for p in (exp / "runs").glob("*.json")}
    run_experiment(exp, log=lambda _: None)  # resumes: the data checked against the spec, every run skipped
    assert {p: p.stat().st_mtime_ns for p in (exp / "runs").glob("*.json")} == before


@pytest.mark.slow
def test_ctrl_c_stops_results_run_and_says_how_to_resume(tmp_path):
    """Ctrl-C (SIGINT to the process group) during a pretraining: Ray Train aborts the run in its own SIGINT handler
    and exits from it; the command must still end with 130 and say, on the console and in its log file, that it was
    interrupted and that re-running resumes, with Ray's last lines kept off the console. Before that, the console
    showed a progress line for each data set generated."""
    pretrain = SPEC["pretrain"]["panda"]
    steps = [s for s in pretrain["set"] if not s.startswith("train.steps")] + ["train.steps=40"]
    spec = {**SPEC, "pretrain": {"panda": {**pretrain, "set": steps}}}
    exp = tmp_path / "results" / "mini"
    exp.mkdir(parents=True)
    (exp / "experiment.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    (exp / "README.md").write_text(README)
    proc = subprocess.Popen(
        [sys.executable, "-m", "raysvc.cli", "results", "run", "results/mini"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("[raysvc] step 3/40"):  # checkpointed at step 2
            os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C at a terminal does
            break
    lines += proc.stdout.readlines()
    out = "".join(lines)
    assert proc.wait(timeout=120) == 130, out
    said = [line for line in lines if "interrupted" in line]
    assert said == [
        "raysvc: results run interrupted; run the same command again to resume: finished runs are skipped and an "
        "interrupted run restarts from its last checkpoint\n"
    ], out
    assert "Traceback" not in out and "\x1b" not in out and "pid=" not in out
    assert "[raysvc] generating 8 events: 2/2 shards (100%)" in out  # the test set's progress line
    (log,) = (tmp_path / "runs" / "logs").glob("results-run-*.log")
    assert said[0] in log.read_text()
    run = tmp_path / "runs" / "mini-pretrain-panda-p0"
    assert list(run.glob("checkpoint_*")) and not (run / "summary.json").exists()
    assert not (exp / "runs").exists()  # nothing ran after the pretraining
