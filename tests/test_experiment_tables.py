"""Tables declared in an experiment.yaml, rebuilt from run records: every committed results/<experiment>/ README
equals its rebuild; a fabricated experiment's table is checked against means, sds and a paired t-test computed here
by hand, its verdicts against the Bonferroni rule, and a hand edit fails `--check` naming the line."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy.stats import t as student_t

from raysvc.reports import check, default_runs, rebuild

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p.parent for p in (ROOT / "results").glob("*/experiment.yaml"))
KEYS = ("config", "seeds", "split", "metrics", "git_commit", "wall_s")


@pytest.mark.parametrize("folder", EXPERIMENTS, ids=[p.name for p in EXPERIMENTS])
def test_every_committed_experiment_table_matches_its_runs(folder):
    assert check(folder, default_runs(folder)) is None


@pytest.mark.parametrize("folder", EXPERIMENTS, ids=[p.name for p in EXPERIMENTS])
def test_every_experiment_spec_plans_valid_jobs(folder):
    from raysvc.train.experiment import run_experiment

    runs = run_experiment(folder, dry_run=True)  # loads and validates every job config
    assert runs and {r["kind"] for r in runs} <= {"pretrain", "finetune", "probe"}


def test_results_hold_data_plots_and_readmes_only():
    allowed = {".json", ".png", ".md", ".txt", ".yaml"}
    stray = [str(p.relative_to(ROOT)) for p in (ROOT / "results").rglob("*") if p.is_file()]
    stray = [p for p in stray if Path(p).suffix not in allowed]
    assert not stray, f"results/ holds files that are neither data, plots nor READMEs: {stray}"


# --- a fabricated experiment ---------------------------------------------------------------------------------------

SPEC = {
    "name": "fab",
    "arms": {"scratch": {}, "good": {}, "same": {}},
    "factors": {"labels": {"values": [10, 100]}},
    "tables": [
        {"name": "fab", "rows": "labels", "control": "scratch", "metrics": {"mIoU": "test.miou", "LED": "test.iou.led"}}
    ],
}
MIOU = {  # arm -> labels -> per seed
    "scratch": {10: [0.50, 0.52, 0.49], 100: [0.60, 0.61, 0.62]},
    "good": {10: [0.70, 0.73, 0.71], 100: [0.61, 0.63, 0.60]},
    "same": {10: [0.51, 0.50, 0.53], 100: [0.605, 0.62, 0.61]},
}


def _write(folder: Path) -> None:
    (folder / "runs").mkdir(parents=True)
    (folder / "experiment.yaml").write_text(yaml.safe_dump(SPEC, sort_keys=False))
    (folder / "README.md").write_text("# fab\n\nprose\n\n<!-- table:fab -->\n<!-- /table:fab -->\n\nmore prose\n")
    for arm, by_labels in MIOU.items():
        for labels, vals in by_labels.items():
            for seed, v in enumerate(vals):
                rec = dict.fromkeys(KEYS)
                rec["config"] = {
                    "experiment": {
                        "run": f"{arm}-{labels}-s{seed}",
                        "arm": arm,
                        "factors": {"labels": labels},
                        "seed": seed,
                    }
                }
                rec["metrics"] = {"test": {"miou": v, "iou": {"led": 0.9}}}
                (folder / "runs" / f"{arm}-{labels}-s{seed}.json").write_text(json.dumps(rec))


def _paired_p(a: list[float], b: list[float]) -> float:
    d = np.array(a) - np.array(b)
    t = d.mean() / (d.std(ddof=1) / math.sqrt(len(d)))
    return float(2 * student_t.sf(abs(t), len(d) - 1))


def test_a_declared_table_is_rebuilt_from_records_and_a_hand_edit_fails_the_check(tmp_path):
    folder = tmp_path / "fab"
    _write(folder)
    assert rebuild(folder, folder / "runs")
    text = (folder / "README.md").read_text()
    assert text.startswith("# fab\n\nprose\n\n<!-- table:fab -->\n") and text.endswith(
        "<!-- /table:fab -->\n\nmore prose\n"
    )
    for arm, by_labels in MIOU.items():
        for labels, vals in by_labels.items():
            assert (
                f"| {labels} | {arm} | 3 | {np.mean(vals):.3f} ± {np.std(vals, ddof=1):.3f} | 0.900 ± 0.000 |" in text
            )
    m = 4  # good and same against scratch, at two label counts
    assert f"{m} comparisons, Bonferroni" in text
    for arm in ("good", "same"):
        for labels in (10, 100):
            p = _paired_p(MIOU[arm][labels], MIOU["scratch"][labels])
            verdict = "better" if np.mean(MIOU[arm][labels]) > np.mean(MIOU["scratch"][labels]) else "worse"
            verdict = verdict if p * m < 0.05 else "level"
            row = next(line for line in text.splitlines() if line.startswith(f"| {labels} | {arm} - scratch |"))
            assert f"| {p:.3f} | {min(1, p * m):.3f} | {verdict} |" in row, row
    assert "| 10 | good - scratch |" in text and "better" in text and "level" in text  # both verdicts occur

    assert check(folder, folder / "runs") is None
    assert not rebuild(folder, folder / "runs")  # nothing changes the second time

    edited = text.replace("| 10 | good | 3 | 0.713", "| 10 | good | 3 | 0.813", 1)
    assert edited != text
    (folder / "README.md").write_text(edited)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-m", "raysvc.cli", "results", "table", str(folder), "--check"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1
    assert "table fab, line 4" in out.stdout and "committed: | 10 | good | 3 | 0.813" in out.stdout


def test_records_without_the_six_keys_are_refused(tmp_path):
    folder = tmp_path / "fab"
    _write(folder)
    bad = folder / "runs" / "good-10-s0.json"
    rec = json.loads(bad.read_text())
    rec["extra"] = 1
    bad.write_text(json.dumps(rec))
    with pytest.raises(ValueError, match="good-10-s0.json: a run record has the top-level keys"):
        check(folder, folder / "runs")


def test_an_experiment_without_runs_says_they_are_pending(tmp_path):
    folder = tmp_path / "fab"
    _write(folder)
    for f in (folder / "runs").iterdir():
        f.unlink()
    rebuild(folder, folder / "runs")
    assert (
        "_Runs pending: no run records under runs/ yet (`raysvc results run results/fab`"
        in (folder / "README.md").read_text()
    )


def test_a_table_of_its_own_arms_without_a_control_compares_nothing(tmp_path):
    folder = tmp_path / "fab"
    _write(folder)
    spec = yaml.safe_load((folder / "experiment.yaml").read_text())
    spec["tables"] = [{"name": "fab", "rows": "labels", "arms": ["good"], "metrics": {"mIoU": "test.miou"}}]
    (folder / "experiment.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    rebuild(folder, folder / "runs")
    table = (folder / "README.md").read_text().split("<!-- table:fab -->\n")[1].split("<!-- /table:fab -->")[0]
    assert table.splitlines() == [
        "| labels | arm | runs | mIoU |",
        "|---|---|---|---|",
        f"| 10 | good | 3 | {np.mean(MIOU['good'][10]):.3f} ± {np.std(MIOU['good'][10], ddof=1):.3f} |",
        f"| 100 | good | 3 | {np.mean(MIOU['good'][100]):.3f} ± {np.std(MIOU['good'][100], ddof=1):.3f} |",
    ]
