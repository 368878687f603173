"""`raysvc sweep tune/finetune-fractions.yaml`: the label-efficiency matrix (the talk's table A), and of any other
fine-tuning task (`tune/panoptic-fractions.yaml`: the instance tasks B and C).

Trials are labelled-event counts x fine-tuning modes (lin, dec, fft, scratch), optionally x training seeds. Each
trial is a whole Ray Train fine-tuning run (`train.driver.run_job`, Train inside a Tune function trainable) of the
job's own task, from the exported backbone `init` (scratch: none), scored on the job's validation events, which every
trial shares. With seeds, a cell is the mean over its seeds, with their standard deviation beside it.

Before any trial, each label subset is materialised once as its own shards under the experiment directory: the same
nested, seeded events that `data.subset_events=N` selects, but a trial then reads N events instead of filtering
every shard of the dataset (37,375 events read for 1,637 used in a 100-event run otherwise).

The fine-tuning runs live at `<experiment>/runs/<sweep>-<trial>`: an interrupted trial that is resumed continues its
own Train run from its last checkpoint. Output: `summary.json`, `table.md` / `table.json` (rows = modes, columns =
labelled events, cells = the metric; then, when the spec lists `columns`, one row per mode x events and one column
per metric) and `label_efficiency.png` (metric vs labelled events, log x, one line per mode).
"""

from __future__ import annotations

import json
import math
import time

from raysvc.data.streaming.shards import load_manifest
from raysvc.data.streaming.subset import write_subsets
from raysvc.storage import Location, absolute_uri, resolve, write_bytes_atomic
from raysvc.sweep.inputs import check_datasets
from raysvc.sweep.runner import run_grid
from raysvc.sweep.spec import FinetuneSweep
from raysvc.train.driver import load_job
from raysvc.train.tasks import get_task
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
    """One trial per mode x label count (x seed), with its dataset and that dataset's event count (before the
    cuts). Without seeds a trial has no `seed` key and is named `<mode>-<events>`; with them,
    `<mode>-<events>-s<seed>`, seed-major: Tune starts trials in this order, so a sweep stopped early holds whole
    tables of its first seeds rather than every seed of a few cells."""
    sizes = {k: load_manifest(resolve(u)).events for k, u in uris.items()}
    cells = [
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
    if spec.seeds is None:
        return cells
    return [c | {"name": f"{c['name']}-s{s}", "seed": s} for s in spec.seeds for c in cells]


def metric_value(val: dict, key: str):
    """The value at the dotted `key` of a run's validation metrics (`particle.pid_accuracy.muon`); KeyError naming
    the missing part and what was there."""
    node = val
    for i, part in enumerate(key.split(".")):
        if not isinstance(node, dict) or part not in node:
            at = ".".join(key.split(".")[:i]) or "val"
            have = sorted(node) if isinstance(node, dict) else type(node).__name__
            raise KeyError(f"the validation metrics have no {key!r}: {at} has {have}")
        node = node[part]
    return node


def trial_config(base: FinetuneConfig, params: dict, sweep: str, init: str, runs_uri: str) -> FinetuneConfig:
    """The fine-tuning job of one trial: the base job (of its own task) on its subset, in its mode, with its seed,
    in the sweep's wandb group."""
    d = base.model_dump(mode="json")
    d["data"] |= {"uri": params["data_uri"], "subset_events": None, "subset_fraction": None}
    mode = params["mode"]
    d["model"] |= {"mode": mode, "init": None if mode == "scratch" else init}
    if mode in ("lin", "dec"):
        d["model"]["head"] = mode
    if "seed" in params:
        d["train"]["seed"] = params["seed"]
    d["run"] |= {"name": f"{sweep}-{params['name']}", "storage": runs_uri, "wandb_group": sweep}
    return type(base).model_validate(d)


def finetune_trial(
    config: dict, base: dict, sweep: str, init: str, runs_uri: str, metric: str, columns: list[str]
) -> None:
    """Tune function trainable: one Ray Train fine-tuning run; its reports stream to Tune, then the final scores:
    the spec's metric and columns under `scores` (dotted keys), the semantic miou / accuracy / iou beside them."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from raysvc.train.driver import run_job

    params = config["trial"]
    base_cfg = get_task(base["task"]).config.model_validate(base)
    cfg = trial_config(base_cfg, params, sweep, init, runs_uri)
    summary = run_job(cfg, callbacks=[TuneReportCallback()])
    val = summary["val"] or {}
    scores = {}
    for key in dict.fromkeys([metric, *columns]):
        try:
            scores[key] = metric_value(val, key)
        except KeyError as e:
            raise ValueError(f"trial {params['name']}: {e.args[0]}") from None
    if scores[metric] is None:
        raise ValueError(f"trial {params['name']}: the validation metric {metric!r} has no value")
    semantic = val.get("semantic", val)  # a panoptic run's semantic metrics sit under `semantic`
    tune.report(
        {
            metric: scores[metric],
            "scores": scores,
            "miou": semantic["miou"],
            "accuracy": semantic["accuracy"],
            "iou": semantic["iou"],
            "steps": summary["steps"],
            "wall_s": summary["wall_s"],
            "run_uri": summary["uri"],
        }
    )


def finished_rows(spec: FinetuneSweep, trials: list[dict]) -> tuple[list[dict], list[dict]]:
    """(the rows of trials that ran to the end, the params of those stopped mid-run): a trial stopped by Ctrl-C
    leaves Tune only its Train run's progress reports (step, loss), not the final scores."""
    keep = (spec.metric, "scores", "miou", "accuracy", "iou", "steps", "wall_s", "run_uri")
    done = [
        {"trial": r["trial"], "metrics": {k: r["metrics"].get(k) for k in keep}}
        for r in trials
        if spec.metric in r["metrics"]
    ]
    return done, [r["trial"] for r in trials if spec.metric not in r["metrics"]]


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """(mean, sample standard deviation) of the finished seeds' values; the std is None below 2 values."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None, None
    mean = sum(vals) / len(vals)
    if len(vals) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))


def _score(row: dict, key: str):
    return (row["metrics"].get("scores") or {}).get(key, row["metrics"].get(key))


def matrix(spec: FinetuneSweep, rows: list[dict]) -> dict:
    """{"metric", "modes", "events", "cells": {mode: {label: mean | None}}, "std", "n"} of the spec's metric: the
    mean, sample standard deviation and count of a cell's finished trials (one per seed)."""
    vals = {m: {_label(n): [] for n in spec.events} for m in spec.modes}
    for r in rows:
        t = r["trial"]
        vals[t["mode"]][_label(t["events"])].append(_score(r, spec.metric))
    stats = {m: {e: mean_std(v) for e, v in row.items()} for m, row in vals.items()}
    return {
        "metric": spec.metric,
        "modes": list(spec.modes),
        "events": [_label(n) for n in spec.events],
        "cells": {m: {e: s[0] for e, s in row.items()} for m, row in stats.items()},
        "std": {m: {e: s[1] for e, s in row.items()} for m, row in stats.items()},
        "n": {m: {e: sum(x is not None for x in v) for e, v in row.items()} for m, row in vals.items()},
        "seeds": spec.seeds,
    }


def columns_table(spec: FinetuneSweep, rows: list[dict]) -> dict:
    """{"columns", "rows": [{"mode", "events", "n", "mean": {col: v}, "std": {col: v}}]}: one row per mode x labelled
    events, one column per metric of the spec's `columns`, over the cell's finished seeds."""
    out = []
    for mode in spec.modes:
        for n in spec.events:
            mine = [r for r in rows if r["trial"]["mode"] == mode and r["trial"]["events"] == n]
            stats = {c: mean_std([_score(r, c) for r in mine]) for c in spec.columns}
            out.append(
                {
                    "mode": mode,
                    "events": _label(n),
                    "n": len(mine),
                    "mean": {c: s[0] for c, s in stats.items()},
                    "std": {c: s[1] for c, s in stats.items()},
                }
            )
    return {"columns": list(spec.columns), "rows": out}


def _cell(mean, std) -> str:
    if mean is None:
        return "-"
    return f"{mean:.3f}" if std is None else f"{mean:.3f} ± {std:.3f}"


def table_md(table: dict, failed: list[dict], columns: dict | None = None) -> str:
    bad = {(f["trial"]["mode"], _label(f["trial"]["events"])) for f in failed}
    head = "| mode | " + " | ".join(f"{e} events" if e != "all" else "all events" for e in table["events"]) + " |"
    lines = [head, "|---" * (len(table["events"]) + 1) + "|"]
    std = table.get("std") or {}
    for m in table["modes"]:
        vals = []
        for e in table["events"]:
            v, s = table["cells"][m][e], (std.get(m) or {}).get(e)
            vals.append("failed" if v is None and (m, e) in bad else _cell(v, s))
        lines.append(f"| {m} | " + " | ".join(vals) + " |")
    if table.get("seeds"):
        lines.append(f"\n{table['metric']}: mean ± sample standard deviation over seeds {table['seeds']}.")
    if columns and columns["columns"]:
        cols = columns["columns"]
        lines += ["", "| mode | labelled events | seeds | " + " | ".join(cols) + " |", "|---" * (len(cols) + 3) + "|"]
        for r in columns["rows"]:
            cells = " | ".join(_cell(r["mean"][c], r["std"][c]) for c in cols)
            lines.append(f"| {r['mode']} | {r['events']} | {r['n']} | {cells} |")
    return "\n".join(lines) + "\n"


def efficiency_png(table: dict, total_events: int | None) -> bytes:
    import matplotlib.pyplot as plt

    from raysvc.train.plots import fig_png

    fig, ax = plt.subplots(figsize=(7, 4.6))
    std = table.get("std") or {}
    for m in table["modes"]:
        xs, ys, es = [], [], []
        for e in table["events"]:
            v = table["cells"][m][e]
            x = total_events if e == "all" else int(e)
            if v is not None and x:
                xs.append(x)
                ys.append(v)
                es.append((std.get(m) or {}).get(e) or 0.0)
        ax.errorbar(xs, ys, yerr=es if any(es) else None, fmt="o-", capsize=3, label=m)
    ax.set_xscale("log")
    ax.set_xlabel("labelled training events")
    ax.set_ylabel(f"validation {table['metric']}")
    ax.set_title("label efficiency: fine-tuning modes")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    return fig_png(fig)


def run_finetune_sweep(spec: FinetuneSweep, log=print) -> dict:
    from raysvc.hub import read

    t0 = time.time()
    base = load_job(spec.job, spec.set, "segmentation")
    base.data.uri, base.val_data.uri = absolute_uri(base.data.uri), absolute_uri(base.val_data.uri)
    check_datasets({f"{spec.job}: data.uri": base.data.uri, f"{spec.job}: val_data.uri": base.val_data.uri})
    init = absolute_uri(spec.init)
    if any(m != "scratch" for m in spec.modes):
        read(resolve(init))  # any format; fails here, naming the file, rather than in every trial
    exp = resolve(absolute_uri(spec.storage)).join(spec.name)
    uris = materialise_subsets(base, spec.events, spec.subset_seed, exp, base.scaling.workers, log)
    trials = grid_trials(spec, uris)
    total = next(t["labelled_events"] for t in trials if t["events"] is None) if None in spec.events else None
    counts = ", ".join(_label(n) for n in spec.events)
    seeds = "" if spec.seeds is None else f" x seeds {', '.join(map(str, spec.seeds))}"
    log(
        f"[raysvc] label-efficiency sweep {spec.name} ({base.task}): {len(trials)} trials ({', '.join(spec.modes)} "
        f"x {counts} events{seeds}), {spec.tune.max_concurrent_trials} at a time"
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
        columns=spec.columns,
    )
    rows, unfinished = finished_rows(spec, outcome.trials)
    if unfinished:
        names = ", ".join(t["name"] for t in unfinished)
        log(f"[raysvc] {len(unfinished)} trial(s) stopped before the end ({names}): re-run the spec to finish them")
    table = matrix(spec, rows)
    columns = columns_table(spec, rows)
    summary = {
        "sweep": spec.name,
        "uri": exp.uri,
        "table": table,
        "columns": columns,
        "trials": rows,
        "unfinished": unfinished,
        "failed": outcome.failed,
        "resumed": outcome.resumed,
        "train_events_total": total,
        "wall_s": time.time() - t0,
        "spec": spec.model_dump(mode="json"),
    }
    write_bytes_atomic(exp.join("summary.json"), json.dumps(summary, indent=2).encode())
    write_bytes_atomic(exp.join("table.json"), json.dumps(table | {"columns": columns}, indent=2).encode())
    write_bytes_atomic(exp.join("table.md"), table_md(table, outcome.failed, columns).encode())
    write_bytes_atomic(exp.join("label_efficiency.png"), efficiency_png(table, total))
    return summary
