"""`raysvc results table`: a fake cross-experiment (run directories shaped like the real ones, a tiny generated
held-out set and predictions for it) rebuilt through the command line. The README gets every table between its
markers with figures recomputed here independently; a second rebuild changes nothing; `--check` passes, and fails
naming the cell after a number is edited by hand; missing runs are named."""

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
from scipy.stats import ttest_ind
from sklearn.metrics import roc_auc_score

from raysvc.data.sources.synthetic import generate_dataset
from raysvc.data.sources.wch_generator import WChGeneratorConfig
from raysvc.inference.event_metrics import efficiency_at_rejection
from raysvc.reports import cross_experiment as cx
from raysvc.reports.readme import tables_in
from raysvc.storage import resolve

ROOT = Path(__file__).resolve().parents[1]
SEEDS = (0, 1, 2)
CLASSES = ("shower", "track", "michel", "delta", "led")


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "raysvc.cli", "results", "table", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _summary(runs: Path, run: str, summary: dict) -> None:
    (runs / run).mkdir(parents=True)
    (runs / run / "summary.json").write_text(json.dumps(summary))


def _confusion(rng: np.random.Generator) -> list[list[int]]:
    return rng.integers(0, 30, (3, 3)).tolist()


def _recall(cm: list[list[int]], k: int) -> float:
    return cm[k][k] / max(sum(cm[k]), 1)


def _mean_sd(xs) -> str:
    return f"{np.mean(xs):.3f} ± {np.std(xs, ddof=1):.3f}"


@pytest.fixture(scope="module")
def experiment(tmp_path_factory) -> tuple[Path, Path, dict]:
    """(the experiment folder, its runs, the figures written into them), after one `raysvc results table`."""
    tmp = tmp_path_factory.mktemp("results")
    folder, runs = tmp / "cross-experiment", tmp / "runs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    figs: dict[str, dict] = {}

    for arms in cx.PROBES.values():
        for _, run, det in arms:
            curve = {"curve": [[0, 0.3], [100, float(rng.uniform(0.3, 0.5))]]}
            path = runs / run / "summary.json"
            probe = json.loads(path.read_text())["probe"] if path.exists() else {}
            if det:
                probe[det] = curve
            else:
                probe = curve
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"probe": probe}))

    for prefix in ("rings-scratch-cfalse", "rings-scratch-ctrue"):
        for s in SEEDS:
            val = {"miou": rng.uniform(0.1, 0.3), "ring_accuracy": rng.uniform(0.4, 0.6)}
            val["ring_count_confusion"] = _confusion(rng)
            figs[f"{prefix}-s{s}"] = val
            _summary(runs, f"{prefix}-s{s}", {"val": val})

    # the held-out single-particle set: e, mu and pi0 events (seed 7 gives all three)
    gen = WChGeneratorConfig(
        particles={1: 1.0},
        species={"electron": 1.0, "muon": 1.0, "pi0": 1.0},
        kinetic_mev=(50.0, 100.0),
        dark_rate_khz=0.0,
    )
    generate_dataset(resolve(str(runs / cx.PID_DATA)), 18, 7, 18, gen, show_progress=False, detector="wch")
    event_ids, pid = cx.pid_labels(runs)
    assert {0, 1, 2} <= set(pid.tolist())
    events = {"electron": int((pid == 0).sum()), "muon": int((pid == 1).sum()), "pi0": int((pid == 2).sum())}
    for prefix, arms in cx.PID_ARMS.items():
        for arm in arms:
            for s in SEEDS:
                run = f"{prefix}-{arm}-s{s}"
                val = {
                    "miou": rng.uniform(0.1, 0.4),
                    "ring_accuracy": rng.uniform(0.6, 0.75),
                    "ring_count_confusion": _confusion(rng),
                    "pid": {
                        "e_eff_at_mu_rej_999": rng.uniform(0, 0.05),
                        "e_eff_at_pi0_rej_95": rng.uniform(0, 0.1),
                        "events": events,
                        "detail": {"mu_rej_999": {"achievable": True}},
                    },
                }
                figs[run] = val
                _summary(runs, run, {"val": val})
                probs = rng.dirichlet([1.0, 1.0, 1.0], len(event_ids)).astype(np.float32)
                figs[f"preds/{run}"] = probs[:, 0]
                out = runs / "preds" / run
                out.mkdir(parents=True)
                preds = pa.table(
                    {
                        "event_id": pa.array(event_ids, pa.int64()),
                        "pid_probs": pa.array(probs.tolist(), pa.list_(pa.float32())),
                    }
                )
                pq.write_table(preds, out / "part-00000.parquet")
                (out / "manifest.json").write_text(json.dumps({"files": ["part-00000.parquet"]}))
    figs["pid"] = pid

    for run in [f"semseg-100-from-{b}-s{s}" for b in ("lartpc", "cross-mixed") for s in SEEDS] + [
        "semseg-100-from-cross"
    ]:
        val = {"miou": rng.uniform(0.55, 0.6), "iou": {c: rng.uniform(0, 0.9) for c in CLASSES}}
        figs[run] = val
        _summary(runs, run, {"val": val})

    names = ["rings-frame", *(f"{p}-{t}" for p in ("pid", "pid1600") for t in ("means", "auc", "runs"))]
    names += ["semseg-means", "semseg-runs", "semseg-welch"]
    marked = "\n\n".join(f"Some prose.\n\n<!-- table:{n} -->\nnot built yet\n<!-- /table:{n} -->" for n in names)
    (folder / "README.md").write_text(f"# a fake experiment\n\n{marked}\n\nThe end.\n")
    out = _cli(str(folder), "--runs", str(runs))
    assert out.returncode == 0 and "tables rebuilt" in out.stdout, out.stdout + out.stderr
    return folder, runs, figs


def test_rebuild_writes_the_tables_between_markers(experiment):
    folder, runs, figs = experiment
    text = (folder / "README.md").read_text()
    tables = tables_in(text)
    assert text.startswith("# a fake experiment\n\nSome prose.\n\n") and text.endswith("\n\nThe end.\n")
    assert "not built yet" not in text
    for png in ("probes.png", "pid-roc.png", "pid1600-roc.png"):
        assert (folder / png).stat().st_size > 0, png

    # rings-frame: per arm mean ± sd, and Welch's p per figure between the two input frames
    cols = {}
    for label, prefix in (("tank frame", "rings-scratch-cfalse"), ("centred events", "rings-scratch-ctrue")):
        vals = [figs[f"{prefix}-s{s}"] for s in SEEDS]
        cols[label] = [[v["miou"] for v in vals], [v["ring_accuracy"] for v in vals]]
        cols[label] += [[_recall(v["ring_count_confusion"], k) for v in vals] for k in range(3)]
        assert f"| {label} | 3 | " + " | ".join(map(_mean_sd, cols[label])) + " |" in tables["rings-frame"]
        row = figs[f"{prefix}-s1"]
        assert f"| {label} | 1 | {row['miou']:.3f} | {row['ring_accuracy']:.3f} |" in tables["rings-frame"]
    p = [ttest_ind(a, b, equal_var=False).pvalue for a, b in zip(*cols.values(), strict=True)]
    assert "| Welch p | | " + " | ".join(f"{x:.2f}" for x in p) + " |" in tables["rings-frame"]

    # PID at 1,600 steps: the runs' own figures, and ROC AUCs from their predictions and the set's labels
    pid = figs["pid"]
    vals = [figs[f"pid1600-cross-s{s}"] for s in SEEDS]
    want = [
        [v["miou"] for v in vals],
        [v["ring_accuracy"] for v in vals],
        [v["pid"]["e_eff_at_mu_rej_999"] for v in vals],
        [v["pid"]["e_eff_at_pi0_rej_95"] for v in vals],
    ]
    assert "| cross Panda (mixed), fft | 3 | " + " | ".join(map(_mean_sd, want)) + " |" in tables["pid1600-means"]
    scores = [figs[f"preds/pid1600-cross-s{s}"] for s in SEEDS]
    mu, pi0 = (pid == 0) | (pid == 1), (pid == 0) | (pid == 2)
    auc_mu = [roc_auc_score(pid[mu] == 0, e[mu]) for e in scores]
    auc_pi0 = [roc_auc_score(pid[pi0] == 0, e[pi0]) for e in scores]
    eff = [efficiency_at_rejection(e[pid == 0], e[pid == 1], 0.99)["efficiency"] for e in scores]
    row = "| cross Panda (mixed) | 3 | " + " | ".join(map(_mean_sd, (auc_mu, auc_pi0, eff))) + " |"
    assert row in tables["pid1600-auc"]
    assert f"| {auc_mu[2]:.3f} | {auc_pi0[2]:.3f} | {vals[2]['ring_count_confusion']} |" in tables["pid1600-runs"]
    assert str(figs["pid-wch-s0"]["pid"]["events"]) in tables["pid-runs"]
    assert len(tables["pid-runs"].splitlines()) == 2 + 3 * 3 and len(tables["pid1600-runs"].splitlines()) == 2 + 4 * 3

    # semseg: means with the earlier one-seed run, and the mixed cross arm against LArTPC-only (Welch)
    lartpc = [figs[f"semseg-100-from-lartpc-s{s}"]["miou"] for s in SEEDS]
    cross = [figs[f"semseg-100-from-cross-mixed-s{s}"]["miou"] for s in SEEDS]
    assert f"| LArTPC-only Panda | 3 | {_mean_sd(lartpc)} | " in tables["semseg-means"]
    assert (
        f"| cross Panda, by detector (earlier run) | 1 | {figs['semseg-100-from-cross']['miou']:.3f} |"
        in (tables["semseg-means"])
    )
    t = ttest_ind(cross, lartpc, equal_var=False)
    assert tables["semseg-welch"] == (
        f"cross Panda (mixed) - LArTPC-only Panda: val mIoU {np.mean(cross) - np.mean(lartpc):+.3f}, "
        f"Welch t = {t.statistic:.2f}, two-sided p = {t.pvalue:.3f}"
    )


def test_a_second_rebuild_changes_nothing_and_check_passes(experiment):
    folder, runs, _ = experiment
    readme = folder / "README.md"
    before = readme.read_bytes(), readme.stat().st_mtime_ns
    out = _cli(str(folder), "--runs", str(runs))
    assert out.returncode == 0 and "already up to date" in out.stdout, out.stdout + out.stderr
    assert (readme.read_bytes(), readme.stat().st_mtime_ns) == before
    out = _cli(str(folder), "--runs", str(runs), "--check")
    assert out.returncode == 0 and "up to date" in out.stdout, out.stdout + out.stderr


def test_check_fails_on_a_number_edited_by_hand(experiment, tmp_path):
    folder, runs, figs = experiment
    edited = tmp_path / "cross-experiment"  # a copy: the builder is picked by the folder's name
    edited.mkdir()
    text = (folder / "README.md").read_text()
    old = f"| centred events | 2 | {figs['rings-scratch-ctrue-s2']['miou']:.3f} |"
    assert text.count(old) == 1
    (edited / "README.md").write_text(text.replace(old, "| centred events | 2 | 0.999 |"))
    out = _cli(str(edited), "--runs", str(runs), "--check")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "table rings-frame" in out.stdout
    assert "committed: | centred events | 2 | 0.999 |" in out.stdout
    assert f"rebuilt:   {old}" in out.stdout
    assert not (edited / "probes.png").exists()  # --check draws nothing


def test_missing_runs_are_named(experiment, tmp_path):
    folder, runs, _ = experiment
    partial = tmp_path / "runs"
    partial.mkdir()
    for d in runs.iterdir():
        if d.name not in ("pid1600-wch-s2", "semseg-100-from-cross"):
            (partial / d.name).symlink_to(d)
    out = _cli(str(folder), "--runs", str(partial), "--check")
    assert out.returncode == 2, out.stdout + out.stderr
    assert "need 2 run directories" in out.stderr
    assert out.stderr.rstrip().endswith(": semseg-100-from-cross, pid1600-wch-s2"), out.stderr


def test_an_unknown_experiment_is_refused(tmp_path):
    (tmp_path / "no-such-experiment").mkdir()
    (tmp_path / "no-such-experiment" / "README.md").write_text("# nothing\n")
    out = _cli(str(tmp_path / "no-such-experiment"), "--check")
    assert out.returncode == 2 and "no table builder for 'no-such-experiment'" in out.stderr, out.stderr
