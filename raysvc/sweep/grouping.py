"""`raysvc sweep tune/cnms.yaml`: the tokenisation sweep of PoLAr-MAE's grouping figure.

Every trial groups the same held-out events (voxel units, after the energy cut) one way and reports coverage:
C-NMS + ball query over radius x overlap, and the baselines FPS + kNN (over centres per event) and FPS + ball query
(over centres x radius), all with `max_points` points per group. Coverage is pooled over all points of all events:
missed ratio = points in no group / points, duplicated ratio = points in more than one group / points.

The result: `summary.json` (every trial, the Pareto front of missed vs duplicated over all trials, the recommended
overlap per radius = the one with the smallest missed + duplicated), `grouping.png` and `table.md` (and, with the
`pretrain` objective, `token-probe.png`).

With a `pretrain` section the sweep adds the paper's second objective: per setting (each radius at its recommended
overlap, or a given list) a short PoLAr-MAE pretraining, scored by its token probe (summary.json ->
"representation"), so each setting is judged on coverage and on what an encoder learns from its tokens.
"""

from __future__ import annotations

import copy
import json
import time

import numpy as np
import torch

from raysvc.data.streaming.pipeline import DirectStream
from raysvc.ops import cnms, coverage
from raysvc.ops.neighbors import ball_query, fps, knn
from raysvc.storage import resolve, write_bytes_atomic
from raysvc.sweep.runner import run_grid
from raysvc.sweep.spec import CNMSSweep


def _num(x: float) -> str:
    return f"{x:g}"


def grid_trials(spec: CNMSSweep) -> list[dict]:
    """The trial dicts of the spec: C-NMS first, then the FPS baselines."""
    out = [
        {"name": f"cnms-r{_num(r)}-o{_num(o)}", "method": "cnms", "radius": r, "overlap": o}
        for r in spec.cnms.radius
        for o in spec.cnms.overlap
    ]
    if spec.fps_knn:
        out += [{"name": f"fps_knn-g{g}", "method": "fps_knn", "groups": g} for g in spec.fps_knn.groups]
    if spec.fps_ball:
        out += [
            {"name": f"fps_ball-g{g}-r{_num(r)}", "method": "fps_ball", "groups": g, "radius": r}
            for g in spec.fps_ball.groups
            for r in spec.fps_ball.radius
        ]
    return out


def load_events(spec: CNMSSweep) -> list[np.ndarray]:
    """The first `spec.events` events of `spec.data` after its cuts, as float64 voxel coordinates."""
    stream = DirectStream(spec.data)
    pre = spec.data.preprocess
    out: list[np.ndarray] = []
    for batch in stream.iter_packed(batch_events=8):
        coord = batch["coord"].double().numpy() * pre.scale + pre.center  # undo the normalisation
        for s, e in zip([0, *batch["offset"][:-1].tolist()], batch["offset"].tolist(), strict=True):
            out.append(coord[s:e])
            if len(out) == spec.events:
                return out
    raise ValueError(f"{spec.data.uri}: {len(out)} events after the cuts, the sweep asks for {spec.events}")


def group(coord: torch.Tensor, offset: torch.Tensor, params: dict, max_points: int) -> torch.Tensor:
    """(G, max_points) point indices, -1 padded, of one method's groups over a packed batch."""
    method = params["method"]
    if method == "cnms":
        return cnms(coord, offset, params["radius"], params["overlap"], max_points).groups
    sizes = torch.diff(offset, prepend=torch.zeros(1, dtype=offset.dtype))
    centres, c_off = fps(coord, offset, torch.clamp(sizes, max=int(params["groups"])))
    if method == "fps_knn":
        return knn(coord[centres], c_off, coord, offset, max_points)[0]
    if method == "fps_ball":
        return ball_query(coord[centres], c_off, coord, offset, params["radius"], max_points)
    raise ValueError(f"unknown grouping method {method!r} (expected cnms, fps_knn or fps_ball)")


def evaluate(events: list[np.ndarray], params: dict, max_points: int) -> dict:
    """Coverage, group statistics and time per event of one setting on `events`."""
    coord = torch.from_numpy(np.concatenate(events))
    offset = torch.cumsum(torch.tensor([len(e) for e in events]), 0)
    group(coord[: len(events[0])], offset[:1], params, max_points)  # warm-up: numba kernels compile once
    t0 = time.perf_counter()
    groups = group(coord, offset, params, max_points)
    seconds = time.perf_counter() - t0
    cov = coverage(len(coord), groups)
    filled = (groups >= 0).sum(1).double()
    return {
        **cov,
        "groups_per_event": len(groups) / len(events),
        "points_per_group": float(filled.mean()),
        "ms_per_event": 1000 * seconds / len(events),
    }


def grouping_trial(config: dict, events: list[np.ndarray], max_points: int, sweep: str, wandb: tuple) -> None:
    """Tune function trainable: one grouping setting, one report."""
    from ray import tune

    from raysvc.train.tracking import Tracker

    params = config["trial"]
    metrics = evaluate(events, params, max_points)
    project, mode = wandb
    tracker = Tracker(
        project, f"{sweep}-{params['name']}", mode, params, 0, tune.get_context().get_trial_dir(), group=sweep
    )
    tracker.log(metrics, step=0)
    tracker.finish(teardown=True)
    tune.report(metrics)


def probe_trials(spec: CNMSSweep, recommended: dict[str, dict]) -> list[dict]:
    """The (radius, overlap) settings the representation objective pretrains on."""
    obj = spec.pretrain
    if obj.settings == "recommended":
        pairs = [(float(r), b["overlap"]) for r, b in recommended.items()]
    else:
        pairs = [(float(r), float(o)) for r, o in obj.settings]
    return [{"name": f"mae-r{_num(r)}-o{_num(o)}", "radius": r, "overlap": o} for r, o in pairs]


def pretrain_trial(config: dict, base: dict, sweep: str, runs_uri: str) -> None:
    """Tune function trainable: one Ray Train PoLAr-MAE pretraining with this setting's tokenizer, scored by its
    token probe at the end."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from raysvc.train.driver import run_job
    from raysvc.train.tasks.polarmae import PolarMAEJob

    params = config["trial"]
    d = copy.deepcopy(base)
    d["model"] |= {"radius_voxels": params["radius"], "overlap": params["overlap"]}
    d["run"] |= {"name": f"{sweep}-{params['name']}", "storage": runs_uri, "wandb_group": sweep}
    summary = run_job(PolarMAEJob.model_validate(d), callbacks=[TuneReportCallback()])
    probe = summary.get("probe") or {}
    if probe.get("token_mean_f1") is None:
        raise ValueError(f"trial {params['name']}: the run reported no token probe (does its job set probe_data?)")
    tune.report(
        {
            "token_mean_f1": probe["token_mean_f1"],
            "token_f1": probe["token_f1"],
            "random_token_mean_f1": probe.get("random_token_mean_f1"),
            "gain": probe.get("gain"),
            "tokens_per_event": summary["tokens"]["per_event_mean"],
            "truncated_events": summary["tokens"]["truncated_events"],
            "steps": summary["steps"],
            "wall_s": summary["wall_s"],
            "run_uri": summary["uri"],
        }
    )


def probe_job(spec: CNMSSweep):
    """The token-probe objective's base job: `pretrain.job` reading the sweep's data (the probe's labelled events,
    and the pretraining events unless `pretrain.data` names others), then `pretrain.set`. Its job file, probe
    section and datasets are checked here, before the sweep's first trial."""
    from raysvc.config import load_config
    from raysvc.storage import absolute_uri
    from raysvc.sweep.inputs import check_datasets
    from raysvc.train.tasks.polarmae import PolarMAEJob

    obj = spec.pretrain
    follow = [f"data.uri={obj.data or spec.data.uri}", f"probe_data.uri={spec.data.uri}"]
    base = load_config(PolarMAEJob, obj.job, [*follow, *obj.set])
    if base.probe_data is None:
        raise ValueError(f"pretrain.job {obj.job}: the token-probe objective needs probe_data (labelled events)")
    base.data.uri, base.probe_data.uri = absolute_uri(base.data.uri), absolute_uri(base.probe_data.uri)
    check_datasets({"pretrain: the pretraining data": base.data.uri, "pretrain: the probe data": base.probe_data.uri})
    return base


def run_probe_objective(spec: CNMSSweep, rows: list[dict], recommended: dict, events, exp, log=print) -> dict:
    """The representation objective: one short PoLAr-MAE pretraining per setting (a grid of its own under
    `<experiment>/token-probe`), each row joined with the coverage of the same setting on the sweep's events."""
    from raysvc.storage import absolute_uri

    obj = spec.pretrain
    base = probe_job(spec)
    trials = probe_trials(spec, recommended)
    log(
        f"[raysvc] token-probe objective: {len(trials)} PoLAr-MAE pretrainings of {base.train.steps} steps "
        f"({', '.join(t['name'] for t in trials)})"
    )
    outcome = run_grid(
        pretrain_trial,
        trials,
        obj.tune,
        exp.join("token-probe"),
        log,
        base=base.model_dump(mode="json"),
        sweep=spec.name,
        runs_uri=absolute_uri(exp.join("runs").uri),  # a trial runs in a directory of Ray's, not here
    )
    coverage_of = {
        (r["trial"]["radius"], r["trial"]["overlap"]): r["metrics"] for r in rows if r["trial"]["method"] == "cnms"
    }
    keys = ("token_mean_f1", "token_f1", "random_token_mean_f1", "gain", "tokens_per_event", "truncated_events")
    out = []
    for r in outcome.trials:
        t = r["trial"]
        cov = coverage_of.get((t["radius"], t["overlap"]))
        if cov is None:  # a setting outside the coverage grid: measured here on the same events
            cov = evaluate(events, {"method": "cnms", "radius": t["radius"], "overlap": t["overlap"]}, spec.max_points)
        out.append(
            {
                "trial": t,
                "metrics": {k: r["metrics"].get(k) for k in (*keys, "steps", "wall_s", "run_uri")},
                "coverage": {k: cov[k] for k in ("missed_ratio", "duplicated_ratio", "groups_per_event")},
            }
        )
    scored = [r for r in out if r["metrics"]["token_mean_f1"] is not None]
    best = max(scored, key=lambda r: r["metrics"]["token_mean_f1"])["trial"]["name"] if scored else None
    return {"job": obj.job, "steps": base.train.steps, "trials": out, "failed": outcome.failed, "best": best}


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point dominates (<= in both coordinates, < in one), by the first coordinate."""
    front = [i for i, (a, b) in enumerate(points) if not any(c <= a and d <= b and (c < a or d < b) for c, d in points)]
    return sorted(front, key=lambda i: points[i])


def recommend(rows: list[dict]) -> dict[str, dict]:
    """Per C-NMS radius, the overlap with the smallest missed + duplicated ratio (ties: the larger overlap, fewer
    groups)."""
    best: dict[float, dict] = {}
    for r in rows:
        t, m = r["trial"], r["metrics"]
        if t["method"] != "cnms":
            continue
        score = (m["missed_ratio"] + m["duplicated_ratio"], -t["overlap"])
        if t["radius"] not in best or score < best[t["radius"]]["score"]:
            best[t["radius"]] = {
                "score": score,
                "overlap": t["overlap"],
                "missed_ratio": m["missed_ratio"],
                "duplicated_ratio": m["duplicated_ratio"],
                "groups_per_event": m["groups_per_event"],
                "points_per_group": m["points_per_group"],
            }
    return {_num(r): {k: v for k, v in b.items() if k != "score"} for r, b in sorted(best.items())}


def table_md(summary: dict) -> str:
    lines = [
        "| method | radius (voxels) | overlap / centres | missed | duplicated | groups / event | points / group |",
        "|---|---|---|---|---|---|---|",
    ]
    for r, b in summary["recommended"].items():
        lines.append(
            f"| C-NMS + ball (recommended) | {r} | {b['overlap']:g} | {b['missed_ratio']:.3f} | "
            f"{b['duplicated_ratio']:.3f} | {b['groups_per_event']:.0f} | {b['points_per_group']:.1f} |"
        )
    for row in summary["trials"]:
        t, m = row["trial"], row["metrics"]
        if t["method"] == "cnms":
            continue
        label = "FPS + kNN" if t["method"] == "fps_knn" else "FPS + ball"
        radius = _num(t["radius"]) if "radius" in t else "-"
        lines.append(
            f"| {label} | {radius} | {t['groups']} | {m['missed_ratio']:.3f} | {m['duplicated_ratio']:.3f} "
            f"| {m['groups_per_event']:.0f} | {m['points_per_group']:.1f} |"
        )
    rep = summary.get("representation")
    if rep:
        lines += [
            "",
            f"Token probe after {rep['steps']} PoLAr-MAE pretraining steps per setting (mean F1; best: {rep['best']}):",
            "",
            "| radius (voxels) | overlap | token probe mean F1 | random init | missed | duplicated | tokens / event |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in rep["trials"]:
            t, m, c = row["trial"], row["metrics"], row["coverage"]
            rand = "-" if m["random_token_mean_f1"] is None else f"{m['random_token_mean_f1']:.3f}"
            lines.append(
                f"| {_num(t['radius'])} | {_num(t['overlap'])} | {m['token_mean_f1']:.3f} | {rand} | "
                f"{c['missed_ratio']:.3f} | {c['duplicated_ratio']:.3f} | {m['tokens_per_event']:.0f} |"
            )
        lines += [f"| {f['trial']['name']} | failed: {f['error'][:80]} | | | | | |" for f in rep["failed"]]
    return "\n".join(lines) + "\n"


def token_probe_png(rep: dict) -> bytes:
    """The representation objective: token-probe mean F1 per setting after the short pretraining and at its random
    initialisation (left), and the F1 of each class after pretraining (right), against the C-NMS radius."""
    import matplotlib.pyplot as plt

    from raysvc.train.plots import fig_png

    rows = sorted(
        (r for r in rep["trials"] if r["metrics"]["token_mean_f1"] is not None), key=lambda r: r["trial"]["radius"]
    )
    radius = [r["trial"]["radius"] for r in rows]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.6))
    ax.plot(radius, [r["metrics"]["token_mean_f1"] for r in rows], "o-", label=f"after {rep['steps']} steps")
    random = [r["metrics"]["random_token_mean_f1"] for r in rows]
    if all(v is not None for v in random):
        ax.plot(radius, random, "s--", color="gray", label="random initialisation")
    for r in rows:
        ax.annotate(f"o={r['trial']['overlap']:g}", (r["trial"]["radius"], r["metrics"]["token_mean_f1"]), fontsize=7)
    ax.set_title("token probe, mean F1")
    for name in rows[0]["metrics"]["token_f1"] if rows else ():
        ax2.plot(radius, [r["metrics"]["token_f1"][name] for r in rows], "o-", label=name)
    ax2.set_title(f"token probe F1 per class after {rep['steps']} steps")
    for a in (ax, ax2):
        a.set_xscale("log")
        a.set_xticks(radius, [f"{r:g}" for r in radius])
        a.minorticks_off()
        a.set_xlabel("C-NMS radius (voxels)")
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    return fig_png(fig)


def grouping_png(summary: dict) -> bytes:
    import matplotlib.pyplot as plt

    from raysvc.train.plots import fig_png

    rows = summary["trials"]
    cn = [r for r in rows if r["trial"]["method"] == "cnms"]
    radii = sorted({r["trial"]["radius"] for r in cn})
    cmap = plt.get_cmap("viridis")
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5.2))
    for i, rad in enumerate(radii):
        pts = sorted((r for r in cn if r["trial"]["radius"] == rad), key=lambda r: r["trial"]["overlap"])
        c = cmap(i / max(len(radii) - 1, 1))
        dots = dict(color=c, ms=3)  # one radius: one colour on both panels
        x = [p["metrics"]["duplicated_ratio"] for p in pts]
        ax.plot(x, [p["metrics"]["missed_ratio"] for p in pts], "o-", lw=1.2, label=f"C-NMS r={rad:g}", **dots)
        x = [p["trial"]["overlap"] for p in pts]
        ax2.plot(x, [p["metrics"]["groups_per_event"] for p in pts], "o-", label=f"r={rad:g}", **dots)
        rec = summary["recommended"].get(_num(rad))
        if rec:
            ax.plot(rec["duplicated_ratio"], rec["missed_ratio"], "*", color=c, ms=14, mec="k")
    for method, marker, label in (("fps_knn", "s", "FPS + kNN"), ("fps_ball", "^", "FPS + ball")):
        pts = [r for r in rows if r["trial"]["method"] == method]
        if pts:
            ax.scatter(
                [p["metrics"]["duplicated_ratio"] for p in pts],
                [p["metrics"]["missed_ratio"] for p in pts],
                marker=marker,
                s=36,
                facecolors="none",
                edgecolors="tab:red" if method == "fps_knn" else "tab:orange",
                label=label,
            )
    front = [rows[i]["metrics"] for i in summary["pareto_index"]]
    ax.step(
        [m["duplicated_ratio"] for m in front],
        [m["missed_ratio"] for m in front],
        "k--",
        where="post",
        lw=1,
        label="Pareto front",
    )
    ax.set_xlabel("duplicated points ratio")
    ax.set_ylabel("missed points ratio")
    ax.set_title(f"grouping coverage on {summary['events']} events (stars: recommended overlap)")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    ax2.set_yscale("log")
    ax2.set_xlabel("C-NMS overlap factor")
    ax2.set_ylabel("groups per event")
    ax2.set_title("token count")
    ax2.legend(fontsize=7)
    ax2.grid(alpha=0.3)
    return fig_png(fig)


def run_cnms_sweep(spec: CNMSSweep, log=print) -> dict:
    from raysvc.sweep.inputs import check_datasets

    t0 = time.time()
    check_datasets({"data.uri": spec.data.uri})
    if spec.pretrain is not None:
        probe_job(spec)  # the second stage's job file and datasets, before the first stage runs
    events = load_events(spec)
    trials = grid_trials(spec)
    exp = resolve(spec.storage).join(spec.name)
    log(
        f"[raysvc] C-NMS sweep {spec.name}: {len(trials)} trials on {len(events)} events "
        f"({sum(len(e) for e in events)} points), {spec.tune.max_concurrent_trials} at a time"
    )
    outcome = run_grid(
        grouping_trial,
        trials,
        spec.tune,
        exp,
        log,
        events=events,
        max_points=spec.max_points,
        sweep=spec.name,
        wandb=(spec.wandb_project, spec.wandb_mode),
    )
    keys = ("missed_ratio", "duplicated_ratio", "groups_per_event", "points_per_group", "ms_per_event")
    rows = [{"trial": r["trial"], "metrics": {k: r["metrics"][k] for k in keys}} for r in outcome.trials]
    summary = {
        "sweep": spec.name,
        "uri": exp.uri,
        "events": len(events),
        "points": int(sum(len(e) for e in events)),
        "max_points": spec.max_points,
        "trials": rows,
        "failed": outcome.failed,
        "resumed": outcome.resumed,
        "pareto_index": pareto_front([(r["metrics"]["duplicated_ratio"], r["metrics"]["missed_ratio"]) for r in rows]),
        "recommended": recommend(rows),
        "wall_s": time.time() - t0,
        "spec": spec.model_dump(mode="json"),
    }
    summary["pareto"] = [rows[i]["trial"]["name"] for i in summary["pareto_index"]]
    if spec.pretrain is not None:
        summary["representation"] = run_probe_objective(spec, rows, summary["recommended"], events, exp, log)
        summary["wall_s"] = time.time() - t0
    write_bytes_atomic(exp.join("summary.json"), json.dumps(summary, indent=2).encode())
    write_bytes_atomic(exp.join("table.md"), table_md(summary).encode())
    if rows:
        write_bytes_atomic(exp.join("grouping.png"), grouping_png(summary))
    if summary.get("representation", {}).get("trials"):
        write_bytes_atomic(exp.join("token-probe.png"), token_probe_png(summary["representation"]))
    return summary
