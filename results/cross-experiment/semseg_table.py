"""The LArTPC 100-label table of results/cross-experiment/README.md from the fine-tunes' summary.json: one row per
run, then the mean and sample standard deviation over seeds per backbone (run from the repository root:
python results/cross-experiment/semseg_table.py [RUNS])."""

import json
import statistics
import sys
from pathlib import Path

from scipy.stats import ttest_ind

RUNS = Path(sys.argv[1] if len(sys.argv) > 1 else "runs")
ARMS = {"LArTPC-only Panda": "semseg-100-from-lartpc", "cross Panda (mixed)": "semseg-100-from-cross-mixed"}
CLASSES = ["shower", "track", "michel", "delta", "led"]


def fmt(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"


rows, means, miou = [], [], {}
for label, prefix in ARMS.items():
    cols: dict[str, list[float]] = {k: [] for k in ["miou", *CLASSES]}
    for path in sorted(RUNS.glob(f"{prefix}-s*/summary.json")):
        val = json.loads(path.read_text())["val"]
        figs = {"miou": val["miou"], **{c: val["iou"][c] for c in CLASSES}}
        for k, v in figs.items():
            cols[k].append(v)
        seed = path.parent.name.rsplit("-s", 1)[1]
        rows.append(f"| {label} | {seed} | " + " | ".join(f"{v:.3f}" for v in figs.values()) + " |")
    miou[label] = cols["miou"]
    if cols["miou"]:
        means.append(f"| {label} | {len(cols['miou'])} | " + " | ".join(fmt(v) for v in cols.values()) + " |")

head = " | ".join(["val mIoU", *CLASSES])
print(f"| backbone | seeds | {head} |\n|" + "---|" * (len(CLASSES) + 3))
print("\n".join(means))
print(f"\n| backbone | seed | {head} |\n|" + "---|" * (len(CLASSES) + 3))
print("\n".join(rows))
(a, xa), (b, xb) = miou.items()
if len(xa) > 1 and len(xb) > 1:
    t = ttest_ind(xb, xa, equal_var=False)  # Welch: the two arms' spreads need not be equal
    diff = statistics.mean(xb) - statistics.mean(xa)
    print(f"\n{b} - {a}: val mIoU {diff:+.3f}, Welch t = {t.statistic:.2f}, two-sided p = {t.pvalue:.3f}")
