"""`raysvc finetune | pretrain | sweep`: Ray Train jobs from job YAMLs, Ray Tune sweeps from tune/*.yaml."""

from __future__ import annotations

import argparse
import json
import sys

from raysvc.cli.common import release_s3


def _run_job(a: argparse.Namespace, default_task: str) -> None:
    """Load the job YAML (its `task:` key names the task; `default_task` otherwise), run it, print the outcome."""
    from raysvc.train.driver import load_job, run_job

    summary = run_job(load_job(a.config, a.set, default_task))
    out = {"run": summary["uri"], "steps": summary["steps"]}
    if "val" in summary:
        val = summary["val"] or {}
        sem = val.get("semantic", val)  # a panoptic run nests its semantic metrics
        out |= {"val_miou": sem.get("miou"), "val_iou": sem.get("iou")}
        for task in ("particle", "interaction"):  # a panoptic run's instance tasks
            if task in val:
                out |= {f"val_{task}_pq": val[task]["pq"], f"val_{task}_ari": val[task]["ari"]}
    probe = summary.get("probe") or {}
    if "token_mean_f1" in probe:  # PoLAr-MAE's token probe
        out |= {
            "probe_token_mean_f1": probe["token_mean_f1"],
            "probe_random_token_mean_f1": probe.get("random_token_mean_f1"),
            "probe_token_f1": probe.get("token_f1"),
            "tokens": summary.get("tokens"),
        }
    elif "exports" in summary:  # cross-experiment pretraining: one backbone and probe per detector
        out |= {"exports": summary["exports"], "batching": summary.get("batching")}
        for name, p in probe.items():
            if p:
                out |= {
                    f"probe_{name}_pretrained_miou": p["pretrained_miou"],
                    f"probe_{name}_random_miou": p["random_miou"],
                }
    elif "probe" in summary:
        out |= {
            "probe_pretrained_miou": probe.get("pretrained_miou"),
            "probe_random_miou": probe.get("random_miou"),
            "monitor": summary.get("last_monitor"),
        }
    print(json.dumps(out, indent=2))


def cmd_finetune(a: argparse.Namespace) -> None:
    _run_job(a, "segmentation")


def cmd_pretrain(a: argparse.Namespace) -> None:
    _run_job(a, "panda")


def cmd_sweep(a: argparse.Namespace) -> None:
    from raysvc.sweep import run_sweep
    from raysvc.sweep.spec import load_spec

    summary = run_sweep(load_spec(a.spec, a.set))
    print(summary["table_md"], end="")
    rep = summary.get("representation") or {"trials": [], "failed": []}  # the C-NMS sweep's token-probe runs
    trials, failed = [*summary["trials"], *rep["trials"]], [*summary["failed"], *rep["failed"]]
    print(
        json.dumps(
            {
                "sweep": summary["uri"],
                "trials": len(trials),
                "failed": [{"trial": f["trial"]["name"], "error": f["error"]} for f in failed],
                "wall_s": round(summary["wall_s"], 1),
            },
            indent=2,
        )
    )
    if failed:
        print(
            f"raysvc: {len(failed)} of {len(failed) + len(trials)} trials failed "
            f"(errors in {summary['uri']}/summary.json)",
            file=sys.stderr,
        )
        release_s3()
        sys.exit(1)


def add_parser(sub: argparse._SubParsersAction) -> None:
    ft = sub.add_parser("finetune", help="train a segmentation model with Ray Train (locally or under ray job submit)")
    ft.add_argument("config", help="job YAML, e.g. jobs/semseg-tiny.yaml")
    ft.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a field, e.g. train.steps=100")
    ft.set_defaults(fn=cmd_finetune)

    pt = sub.add_parser(
        "pretrain", help="Panda self-supervised pretraining with Ray Train (locally or under ray job submit)"
    )
    pt.add_argument("config", help="job YAML, e.g. jobs/pretrain-panda-tiny.yaml")
    pt.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a field, e.g. train.steps=100")
    pt.set_defaults(fn=cmd_pretrain)

    sw = sub.add_parser(
        "sweep",
        help="a Ray Tune sweep from tune/*.yaml (C-NMS coverage, label efficiency); re-run the same spec to resume it",
    )
    sw.add_argument("spec", help="sweep YAML, e.g. tune/cnms.yaml")
    sw.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a field, e.g. events=20")
    sw.set_defaults(fn=cmd_sweep)
