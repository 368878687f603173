"""Probe curves of the single-detector and cross-experiment backbones, one panel per detector, from the runs'
summary.json (run from the repository root: python results/cross-experiment/plot.py)."""

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RUNS = Path(sys.argv[1] if len(sys.argv) > 1 else "runs")
ARMS = {
    "lartpc": [("LArTPC only", "pretrain-panda-lartpc-300", None)],
    "wch": [("WCh only", "pretrain-panda-wch-tiny", None)],
}
for name, style in (
    ("pretrain-panda-cross-tiny", "cross, by detector"),
    ("pretrain-panda-cross-tiny-mixed", "cross, mixed"),
):
    for det in ARMS:
        ARMS[det].append((style, name, det))

fig, axes = plt.subplots(1, 2, figsize=(11, 4))
for ax, (det, arms) in zip(axes, ARMS.items(), strict=True):
    for label, run, key in arms:
        path = RUNS / run / "summary.json"
        if not path.exists():
            continue
        probe = json.loads(path.read_text())["probe"]
        probe = probe[key] if key else probe
        steps, miou = zip(*probe["curve"], strict=True)
        ax.plot(steps, miou, "-o", label=label)
    ax.set_title(f"linear probe on {det} (held-out events)")
    ax.set_xlabel("pretraining step (4 events each)")
    ax.set_ylabel("probe mIoU")
    ax.legend(fontsize=8)
fig.tight_layout()
out = Path(__file__).with_name("probes.png")
fig.savefig(out, dpi=110)
print(out)
