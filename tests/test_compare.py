"""`raysvc compare`: arms of `raysvc evaluate` results across training seeds."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from raysvc.compare import compare, load_arms, portable_path, welch
from raysvc.inference.metrics import compute

CLASSES = ["shower", "track", "michel", "delta", "led"]


def _textbook_welch(a, b):
    """Welch's t, Welch-Satterthwaite df and the 95 % interval of mean(b) - mean(a), written out."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    d = b.mean() - a.mean()
    half = stats.t.ppf(0.975, df) * se
    return d / se, df, 2 * stats.t.sf(abs(d / se), df), (d - half, d + half)


@pytest.mark.parametrize("na,nb", [(2, 2), (4, 4), (3, 5)])
def test_welch_matches_the_textbook_formula(na, nb):
    rng = np.random.default_rng(na * 10 + nb)
    a, b = rng.normal(0.67, 0.006, na), rng.normal(0.68, 0.004, nb)
    w = welch(a, b)
    t, df, p, ci = _textbook_welch(a, b)
    assert w["diff"] == pytest.approx(b.mean() - a.mean())
    assert w["t"] == pytest.approx(t) and w["df"] == pytest.approx(df) and w["p"] == pytest.approx(p)
    assert w["ci"] == pytest.approx(list(ci))


def test_welch_separates_clear_differences_and_not_noise():
    clear = welch([0.60, 0.601, 0.599, 0.600], [0.70, 0.701, 0.699, 0.700])
    assert clear["p"] < 1e-6 and clear["ci"][0] > 0.09
    noise = welch([0.670, 0.680, 0.660, 0.675], [0.672, 0.668, 0.679, 0.666])
    assert noise["p"] > 0.5 and noise["ci"][0] < 0 < noise["ci"][1]
    assert welch([0.5, 0.5], [0.5, 0.5]) == {"diff": 0.0, "t": None, "df": None, "p": 1.0, "ci": [0.0, 0.0]}
    single = welch([0.6], [0.7, 0.71])
    assert single["diff"] == pytest.approx(0.105) and single["p"] is None


def _eval_json(path: Path, rng, data="file:///data/test", events_out=258, classes=CLASSES) -> dict:
    """An evaluate result as `raysvc evaluate` writes it, from a random confusion matrix."""
    cm = rng.integers(0, 50, (len(classes), len(classes))) + np.diag(rng.integers(100, 1000, len(classes)))
    ev = {
        "model": str(path.with_suffix("")),
        "data": data,
        "events": {"events_read": 300, "cut_min_points": 300 - events_out, "events_out": events_out},
        **compute(cm, classes),
    }
    path.write_text(json.dumps(ev))
    return ev


def test_arms_summarise_seeds_and_compare_to_the_baseline(tmp_path):
    rng = np.random.default_rng(0)
    evs = {
        arm: [_eval_json(tmp_path / f"{arm}-{s}.json", rng) for s in range(n)]
        for arm, n in (("scratch", 3), ("panda", 4))
    }
    paths = {arm: [str(tmp_path / f"{arm}-{s}.json") for s in range(len(e))] for arm, e in evs.items()}
    r = compare(load_arms(paths))
    assert r["baseline"] == "scratch" and r["events"] == 258 and "vs_baseline" not in r["arms"]["scratch"]
    for arm, e in evs.items():
        m = np.array([x["miou"] for x in e])
        assert r["arms"][arm]["runs"] == paths[arm]
        assert r["arms"][arm]["miou"]["values"] == pytest.approx(list(m))
        assert r["arms"][arm]["miou"]["mean"] == pytest.approx(m.mean())
        assert r["arms"][arm]["miou"]["sd"] == pytest.approx(m.std(ddof=1))
        for c in CLASSES:
            assert r["arms"][arm]["iou"][c]["mean"] == pytest.approx(np.mean([x["iou"][c] for x in e]))
    vs = r["arms"]["panda"]["vs_baseline"]
    assert vs["miou"]["p"] == pytest.approx(
        _textbook_welch(r["arms"]["scratch"]["miou"]["values"], r["arms"]["panda"]["miou"]["values"])[2]
    )
    assert set(vs) == {"miou", *CLASSES}


def test_results_of_other_events_or_classes_are_refused_by_name(tmp_path):
    rng = np.random.default_rng(1)
    a = tmp_path / "a.json"
    _eval_json(a, rng)
    other_data, other_cut, other_classes = (tmp_path / f"{n}.json" for n in ("data", "cut", "classes"))
    _eval_json(other_data, rng, data="file:///data/val")
    _eval_json(other_cut, rng, events_out=250)
    _eval_json(other_classes, rng, classes=["track", "shower", "michel", "delta", "led"])
    for bad, what in ((other_data, "dataset"), (other_cut, "event counts"), (other_classes, "classes")):
        with pytest.raises(ValueError, match=f"{bad.name}.*{what}"):
            load_arms({"x": [str(a)], "y": [str(bad)]})
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"miou": 0.5}))
    with pytest.raises(ValueError, match="broken.json: field 'iou' missing"):
        load_arms({"x": [str(broken)]})
    with pytest.raises(ValueError, match="arm 'x' has no evaluate results"):
        load_arms({"x": []})


def test_cli_writes_json_and_plot_and_rejects_a_bad_arm(tmp_path):
    rng = np.random.default_rng(2)
    files = {arm: [tmp_path / f"{arm}{s}.json" for s in range(2)] for arm in ("scratch", "panda")}
    for f in [*files["scratch"], *files["panda"]]:
        _eval_json(f, rng)
    raysvc = str(Path(sys.executable).parent / "raysvc")
    out = tmp_path / "cmp"
    p = subprocess.run(
        [
            raysvc,
            "compare",
            *(a for arm, fs in files.items() for a in ("--arm", f"{arm}=" + ",".join(map(str, fs)))),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    r = json.loads((out / "compare.json").read_text())
    assert r["arms"]["panda"]["vs_baseline"]["miou"]["diff"] == pytest.approx(
        r["arms"]["panda"]["miou"]["mean"] - r["arms"]["scratch"]["miou"]["mean"]
    )
    assert f"{r['arms']['panda']['vs_baseline']['miou']['diff']:+.4f}" in p.stdout
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    p = subprocess.run(
        [raysvc, "compare", "--arm", str(files["scratch"][0]), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2 and "expected a new NAME=EVAL.json" in p.stderr


def test_portable_path_keeps_relative_and_relativises_inside_cwd(tmp_path):
    cwd = str(tmp_path)
    assert portable_path("results/a/test-eval.json", cwd) == "results/a/test-eval.json"
    assert portable_path("./runs/x", cwd) == "./runs/x"
    assert portable_path(f"{cwd}/runs/ft/a", cwd) == "runs/ft/a"
    assert portable_path(f"file://{cwd}/runs/data/test", cwd) == "runs/data/test"
    assert portable_path(cwd, cwd) == "."
    # outside the directory, or not a local path: nothing relative to offer, kept as it was
    assert portable_path("/elsewhere/runs/x", cwd) == "/elsewhere/runs/x"
    assert portable_path(f"{cwd}-other/x", cwd) == f"{cwd}-other/x"
    assert portable_path("file:///elsewhere/x", cwd) == "file:///elsewhere/x"
    assert portable_path("s3://bucket/runs/x", cwd) == "s3://bucket/runs/x"
    assert portable_path(None, cwd) is None


def test_cli_records_no_absolute_path_of_the_working_directory(tmp_path):
    """Inputs given relatively stay relative in compare.json, and the absolute model / data paths that `raysvc
    evaluate` records (it makes them absolute) are written relative to the directory the command ran in."""
    rng = np.random.default_rng(3)
    (tmp_path / "evals").mkdir()
    rel = {arm: [f"evals/{arm}{s}.json" for s in range(2)] for arm in ("scratch", "panda")}
    for arm, fs in rel.items():
        for i, f in enumerate(fs):
            ev = _eval_json(tmp_path / f, rng, data=str(tmp_path / "runs" / "data" / "test"))
            ev["model"] = str(tmp_path / "runs" / "ft" / f"{arm}-s{i}")
            (tmp_path / f).write_text(json.dumps(ev))
    raysvc = str(Path(sys.executable).parent / "raysvc")
    p = subprocess.run(
        [
            raysvc,
            "compare",
            *(a for arm, fs in rel.items() for a in ("--arm", f"{arm}=" + ",".join(fs))),
            "--out",
            "cmp",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    text = (tmp_path / "cmp" / "compare.json").read_text()
    for absolute in {str(tmp_path), os.path.realpath(tmp_path)}:
        assert absolute not in text, f"compare.json records the absolute working directory {absolute}"
    r = json.loads(text)
    assert r["data"] == "runs/data/test"
    for arm, fs in rel.items():
        assert r["arms"][arm]["runs"] == fs
        assert r["arms"][arm]["models"] == [f"runs/ft/{arm}-s{i}" for i in range(2)]
