"""The tables and plots of an experiment that declares them in its `experiment.yaml` (docs/results.md), rebuilt from
its run records (`runs/*.json`): no Python per experiment.

A table (`tables:` entry) has one row per value of a factor (`rows`, e.g. labels) and arm (its `arms`, default the
experiment's): the runs, and the mean +-
sample sd over them of each metric (a path inside the record's `metrics`, e.g. test.miou or test.iou.michel). Under it,
each arm against the `control` arm on the compared metric: a paired t-test over fine-tune seeds (the runs of one arm
and seed are first averaged over pretraining seeds), the comparison count m, and a verdict: "better" or "worse" only
where p x m < 0.05 (Bonferroni), else "level". A plot (`plots:` entry) draws each metric against a numeric factor, one
line per arm with sd error bars.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import yaml
from scipy.stats import ttest_rel

SPEC = "experiment.yaml"
RECORD_KEYS = ("config", "seeds", "split", "metrics", "git_commit", "wall_s")  # raysvc.train.run_record.KEYS
ALPHA = 0.05


def load(folder: Path) -> dict:
    path = folder / SPEC
    spec = yaml.safe_load(path.read_text()) or {}
    for i, t in enumerate(spec.get("tables") or []):
        missing = [k for k in ("name", "metrics") if k not in t]
        if missing:
            raise ValueError(f"{path}: tables[{i}] lacks {', '.join(missing)}")
        if t.get("control") is not None and t["control"] not in _arms(spec, t):
            raise ValueError(f"{path}: tables[{i}].control {t['control']!r} is not one of its arms")
    return spec


def _arms(spec: dict, t: dict) -> list[str]:
    """The arms of a table, in row order: its own `arms`, else the experiment's (probe records' arms are
    "probe-<backbone>")."""
    return list(t.get("arms") or spec.get("arms") or [])


def records(runs: Path) -> list[dict]:
    """Every run record under `runs`, checked for the record's keys."""
    out = []
    for f in sorted(runs.glob("*.json")) if runs.is_dir() else []:
        rec = json.loads(f.read_text())
        if tuple(rec) != RECORD_KEYS:
            raise ValueError(f"{f}: a run record has the top-level keys {RECORD_KEYS}, got {tuple(rec)}")
        if "experiment" not in rec["config"]:
            raise ValueError(f"{f}: config.experiment (arm, factors, seed) is missing: not written by `results run`")
        out.append(rec)
    return out


def metric(rec: dict, path: str) -> float | None:
    node = rec["metrics"]
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ValueError(f"run {rec['config']['experiment']['run']}: metrics has no {path!r}")
        node = node[part]
    return node


def _mean_sd(xs: list[float]) -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "n/a"
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    line = lambda cells: "| " + " | ".join(cells) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "---|" * len(header), *map(line, rows)])


def _groups(spec: dict, t: dict, recs: list[dict]) -> list:
    if not t.get("rows"):
        return [None]
    values = spec.get("factors", {}).get(t["rows"], {}).get("values")
    return values or sorted({r["config"]["experiment"]["factors"][t["rows"]] for r in recs})


def _select(recs: list[dict], t: dict, arm: str, group) -> list[dict]:
    exp = [r for r in recs if r["config"]["experiment"]["arm"] == arm]
    return exp if group is None else [r for r in exp if r["config"]["experiment"]["factors"][t["rows"]] == group]


def _by_seed(recs: list[dict], path: str) -> dict[int, float]:
    """{fine-tune seed: the metric, averaged over that seed's runs (pretraining seeds)}."""
    seeds: dict[int, list[float]] = {}
    for r in recs:
        v = metric(r, path)
        if v is not None:
            seeds.setdefault(r["config"]["experiment"]["seed"], []).append(v)
    return {s: statistics.mean(v) for s, v in seeds.items()}


def build_table(spec: dict, t: dict, recs: list[dict]) -> str:
    if not recs:
        return (
            f"_Runs pending: no run records under runs/ yet (`raysvc results run results/{spec['name']}` makes them)._"
        )
    metrics: dict[str, str] = t["metrics"]
    compared = t.get("compare", next(iter(metrics)))
    head = [t["rows"]] if t.get("rows") else []
    rows, tests = [], []
    groups, arms = _groups(spec, t, recs), _arms(spec, t)
    for g in groups:
        lead = [str(g)] if g is not None else []
        for arm in arms:
            sel = _select(recs, t, arm, g)
            if sel:
                cells = [_mean_sd([metric(r, p) for r in sel]) for p in metrics.values()]
                rows.append([*lead, arm, str(len(sel)), *cells])
        if t.get("control") is None:
            continue  # a table without a control compares nothing
        control = _by_seed(_select(recs, t, t["control"], g), metrics[compared])
        for arm in arms:
            if arm == t["control"] or not _select(recs, t, arm, g):
                continue
            mine = _by_seed(_select(recs, t, arm, g), metrics[compared])
            pairs = sorted(set(mine) & set(control))
            tests.append((lead, arm, [mine[s] for s in pairs], [control[s] for s in pairs]))
    m = len(tests)
    test_rows = []
    for lead, arm, a, b in tests:
        diff = statistics.mean(a) - statistics.mean(b) if a else None
        res = ttest_rel(a, b) if len(a) > 1 else None
        if res is None or math.isnan(res.pvalue):  # under 2 pairs, or every difference 0
            cells, verdict = ["n/a", "n/a", "n/a"], "level (under 2 pairs)" if res is None else "level"
        else:
            p_adj = min(1.0, res.pvalue * m)
            verdict = "level" if not p_adj < ALPHA else ("better" if diff > 0 else "worse")
            cells = [f"{res.statistic:.2f}", f"{res.pvalue:.3f}", f"{p_adj:.3f}"]
        diff_cell = "n/a" if diff is None else f"{diff:+.3f}"
        test_rows.append([*lead, f"{arm} - {t['control']}", str(len(a)), diff_cell, *cells, verdict])
    text = _table([*head, "arm", "runs", *metrics], rows)
    if tests:
        text += (
            f"\n\nPaired t-test on {compared} against {t['control']}, paired by fine-tune seed (an arm's runs of one "
            f'seed averaged over its pretraining seeds); {m} comparisons, Bonferroni: "better" / "worse" only where '
            f'p x {m} < {ALPHA}, else "level".\n\n'
            + _table([*head, "comparison", "pairs", f"{compared} diff", "t", "p", f"p x {m}", "verdict"], test_rows)
        )
    return text


def build(folder: Path, runs: Path, plots: Path | None) -> dict[str, str]:
    """{marker name: table} of every declared table; the declared plots go into `plots` (None: none drawn)."""
    spec = load(folder)
    recs = records(runs)
    tables = {t["name"]: build_table(spec, t, recs) for t in spec.get("tables") or []}
    if plots is not None and recs:
        for p in spec.get("plots") or []:
            plot(spec, p, recs, plots / p["file"])
    return tables


def _loss_curves(spec: dict, recs: list[dict], ax) -> None:
    """Each arm's training loss against the step: the mean over its runs (records' `metrics.train_loss`)."""
    for arm in _arms(spec, {}):
        curves = [dict(map(tuple, r["metrics"]["train_loss"])) for r in _select(recs, {}, arm, None)]
        steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
        if steps:
            ax.plot(steps, [statistics.mean(c[s] for c in curves) for s in steps], label=f"{arm} ({len(curves)} runs)")
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("training loss (mean over runs)")


def plot(spec: dict, p: dict, recs: list[dict], png: Path) -> None:
    """One panel per metric against the factor `x`, a line per arm: the mean over its runs with sd error bars; or,
    `kind: loss`, each arm's mean training loss curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if p.get("kind") == "loss":
        fig, ax = plt.subplots(figsize=(6, 3.6))
        _loss_curves(spec, recs, ax)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(png, dpi=110)
        plt.close(fig)
        return
    metrics: dict[str, str] = p["metrics"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 3.4), squeeze=False)
    t = {"rows": p["x"]}
    for ax, (label, path) in zip(axes[0], metrics.items(), strict=True):
        for arm in _arms(spec, p):
            xs, ys, es = [], [], []
            for g in _groups(spec, t, recs):
                vals = [v for r in _select(recs, t, arm, g) if (v := metric(r, path)) is not None]
                if vals:
                    xs.append(g)
                    ys.append(statistics.mean(vals))
                    es.append(statistics.stdev(vals) if len(vals) > 1 else 0.0)
            if xs:
                ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=arm)
        if p.get("log_x"):
            ax.set_xscale("log")
        ax.set_xlabel(p["x"])
        ax.set_title(label)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
