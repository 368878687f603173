"""PID curves of the fine-tunes from `raysvc predict` outputs on the single-particle held-out set and the set's own
labels (run from the repository root after the commands in README.md:
python results/cross-experiment/pid_roc.py [RUNS [PREFIX]]). Draws seed 0 of each initialisation into pid-roc.png
(PREFIX pid1600: pid1600-roc.png) and prints, per run and as mean ± sample standard deviation over the seeds found,
the ROC AUCs and the electron efficiency at a looser 99 % muon rejection."""

import json
import statistics
import sys
from pathlib import Path

import matplotlib
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from sklearn.metrics import roc_auc_score, roc_curve

from raysvc.data.streaming.shards import load_manifest, read_shard
from raysvc.data.sources.wch_generator import CATEGORIES
from raysvc.inference.event_metrics import efficiency_at_rejection, event_labels
from raysvc.storage import resolve

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RUNS = Path(sys.argv[1] if len(sys.argv) > 1 else "runs")
PREFIX = sys.argv[2] if len(sys.argv) > 2 else "pid"
ARMS = {
    "scratch": "scratch",
    "scratch, centred": "scratchc",  # the control: the pretrained arms' input frame
    "WCh-only Panda": "wch",
    "cross Panda (mixed)": "cross",
}
BACKGROUNDS = ((1, "muon"), (2, "pi0"))

data = resolve(str(RUNS / "data" / "wch-single-val"))
table = pa.concat_tables(
    [read_shard(data, r).select(["event_id", "rings", "particles"]) for r in load_manifest(data).shards]
)
_, pid = event_labels(table, CATEGORIES)


def electron_scores(run: str) -> np.ndarray:
    out = RUNS / "preds" / run
    files = json.loads((out / "manifest.json").read_text())["files"]
    preds = pa.concat_tables([pq.read_table(out / f) for f in files])
    assert preds.column("event_id").to_pylist() == table.column("event_id").to_pylist(), run
    return np.array([p[0] for p in preds.column("pid_probs").to_pylist()])


def figures(e_score: np.ndarray) -> dict:
    fig = {
        f"e/{name} AUC": roc_auc_score(pid[(pid == 0) | (pid == b)] == 0, e_score[(pid == 0) | (pid == b)])
        for b, name in BACKGROUNDS
    }
    fig["e eff @ 99 % mu rej"] = efficiency_at_rejection(e_score[pid == 0], e_score[pid == 1], 0.99)["efficiency"]
    return fig


fig, axes = plt.subplots(1, 2, figsize=(11, 4))
rows = {}
for label, arm in ARMS.items():
    runs = sorted(p.name for p in (RUNS / "preds").glob(f"{PREFIX}-{arm}-s*"))
    if not runs:
        continue
    rows[label] = [figures(electron_scores(run)) for run in runs]
    for run, f in zip(runs, rows[label], strict=True):
        print(run, " ".join(f"{k} {v:.3f}" for k, v in f.items()))
    e_score = electron_scores(runs[0])
    for ax, (bkg, name) in zip(axes, BACKGROUNDS, strict=True):
        sel = (pid == 0) | (pid == bkg)
        fpr, tpr, _ = roc_curve(pid[sel] == 0, e_score[sel])
        auc = roc_auc_score(pid[sel] == 0, e_score[sel])
        ax.plot(np.clip(fpr, 1e-4, 1), tpr, label=f"{label} (AUC {auc:.2f})")
        ax.set_title(f"electron vs {name} ({int((pid == 0).sum())} e, {int((pid == bkg).sum())} {name}), seed 0")
for ax, (x, name) in zip(axes, ((1e-3, "99.9 % muon rejection"), (5e-2, "95 % pi0 rejection")), strict=True):
    ax.axvline(x, color="grey", ls=":", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("background passing (1 - rejection)")
    ax.set_ylabel("electron efficiency")
    ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(Path(__file__).with_name("pid-roc.png" if PREFIX == "pid" else f"{PREFIX}-roc.png"), dpi=110)

keys = list(next(iter(rows.values()))[0])
print("\n| init | seeds | " + " | ".join(keys) + " |")
print("|---|---|" + "---|" * len(keys))
for label, figs in rows.items():
    cells = []
    for k in keys:
        vals = [f[k] for f in figs]
        sd = f" ± {statistics.stdev(vals):.3f}" if len(vals) > 1 else ""
        cells.append(f"{statistics.mean(vals):.3f}{sd}")
    print(f"| {label} | {len(figs)} | " + " | ".join(cells) + " |")
