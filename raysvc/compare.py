"""Compare training arms across seeds from `raysvc evaluate` results: per-arm mean / sd of mIoU and per-class IoU,
and each arm against the first (the baseline) with Welch's t-test and the 95 % interval of the difference.

Training seeds, not test events, are the noise that decides few-label comparisons here (two scratch seeds differed
by 0.011 test mIoU), so an arm is one model per seed and the test treats seeds as the samples.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlparse

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class Scored:
    """One `raysvc evaluate` result and the file it came from."""

    path: str
    result: dict


def load_arms(arms: Mapping[str, Sequence[str]]) -> dict[str, list[Scored]]:
    """{arm: [Scored, ...]} from {arm: [path, ...]}; every file must score the same events with the same classes, or
    the comparison means nothing."""
    loaded: dict[str, list[Scored]] = {}
    first: tuple[str, dict] | None = None
    for arm, paths in arms.items():
        if not paths:
            raise ValueError(f"arm {arm!r} has no evaluate results")
        loaded[arm] = []
        for path in paths:
            with open(path) as f:
                ev = json.load(f)
            for key in ("miou", "iou", "data", "events"):
                if key not in ev:
                    raise ValueError(f"{path}: field {key!r} missing; expected the JSON `raysvc evaluate --out` writes")
            if first is None:
                first = (path, ev)
            else:
                ref_path, ref = first
                for key, what in (("data", "dataset"), ("events", "event counts")):
                    if ev[key] != ref[key]:
                        raise ValueError(
                            f"{path}: scored on another {what} ({ev[key]!r}) than {ref_path} "
                            f"({ref[key]!r}); arms must be scored on the same events"
                        )
                if list(ev["iou"]) != list(ref["iou"]):
                    raise ValueError(f"{path}: classes {list(ev['iou'])} differ from {ref_path}'s {list(ref['iou'])}")
            loaded[arm].append(Scored(path, ev))
    return loaded


def portable_path(path: str | None, cwd: str | None = None) -> str | None:
    """`path` as compare.json should record it: relative paths as given; an absolute path or file:// URI inside `cwd`
    (default: this process's directory) relative to it; anything else (s3://, paths outside `cwd`) unchanged.

    `raysvc evaluate` records its model and data as absolute paths (Ray workers run elsewhere), so without this a
    compare.json would carry one machine's directory layout into results that are meant to be committed."""
    if not path:
        return path
    parsed = urlparse(path)
    if parsed.scheme == "file" and parsed.netloc in ("", "localhost"):
        local = parsed.path
    elif parsed.scheme == "" and os.path.isabs(path):
        local = path
    else:
        return path  # relative (kept as given), s3://, or a scheme we do not rewrite
    cwd = cwd or os.getcwd()
    for base, p in ((os.path.abspath(cwd), os.path.abspath(local)), (os.path.realpath(cwd), os.path.realpath(local))):
        if p == base or p.startswith(base.rstrip(os.sep) + os.sep):
            return os.path.relpath(p, base)
    return path


def _summary(values: Sequence[float | None]) -> dict:
    x = np.array([np.nan if v is None else v for v in values], dtype=float)
    return {
        "values": [None if math.isnan(v) else v for v in x],
        "mean": float(np.nanmean(x)),
        "sd": float(np.nanstd(x, ddof=1)) if np.sum(~np.isnan(x)) > 1 else None,
    }


def welch(baseline: Sequence[float], arm: Sequence[float], level: float = 0.95) -> dict:
    """Difference of means (arm - baseline), Welch's two-sided t-test and its `level` confidence interval."""
    a, b = np.asarray(baseline, float), np.asarray(arm, float)
    diff = float(b.mean() - a.mean())
    if len(a) < 2 or len(b) < 2:
        return {"diff": diff, "t": None, "df": None, "p": None, "ci": None}
    if a.var() == 0 and b.var() == 0:  # both arms constant: no spread to test against
        return {"diff": diff, "t": None, "df": None, "p": 1.0 if diff == 0 else 0.0, "ci": [diff, diff]}
    test = stats.ttest_ind(b, a, equal_var=False)
    ci = test.confidence_interval(confidence_level=level)
    return {
        "diff": diff,
        "t": float(test.statistic),
        "df": float(test.df),
        "p": float(test.pvalue),
        "ci": [float(ci.low), float(ci.high)],
    }


def compare(loaded: Mapping[str, list[Scored]], cwd: str | None = None) -> dict:
    """Per-arm summaries and every arm against the first, for mIoU and each class's IoU. Paths (the evaluate results,
    their models and data) are recorded by `portable_path` against `cwd` (default: this process's directory)."""
    arms = list(loaded)
    first = loaded[arms[0]][0].result
    classes = list(first["iou"])
    out: dict = {
        "baseline": arms[0],
        "data": portable_path(first["data"], cwd),
        "events": first["events"].get("events_out"),
        "arms": {},
    }
    for arm, scored in loaded.items():
        evs = [s.result for s in scored]
        out["arms"][arm] = {
            "runs": [portable_path(s.path, cwd) for s in scored],
            "models": [portable_path(ev.get("model"), cwd) for ev in evs],
            "miou": _summary([ev["miou"] for ev in evs]),
            "iou": {c: _summary([ev["iou"][c] for ev in evs]) for c in classes},
        }
    base = out["arms"][arms[0]]
    for arm in arms[1:]:
        mine = out["arms"][arm]
        mine["vs_baseline"] = {"miou": welch(base["miou"]["values"], mine["miou"]["values"])}
        for c in classes:
            a, b = base["iou"][c]["values"], mine["iou"][c]["values"]
            if None not in a and None not in b:
                mine["vs_baseline"][c] = welch(a, b)
    return out


def format_table(result: dict) -> str:
    """A plain-text table: arm, seeds, mean +- sd, difference to the baseline with its interval and p."""
    lines = [f"test mIoU on {result['events']} events of {result['data']}; baseline: {result['baseline']}"]
    for arm, r in result["arms"].items():
        m = r["miou"]
        vals = " ".join(f"{v:.3f}" for v in m["values"])
        sd = f" +- {m['sd']:.3f}" if m["sd"] is not None else ""
        line = f"  {arm:<24} n={len(m['values'])}  {m['mean']:.4f}{sd}  [{vals}]"
        if "vs_baseline" in r:
            w = r["vs_baseline"]["miou"]
            line += f"  diff {w['diff']:+.4f}"
            if w["ci"] is not None:
                line += f"  95% CI [{w['ci'][0]:+.4f}, {w['ci'][1]:+.4f}]  p={w['p']:.3g}"
        lines.append(line)
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    """Left: each seed's test mIoU as a dot and the arm's mean +- sd; right: per-class mean IoU +- sd."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(result["arms"])
    classes = list(result["arms"][arms[0]]["iou"])
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [1, 2]})
    for i, arm in enumerate(arms):
        m = result["arms"][arm]["miou"]
        vals = [v for v in m["values"] if v is not None]
        a.scatter(np.full(len(vals), i) + np.linspace(-0.12, 0.12, len(vals)), vals, color=colours[i % 10], zorder=3)
        a.errorbar(i + 0.3, m["mean"], yerr=m["sd"] or 0, fmt="_", ms=14, capsize=4, color="k")
        label = f"{m['mean']:.3f}"
        w = result["arms"][arm].get("vs_baseline", {}).get("miou")
        if w is not None:
            label += f"\n{w['diff']:+.3f}" + (f", p={w['p']:.2f}" if w["p"] is not None else "")
        a.text(i + 0.36, m["mean"], label, va="center", fontsize=8)
    a.set_xticks(range(len(arms)), arms, rotation=20, ha="right", fontsize=8)
    a.set_xlim(-0.5, len(arms) - 0.2)
    a.set_ylabel(f"test mIoU ({result['events']} events)")
    a.set_title("each dot one training seed; bar: mean +- sd")
    w = 0.8 / len(arms)
    for i, arm in enumerate(arms):
        iou = result["arms"][arm]["iou"]
        b.bar(
            np.arange(len(classes)) + (i - len(arms) / 2 + 0.5) * w,
            [iou[c]["mean"] for c in classes],
            w,
            yerr=[iou[c]["sd"] or 0 for c in classes],
            capsize=2,
            label=arm,
            color=colours[i % 10],
        )
    b.set_xticks(range(len(classes)), classes)
    b.set_ylabel("test IoU, mean over seeds")
    b.set_title("per class")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
