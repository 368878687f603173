"""Training curves as a PNG: loss and lr over steps, validation mIoU and per-class IoU over steps."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def curves_png(history: dict, title: str) -> bytes:
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    tr = history.get("train", [])
    if tr:
        a.plot([r["step"] for r in tr], [r["loss"] for r in tr], label="train loss")
        a.set_yscale("log")
        a.set_xlabel("step")
        a.set_ylabel("loss")
        lr = a.twinx()
        lr.plot([r["step"] for r in tr], [r["lr"] for r in tr], color="grey", alpha=0.5, label="lr")
        lr.set_ylabel("learning rate")
    val = history.get("val", [])
    if val:
        steps = [v["step"] for v in val]
        b.plot(steps, [v["metrics"]["miou"] for v in val], "k-o", label="mIoU", linewidth=2)
        for name in val[-1]["metrics"]["iou"]:
            ys = [v["metrics"]["iou"].get(name) for v in val]
            b.plot(steps, [y if y is not None else float("nan") for y in ys], "--", label=name)
        b.set_ylim(0, 1)
        b.set_xlabel("step")
        b.set_ylabel("validation IoU")
        b.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
