"""The PID table of results/cross-experiment/README.md from the fine-tunes' summary.json: one row per run, then the
mean and sample standard deviation over seeds per initialisation (run from the repository root:
python results/cross-experiment/pid_table.py [RUNS [PREFIX]]; PREFIX pid1600 gives the longer fine-tunes' table)."""

import json
import statistics
import sys
from pathlib import Path

RUNS = Path(sys.argv[1] if len(sys.argv) > 1 else "runs")
PREFIX = sys.argv[2] if len(sys.argv) > 2 else "pid"
ARMS = {
    "scratch": "scratch",
    "scratch, centred events": "scratchc",  # the control: the pretrained arms' input frame
    "WCh-only Panda, fft": "wch",
    "cross Panda (mixed), fft": "cross",
}
ARMS = {label: f"{PREFIX}-{arm}" for label, arm in ARMS.items()}
FIGS = {
    "per-hit mIoU": lambda v: v["miou"],
    "ring accuracy": lambda v: v["ring_accuracy"],
    "e eff @ 99.9 % mu rej": lambda v: v["pid"]["e_eff_at_mu_rej_999"],
    "e eff @ 95 % pi0 rej": lambda v: v["pid"]["e_eff_at_pi0_rej_95"],
}


def fmt(xs: list[float]) -> str:
    if len(xs) == 1:
        return f"{xs[0]:.3f}"
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}"


rows, means = [], []
for label, prefix in ARMS.items():
    vals = {k: [] for k in FIGS}
    for path in sorted(RUNS.glob(f"{prefix}-s*/summary.json")):
        val = json.loads(path.read_text())["val"]
        pid = val["pid"]
        if not pid["detail"]["mu_rej_999"]["achievable"]:
            raise SystemExit(f"{path}: too few muons ({pid['events']['muon']}) to measure 99.9 % rejection")
        for k, f in FIGS.items():
            vals[k].append(f(val))
        seed = path.parent.name.rsplit("-s", 1)[1]
        rows.append(
            f"| {label} | {seed} | "
            + " | ".join(f"{f(val):.3f}" for f in FIGS.values())
            + f" | {val['ring_count_confusion']} | {pid['events']} |"
        )
    if vals["per-hit mIoU"]:
        means.append(f"| {label} | {len(vals['per-hit mIoU'])} | " + " | ".join(fmt(v) for v in vals.values()) + " |")

print("| init | seeds | " + " | ".join(FIGS) + " |\n|" + "---|" * (len(FIGS) + 2))
print("\n".join(means))
print("\n| init | seed | " + " | ".join(FIGS) + " | ring confusion | held-out events |\n|" + "---|" * (len(FIGS) + 4))
print("\n".join(rows))
