"""Training curves as a PNG: loss and lr over steps, validation mIoU and per-class IoU over steps."""

from __future__ import annotations

import io


def _pyplot():
    """pyplot on the Agg backend, imported on first use: matplotlib costs ~0.4 s at import, paid otherwise by every
    command and Train worker that imports a task module, while only the driver draws."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def curves_png(history: dict, title: str) -> bytes:
    plt = _pyplot()
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
    return fig_png(fig, title)


def pretrain_png(history: dict, title: str, probe_only: bool = False) -> bytes:
    """Probe mIoU / mF1 over steps (step 0 = random init); unless `probe_only`, also the losses and the collapse
    monitors (prototype usage, feature std)."""
    plt = _pyplot()
    probes = history.get("probe", [])
    if probe_only:
        fig, axes = plt.subplots(1, 1, figsize=(6, 4))
        axes = [axes]
    else:
        fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    a = axes[0]
    if probes:
        steps = [p["step"] for p in probes]
        a.plot(steps, [p["miou"] for p in probes], "k-o", label="probe mIoU", linewidth=2)
        a.plot(steps, [p["mf1"] for p in probes], "b--o", label="probe mF1")
        if probes[0]["step"] == 0:
            a.axhline(probes[0]["miou"], color="grey", linestyle=":", label="random init (step 0)")
        a.set_ylim(0, 1)
    a.set_xlabel("step")
    a.set_ylabel("linear probe on frozen features")
    a.legend(fontsize=8)
    if not probe_only:
        tr = history.get("train", [])
        b = axes[1]
        for key in ("loss", "mask_loss", "roll_mask_loss", "unmask_loss"):
            if tr and key in tr[0]:
                b.plot([r["step"] for r in tr], [r[key] for r in tr], label=key)
        b.set_xlabel("step")
        b.set_ylabel("loss")
        b.legend(fontsize=8)
        c = axes[2]
        mon = history.get("monitor", [])
        if mon:
            steps = [m["step"] for m in mon]
            c.plot(steps, [m["proto_used_frac"] for m in mon], label="prototypes used by the student (fraction)")
            c.plot(
                steps, [m.get("teacher_proto_used_frac", float("nan")) for m in mon], "--", label="... by the teacher"
            )
            c.plot(steps, [m["feat_std"] for m in mon], label="feature std")
            c.set_ylim(0, 1.05)
            p = c.twinx()
            p.plot(steps, [m["proto_perplexity"] for m in mon], color="red", alpha=0.5, label="perplexity")
            p.set_ylabel("prototype perplexity", color="red")
        c.set_xlabel("step")
        c.legend(fontsize=8, loc="lower left")
    return fig_png(fig, title)


def mae_png(history: dict, title: str) -> bytes:
    """PoLAr-MAE: token-probe F1 per class and its mean over steps (step 0 = random init), and the losses."""
    plt = _pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    probes = history.get("probe", [])
    if probes:
        steps = [p["step"] for p in probes]
        a.plot(steps, [_nan(p["token_mean_f1"]) for p in probes], "k-o", label="mean F1", linewidth=2)
        for name in probes[-1]["token_f1"]:
            a.plot(steps, [_nan(p["token_f1"].get(name)) for p in probes], "--", label=name)
        a.set_ylim(0, 1)
        a.legend(fontsize=8)
    a.set_xlabel("step")
    a.set_ylabel("token probe F1 (frozen encoder, linear SVM)")
    tr = history.get("train", [])
    for key in ("loss", "chamfer_loss", "energy_loss"):
        if tr and key in tr[0]:
            b.plot([r["step"] for r in tr], [r[key] for r in tr], label=key)
    b.set_yscale("log")
    b.set_xlabel("step")
    b.set_ylabel("loss")
    b.legend(fontsize=8)
    return fig_png(fig, title)


def _nan(v: float | None) -> float:
    return float("nan") if v is None else v


def fig_png(fig, title: str | None = None) -> bytes:
    """The figure as PNG bytes (closed afterwards)."""
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    _pyplot().close(fig)
    return buf.getvalue()
