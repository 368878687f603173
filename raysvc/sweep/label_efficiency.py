"""`raysvc sweep tune/finetune-fractions.yaml`: the label-efficiency matrix (the talk's table A).

Trials are labelled-event counts x fine-tuning modes (lin, dec, fft, scratch). Each trial is a whole Ray Train
fine-tuning run (`train.driver.run_job`, Train inside a Tune function trainable), from the exported backbone `init`
(scratch: none), scored on the job's validation events, which every trial shares.

Before any trial, each label subset is materialised once as its own shards under the experiment directory: the same
nested, seeded events that `data.subset_events=N` selects, but a trial then reads N events instead of filtering
every shard of the dataset (37,375 events read for 1,637 used in a 100-event run otherwise).

The fine-tuning runs live at `<experiment>/runs/<sweep>-<trial>`: an interrupted trial that is resumed continues its
own Train run from its last checkpoint. Output: `summary.json`, `table.md` / `table.json` (rows = modes, columns =
labelled events, cells = the metric) and `label_efficiency.png` (metric vs labelled events, log x, one line per
mode).
"""

from __future__ import annotations

import json
import time

from raysvc.config import load_config
from raysvc.data.shards import load_manifest
from raysvc.data.subset import write_subsets
from raysvc.storage import Location, absolute_uri, resolve, write_bytes_atomic
from raysvc.sweep.runner import run_grid
from raysvc.sweep.spec import FinetuneSweep
from raysvc.train.tasks.segmentation import FinetuneConfig


def _label(n: int | None) -> str:
    return "all" if n is None else str(n)


def materialise_subsets(
    cfg: FinetuneConfig, counts: list[int | None], seed: int, exp: Location, min_shards: int, log=print
) -> dict[str, str]:
    """{label: dataset URI}: `all` is the job's own data; each N is written (once) under exp/subsets/events-N, split
    into >= `min_shards` shards so that every worker owns one."""
    targets = {n: exp.join("subsets", f"events-{n}") for n in counts if n is not None}
    write_subsets(cfg.data.location(), targets, seed, min_shards, cfg.data.verify_checksums, log)
    out = {_label(n): cfg.data.uri for n in counts if n is None}
    return out | {str(n): loc.uri for n, loc in targets.items()}


def grid_trials(spec: FinetuneSweep, uris: dict[str, str]) -> list[dict]:
    """One trial per mode x label count, with its dataset and that dataset's event count (before the cuts)."""
    sizes = {k: load_manifest(resolve(u)).events for k, u in uris.items()}
    return [
        {
            "name": f"{mode}-{_label(n)}",
            "mode": mode,
            "events": n,
            "data_uri": uris[_label(n)],
            "labelled_events": sizes[_label(n)],
        }
        for mode in spec.modes
        for n in spec.events
    ]


def trial_config(base: FinetuneConfig, params: dict, sweep: str, init: str, runs_uri: str) -> FinetuneConfig:
    """The fine-tuning job of one trial: the base job on its subset, in its mode, in the sweep's wandb group."""
    d = base.model_dump(mode="json")
    d["data"] |= {"uri": params["data_uri"], "subset_events": None, "subset_fraction": None}
    mode = params["mode"]
    d["model"] |= {"mode": mode, "init": None if mode == "scratch" else init}
    if mode in ("lin", "dec"):
        d["model"]["head"] = mode
    d["run"] |= {"name": f"{sweep}-{params['name']}", "storage": runs_uri, "wandb_group": sweep}
    return FinetuneConfig.model_validate(d)


def finetune_trial(config: dict, base: dict, sweep: str, init: str, runs_uri: str, metric: str) -> None:
    """Tune function trainable: one Ray Train fine-tuning run; its reports stream to Tune, then the final scores."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from raysvc.train.driver import run_job

    params = config["trial"]
    cfg = trial_config(FinetuneConfig.model_validate(base), params, sweep, init, runs_uri)
    summary = run_job(cfg, callbacks=[TuneReportCallback()])
    val = summary["val"] or {}
    if val.get(metric) is None:
        raise ValueError(f"trial {params['name']}: the validation metrics have no {metric!r} value")
    tune.report(
        {
            metric: val[metric],
            "miou": val["miou"],
            "accuracy": val["accuracy"],
            "iou": val["iou"],
            "steps": summary["steps"],
            "wall_s": summary["wall_s"],
            "run_uri": summary["uri"],
        }
    )


def matrix(spec: FinetuneSweep, rows: list[dict]) -> dict:
    """{"modes", "events", "cells": {mode: {label: value | None}}} of the spec's metric."""
    cells = {m: {_label(n): None for n in spec.events} for m in spec.modes}
    for r in rows:
        t = r["trial"]
        cells[t["mode"]][_label(t["events"])] = r["metrics"][spec.metric]
    return {
        "metric": spec.metric,
        "modes": list(spec.modes),
        "events": [_label(n) for n in spec.events],
        "cells": cells,
    }


def table_md(table: dict, failed: list[dict]) -> str:
    bad = {f["trial"]["name"] for f in failed}
    head = "| mode | " + " | ".join(f"{e} events" if e != "all" else "all events" for e in table["events"]) + " |"
    lines = [head, "|---" * (len(table["events"]) + 1) + "|"]
    for m in table["modes"]:
        vals = []
        for e in table["events"]:
            v = table["cells"][m][e]
            vals.append("failed" if f"{m}-{e}" in bad else ("-" if v is None else f"{v:.3f}"))
        lines.append(f"| {m} | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


def efficiency_png(table: dict, total_events: int | None) -> bytes:
    import matplotlib.pyplot as plt

    from raysvc.train.plots import fig_png

    fig, ax = plt.subplots(figsize=(7, 4.6))
    for m in table["modes"]:
        xs, ys = [], []
        for e in table["events"]:
            v = table["cells"][m][e]
            x = total_events if e == "all" else int(e)
            if v is not None and x:
                xs.append(x)
                ys.append(v)
        ax.plot(xs, ys, "o-", label=m)
    ax.set_xscale("log")
    ax.set_xlabel("labelled training events")
    ax.set_ylabel(f"validation {table['metric']}")
    ax.set_title("label efficiency: fine-tuning modes")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    return fig_png(fig)


def run_finetune_sweep(spec: FinetuneSweep, log=print) -> dict:
    from raysvc.inference.record import load_export

    t0 = time.time()
    base = load_config(FinetuneConfig, spec.job, spec.set)
    base.data.uri, base.val_data.uri = absolute_uri(base.data.uri), absolute_uri(base.val_data.uri)
    init = absolute_uri(spec.init)
    if any(m != "scratch" for m in spec.modes):
        load_export(resolve(init))  # fails here, naming the directory, rather than in every trial
    exp = resolve(absolute_uri(spec.storage)).join(spec.name)
    uris = materialise_subsets(base, spec.events, spec.subset_seed, exp, base.scaling.workers, log)
    trials = grid_trials(spec, uris)
    total = next(t["labelled_events"] for t in trials if t["events"] is None) if None in spec.events else None
    counts = ", ".join(_label(n) for n in spec.events)
    log(
        f"[raysvc] label-efficiency sweep {spec.name}: {len(trials)} trials ({', '.join(spec.modes)} x {counts} "
        f"events), {spec.tune.max_concurrent_trials} at a time"
    )
    outcome = run_grid(
        finetune_trial,
        trials,
        spec.tune,
        exp,
        log,
        base=base.model_dump(mode="json"),
        sweep=spec.name,
        init=init,
        runs_uri=exp.join("runs").uri,
        metric=spec.metric,
    )
    keep = (spec.metric, "miou", "accuracy", "iou", "steps", "wall_s", "run_uri")
    rows = [{"trial": r["trial"], "metrics": {k: r["metrics"].get(k) for k in keep}} for r in outcome.trials]
    table = matrix(spec, rows)
    summary = {
        "sweep": spec.name,
        "uri": exp.uri,
        "table": table,
        "trials": rows,
        "failed": outcome.failed,
        "resumed": outcome.resumed,
        "train_events_total": total,
        "wall_s": time.time() - t0,
        "spec": spec.model_dump(mode="json"),
    }
    write_bytes_atomic(exp.join("summary.json"), json.dumps(summary, indent=2).encode())
    write_bytes_atomic(exp.join("table.json"), json.dumps(table, indent=2).encode())
    write_bytes_atomic(exp.join("table.md"), table_md(table, outcome.failed).encode())
    write_bytes_atomic(exp.join("label_efficiency.png"), efficiency_png(table, total))
    return summary
