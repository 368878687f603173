"""Electron efficiency against muon and pi0 rejection of the PID fine-tunes (seed 0 of each initialisation), from
`raysvc predict` outputs on the single-particle held-out set and the set's own labels (run from the repository
root after the commands in README.md: python results/cross-experiment/pid_roc.py [RUNS])."""

import json
import sys
from pathlib import Path

import matplotlib
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from sklearn.metrics import roc_curve

from raysvc.data.shards import load_manifest, read_shard
from raysvc.data.wch_generator import CATEGORIES
from raysvc.inference.event_metrics import event_labels
from raysvc.storage import resolve

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RUNS = Path(sys.argv[1] if len(sys.argv) > 1 else "runs")
ARMS = {"scratch": "pid-scratch-s0", "WCh-only Panda": "pid-wch-s0", "cross Panda (mixed)": "pid-cross-s0"}

data = resolve(str(RUNS / "data" / "wch-single-val"))
table = pa.concat_tables(
    [read_shard(data, r).select(["event_id", "rings", "particles"]) for r in load_manifest(data).shards]
)
_, pid = event_labels(table, CATEGORIES)
fig, axes = plt.subplots(1, 2, figsize=(11, 4))
for label, run in ARMS.items():
    out = RUNS / "preds" / run
    files = json.loads((out / "manifest.json").read_text())["files"]
    preds = pa.concat_tables([pq.read_table(out / f) for f in files])
    assert preds.column("event_id").to_pylist() == table.column("event_id").to_pylist(), run
    e_score = np.array([p[0] for p in preds.column("pid_probs").to_pylist()])
    for ax, (bkg, name) in zip(axes, ((1, "muon"), (2, "pi0")), strict=True):
        sel = (pid == 0) | (pid == bkg)
        fpr, tpr, _ = roc_curve(pid[sel] == 0, e_score[sel])
        ax.plot(np.clip(fpr, 1e-4, 1), tpr, label=label)
        ax.set_title(f"electron vs {name} ({int((pid == 0).sum())} e, {int((pid == bkg).sum())} {name})")
for ax, (x, name) in zip(axes, ((1e-3, "99.9 % muon rejection"), (5e-2, "95 % pi0 rejection")), strict=True):
    ax.axvline(x, color="grey", ls=":", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("background passing (1 - rejection)")
    ax.set_ylabel("electron efficiency")
    ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(Path(__file__).with_name("pid-roc.png"), dpi=110)
