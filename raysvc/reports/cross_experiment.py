"""results/cross-experiment: its README's tables and plots from the runs its commands make (under `runs`).

Tables, by marker name:
- rings-frame: `rings-wch-tiny` from scratch in the tank frame against centred events (runs rings-scratch-c*-s*).
- pid-means, pid-auc, pid-runs: single-particle PID at 400 fine-tuning steps (runs pid-*-s*, their predictions
  under preds/, and the held-out set data/wch-single-val whose labels the ROC figures need).
- pid1600-means, pid1600-auc, pid1600-runs: the same at 1,600 steps (pid1600-*).
- semseg-means, semseg-runs, semseg-welch: LArTPC fine-tuning on 100 labels (semseg-100-from-*).
Plots: probes.png (the pretraining runs' linear probes), pid-roc.png and pid1600-roc.png (seed 0 of each arm).

An arm is one initialisation fine-tuned with each of SEEDS; its figure is the mean and sample standard deviation over
those seeds, and two arms are compared with Welch's t-test (their spreads need not be equal).
"""

from __future__ import annotations

import contextlib
import json
import statistics
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from scipy.stats import ttest_ind
from sklearn.metrics import roc_auc_score, roc_curve

from raysvc.data.contract.detectors import get_detector
from raysvc.data.streaming.shards import load_manifest, read_shard
from raysvc.inference.event_metrics import efficiency_at_rejection, event_labels
from raysvc.storage import resolve

SEEDS = (0, 1, 2)
PID_DATA = "data/wch-single-val"

# Pretraining runs whose probe curves probes.png draws: panel -> (legend, run, the detector's entry of a cross run).
PROBES = {
    "lartpc": [("LArTPC only", "pretrain-panda-lartpc-300", None)],
    "wch": [("WCh only", "pretrain-panda-wch-tiny", None)],
}
for _run, _legend in (
    ("pretrain-panda-cross-tiny", "cross, by detector"),
    ("pretrain-panda-cross-tiny-mixed", "cross, mixed"),
):
    for _det, _arms in PROBES.items():
        _arms.append((_legend, _run, _det))

RINGS_ARMS = {"tank frame": "rings-scratch-cfalse", "centred events": "rings-scratch-ctrue"}

# Run prefix -> {arm: (label in the summary tables, label in the ROC table and plot)}; the scratch arms fed centred
# events are the control for the pretrained arms' input frame (only run at 1,600 steps).
PID_ARMS = {
    "pid": {
        "scratch": ("scratch", "scratch"),
        "wch": ("WCh-only Panda, fft", "WCh-only Panda"),
        "cross": ("cross Panda (mixed), fft", "cross Panda (mixed)"),
    },
    "pid1600": {
        "scratch": ("scratch (tank frame)", "scratch (tank frame)"),
        "scratchc": ("scratch, centred events", "scratch, centred"),
        "wch": ("WCh-only Panda, fft", "WCh-only Panda"),
        "cross": ("cross Panda (mixed), fft", "cross Panda (mixed)"),
    },
}
PID_BACKGROUNDS = ((1, "muon"), (2, "pi0"))
# The per-run table shows each run's AUCs at 1,600 steps, its held-out event counts at 400 (as first published).
PID_RUN_AUCS = {"pid1600"}

SEMSEG_ARMS = {"LArTPC-only Panda": "semseg-100-from-lartpc", "cross Panda (mixed)": "semseg-100-from-cross-mixed"}
# One unseeded fine-tune of the by-detector cross backbone, run before the seeded arms (that backbone was not kept).
SEMSEG_EARLIER = ("cross Panda, by detector (earlier run)", "semseg-100-from-cross")
SEMSEG_CLASSES = {"shower": "shower", "track": "track", "michel": "Michel", "delta": "delta", "led": "LED"}


def _recall(cm: list[list[int]], k: int) -> float:
    return cm[k][k] / max(sum(cm[k]), 1)


RINGS_FIGS: dict[str, Callable[[dict], float]] = {
    "per-hit mIoU": lambda v: v["miou"],
    "ring accuracy": lambda v: v["ring_accuracy"],
    "1R recall": lambda v: _recall(v["ring_count_confusion"], 0),
    "2R recall": lambda v: _recall(v["ring_count_confusion"], 1),
    ">=3R recall": lambda v: _recall(v["ring_count_confusion"], 2),
}
PID_FIGS: dict[str, Callable[[dict], float]] = {
    "per-hit mIoU": lambda v: v["miou"],
    "ring accuracy": lambda v: v["ring_accuracy"],
    "e eff @ 99.9 % mu rej": lambda v: v["pid"]["e_eff_at_mu_rej_999"],
    "e eff @ 95 % pi0 rej": lambda v: v["pid"]["e_eff_at_pi0_rej_95"],
}


def required(runs: Path) -> list[Path]:
    """The files the tables and plots read, each standing for its run directory."""
    names = [run for arms in PROBES.values() for _, run, _ in arms]
    names += [f"{p}-s{s}" for p in RINGS_ARMS.values() for s in SEEDS]
    names += [f"{p}-s{s}" for p in SEMSEG_ARMS.values() for s in SEEDS] + [SEMSEG_EARLIER[1]]
    pid = [f"{prefix}-{arm}-s{s}" for prefix, arms in PID_ARMS.items() for arm in arms for s in SEEDS]
    files = [runs / n / "summary.json" for n in dict.fromkeys(names + pid)]
    return files + [runs / "preds" / n / "manifest.json" for n in pid] + [runs / PID_DATA / "manifest.json"]


def build(runs: Path, plots: Path | None) -> dict[str, str]:
    """Every table of the README, by marker name; the plots go into `plots` unless it is None."""
    missing = [str(f.parent.relative_to(runs)) for f in required(runs) if not f.is_file()]
    if missing:
        raise FileNotFoundError(
            f"the cross-experiment tables need {len(missing)} run directories that {runs}/ lacks (the runs are not "
            f"committed; results/cross-experiment/README.md has the commands that make them): {', '.join(missing)}"
        )
    if plots is not None:
        probes_plot(runs, plots / "probes.png")
    event_ids, pid = pid_labels(runs)
    tables = {"rings-frame": rings_frame_table(runs)}
    for prefix in PID_ARMS:
        png = None if plots is None else plots / ("pid-roc.png" if prefix == "pid" else f"{prefix}-roc.png")
        tables |= pid_tables(runs, prefix, event_ids, pid, png)
    return tables | semseg_tables(runs)


# --- helpers -----------------------------------------------------------------------------------------------------


def _val(runs: Path, run: str) -> dict:
    return json.loads((runs / run / "summary.json").read_text())["val"]


def _mean_sd(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"


def _row(cells: list[str]) -> str:
    return "|" + "".join(f" {c} |" if c else " |" for c in cells)  # an empty cell is "| |", as first published


def _table(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join([_row(header), "|" + "---|" * len(header), *map(_row, rows)])


# --- tables ------------------------------------------------------------------------------------------------------


def rings_frame_table(runs: Path) -> str:
    """Per input frame the mean ± sd over seeds and a Welch p per figure; then one row per run."""
    vals = {label: {k: [] for k in RINGS_FIGS} for label in RINGS_ARMS}
    rows = []
    for label, prefix in RINGS_ARMS.items():
        for s in SEEDS:
            val = _val(runs, f"{prefix}-s{s}")
            for k, f in RINGS_FIGS.items():
                vals[label][k].append(f(val))
            rows.append(
                [label, str(s), *(f"{f(val):.3f}" for f in RINGS_FIGS.values()), str(val["ring_count_confusion"])]
            )
    means = [[label, str(len(SEEDS)), *map(_mean_sd, v.values())] for label, v in vals.items()]
    a, b = vals.values()
    means.append(["Welch p", "", *(f"{ttest_ind(a[k], b[k], equal_var=False).pvalue:.2f}" for k in RINGS_FIGS)])
    return (
        _table(["input", "seeds", *RINGS_FIGS], means)
        + "\n\n"
        + _table(["input", "seed", *RINGS_FIGS, "ring confusion (rows true 1R / 2R / >=3R)"], rows)
    )


def pid_labels(runs: Path) -> tuple[list[int], np.ndarray]:
    """The held-out set's event ids in order and each event's PID class (0 e, 1 mu, 2 pi0, -1 none)."""
    data = resolve(str(runs / PID_DATA))
    table = pa.concat_tables(
        [read_shard(data, r).select(["event_id", "rings", "particles"]) for r in load_manifest(data).shards]
    )
    return table.column("event_id").to_pylist(), event_labels(table, get_detector("wch").labels["pid"].classes)[1]


def electron_scores(runs: Path, run: str, event_ids: list[int]) -> np.ndarray:
    """Each held-out event's electron probability from `raysvc predict`'s output of `run`."""
    out = runs / "preds" / run
    files = json.loads((out / "manifest.json").read_text())["files"]
    preds = pa.concat_tables([pq.read_table(out / f) for f in files])
    if preds.column("event_id").to_pylist() != event_ids:
        raise ValueError(f"{out}: its predictions are not of {runs / PID_DATA}'s events, in its order")
    return np.array([p[0] for p in preds.column("pid_probs").to_pylist()])


def roc_figures(pid: np.ndarray, e_score: np.ndarray) -> dict[str, float]:
    """Electron against each background: ROC AUC, and the efficiency at a looser 99 % muon rejection."""
    fig = {}
    for bkg, name in PID_BACKGROUNDS:
        sel = (pid == 0) | (pid == bkg)
        fig[f"e/{name} AUC"] = float(roc_auc_score(pid[sel] == 0, e_score[sel]))
    fig["e eff @ 99 % mu rej"] = efficiency_at_rejection(e_score[pid == 0], e_score[pid == 1], 0.99)["efficiency"]
    return fig


def pid_tables(runs: Path, prefix: str, event_ids: list[int], pid: np.ndarray, png: Path | None) -> dict[str, str]:
    """{prefix}-means (the runs' own figures), {prefix}-auc (from their predictions) and {prefix}-runs (one row per
    run); draws seed 0 of each arm into `png` unless it is None."""
    means, aucs, rows, scores = [], [], [], {}
    for arm, (label, roc_label) in PID_ARMS[prefix].items():
        figs, rocs = {k: [] for k in PID_FIGS}, []
        for s in SEEDS:
            run = f"{prefix}-{arm}-s{s}"
            val = _val(runs, run)
            if not val["pid"]["detail"]["mu_rej_999"]["achievable"]:
                raise ValueError(
                    f"{runs / run}: too few muons ({val['pid']['events']['muon']}) to measure 99.9 % rejection"
                )
            score = electron_scores(runs, run, event_ids)
            scores.setdefault(roc_label, score)  # seed 0's, for the plot
            rocs.append(roc_figures(pid, score))
            for k, f in PID_FIGS.items():
                figs[k].append(f(val))
            cells = [label, str(s), *(f"{f(val):.3f}" for f in PID_FIGS.values())]
            if prefix in PID_RUN_AUCS:
                auc = [f"{rocs[-1][f'e/{name} AUC']:.3f}" for _, name in PID_BACKGROUNDS]
                rows.append([*cells, *auc, str(val["ring_count_confusion"])])
            else:
                rows.append([*cells, str(val["ring_count_confusion"]), str(val["pid"]["events"])])
        means.append([label, str(len(SEEDS)), *map(_mean_sd, figs.values())])
        aucs.append([roc_label, str(len(SEEDS)), *(_mean_sd([r[k] for r in rocs]) for k in rocs[0])])
    if prefix in PID_RUN_AUCS:
        tail = [*(f"e/{name} AUC" for _, name in PID_BACKGROUNDS), "ring confusion"]
    else:
        tail = ["ring confusion", "held-out events"]
    if png is not None:
        roc_plot(pid, scores, png)
    return {
        f"{prefix}-means": _table(["init", "seeds", *PID_FIGS], means),
        f"{prefix}-auc": _table(["init", "seeds", *rocs[0]], aucs),
        f"{prefix}-runs": _table(["init", "seed", *PID_FIGS, *tail], rows),
    }


def semseg_tables(runs: Path) -> dict[str, str]:
    """Per backbone the mean ± sd of val mIoU and per-class IoU over seeds (and the earlier unseeded run), one row
    per seeded run, and the mixed cross backbone against LArTPC-only in val mIoU with Welch's t-test."""

    def figs(run: str) -> list[float]:
        val = _val(runs, run)
        return [val["miou"], *(val["iou"][c] for c in SEMSEG_CLASSES)]

    means, rows, miou = [], [], {}
    for label, prefix in SEMSEG_ARMS.items():
        per_run = [figs(f"{prefix}-s{s}") for s in SEEDS]
        rows += [[label, str(s), *(f"{v:.3f}" for v in f)] for s, f in zip(SEEDS, per_run, strict=True)]
        miou[label] = [f[0] for f in per_run]
        means.append([label, str(len(SEEDS)), *(_mean_sd(list(col)) for col in zip(*per_run, strict=True))])
    label, run = SEMSEG_EARLIER  # one seed: in the means table only
    means.append([label, "1", *(f"{v:.3f}" for v in figs(run))])
    head = ["val mIoU", *SEMSEG_CLASSES.values()]
    (a, xa), (b, xb) = miou.items()
    t = ttest_ind(xb, xa, equal_var=False)
    diff = statistics.mean(xb) - statistics.mean(xa)
    return {
        "semseg-means": _table(["backbone", "seeds", *head], means),
        "semseg-runs": _table(["backbone", "seed", *head], rows),
        "semseg-welch": f"{b} - {a}: val mIoU {diff:+.3f}, Welch t = {t.statistic:.2f}, two-sided p = {t.pvalue:.3f}",
    }


# --- plots -------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _two_panels(png: Path):
    """A figure of two panels side by side (Agg), its axes for the block, written to `png` when the block ends."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    try:
        yield axes
        fig.tight_layout()
        fig.savefig(png, dpi=110)
    finally:
        plt.close(fig)


def probes_plot(runs: Path, png: Path) -> None:
    """One panel per detector: each backbone's linear-probe mIoU over its pretraining steps."""
    with _two_panels(png) as axes:
        for ax, (det, arms) in zip(axes, PROBES.items(), strict=True):
            for legend, run, key in arms:
                probe = json.loads((runs / run / "summary.json").read_text())["probe"]
                steps, miou = zip(*(probe[key] if key else probe)["curve"], strict=True)
                ax.plot(steps, miou, "-o", label=legend)
            ax.set_title(f"linear probe on {det} (held-out events)")
            ax.set_xlabel("pretraining step (4 events each)")
            ax.set_ylabel("probe mIoU")
            ax.legend(fontsize=8)


def roc_plot(pid: np.ndarray, scores: dict[str, np.ndarray], png: Path) -> None:
    """Electron efficiency against the background passing, against muons and against pi0s, one curve per arm."""
    with _two_panels(png) as axes:
        for label, e_score in scores.items():
            for ax, (bkg, name) in zip(axes, PID_BACKGROUNDS, strict=True):
                sel = (pid == 0) | (pid == bkg)
                fpr, tpr, _ = roc_curve(pid[sel] == 0, e_score[sel])
                auc = roc_auc_score(pid[sel] == 0, e_score[sel])
                ax.plot(np.clip(fpr, 1e-4, 1), tpr, label=f"{label} (AUC {auc:.2f})")
                ax.set_title(
                    f"electron vs {name} ({int((pid == 0).sum())} e, {int((pid == bkg).sum())} {name}), seed 0"
                )
        for ax, (x, name) in zip(axes, ((1e-3, "99.9 % muon rejection"), (5e-2, "95 % pi0 rejection")), strict=True):
            ax.axvline(x, color="grey", ls=":", label=name)
            ax.set_xscale("log")
            ax.set_xlabel("background passing (1 - rejection)")
            ax.set_ylabel("electron efficiency")
            ax.legend(fontsize=8)
