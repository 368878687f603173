"""The input-frame table of results/cross-experiment/README.md: `rings-wch-tiny` from scratch in the tank frame
against centred events, from the fine-tunes' summary.json (run from the repository root:
python results/cross-experiment/rings_frame_table.py [RUNS]). Per arm the mean and sample standard deviation over
seeds, then Welch's t-test between the arms per figure, then one row per run."""

import json
import statistics
import sys
from pathlib import Path

from scipy.stats import ttest_ind

RUNS = Path(sys.argv[1] if len(sys.argv) > 1 else "runs")
ARMS = {"tank frame": "rings-scratch-cfalse", "centred events": "rings-scratch-ctrue"}


def per_class_recall(cm: list[list[int]], k: int) -> float:
    return cm[k][k] / max(sum(cm[k]), 1)


FIGS = {
    "per-hit mIoU": lambda v: v["miou"],
    "ring accuracy": lambda v: v["ring_accuracy"],
    "1R recall": lambda v: per_class_recall(v["ring_count_confusion"], 0),
    "2R recall": lambda v: per_class_recall(v["ring_count_confusion"], 1),
    ">=3R recall": lambda v: per_class_recall(v["ring_count_confusion"], 2),
}

vals, rows = {}, []
for label, prefix in ARMS.items():
    vals[label] = {k: [] for k in FIGS}
    for path in sorted(RUNS.glob(f"{prefix}-s*/summary.json")):
        val = json.loads(path.read_text())["val"]
        for k, f in FIGS.items():
            vals[label][k].append(f(val))
        seed = path.parent.name.rsplit("-s", 1)[1]
        figs = " | ".join(f"{f(val):.3f}" for f in FIGS.values())
        rows.append(f"| {label} | {seed} | {figs} | {val['ring_count_confusion']} |")

print("| input | seeds | " + " | ".join(FIGS) + " |\n|" + "---|" * (len(FIGS) + 2))
for label, v in vals.items():
    n = len(v["per-hit mIoU"])
    print(
        f"| {label} | {n} | "
        + " | ".join(f"{statistics.mean(x):.3f} ± {statistics.stdev(x):.3f}" for x in v.values())
        + " |"
    )
a, b = vals.values()
print("| Welch p | | " + " | ".join(f"{ttest_ind(a[k], b[k], equal_var=False).pvalue:.2f}" for k in FIGS) + " |")
print(
    "\n| input | seed | "
    + " | ".join(FIGS)
    + " | ring confusion (rows true 1R / 2R / >=3R) |\n|"
    + "---|" * (len(FIGS) + 3)
)
print("\n".join(rows))
