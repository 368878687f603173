"""`raysvc finetune | pretrain | sweep`: Ray Train jobs from job YAMLs, Ray Tune sweeps from tune/*.yaml."""

from __future__ import annotations

import argparse
import json
import sys

from raysvc.cli.common import add_run_record, release_s3


def _run_job(a: argparse.Namespace, default_task: str) -> None:
    """Load the job YAML (its `task:` key names the task; `default_task` otherwise), run it, print what its task says
    of the outcome."""
    from raysvc.train.driver import load_job, run_job
    from raysvc.train.tasks import get_task

    job = load_job(a.config, a.set, default_task)
    if getattr(a, "run_record", None):
        from raysvc.train.experiment import finetune_with_record

        summary = finetune_with_record(job, a.run_record)
    else:
        summary = run_job(job)
    print(json.dumps(get_task(job.task).outcome(summary), indent=2))


def cmd_finetune(a: argparse.Namespace) -> None:
    if a.init:  # the same as --set model.init=PATH, made absolute: Ray's workers run elsewhere
        from raysvc.storage import absolute_uri

        a.set = [*(a.set or []), f"model.init={absolute_uri(a.init)}"]
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
    add_run_record(
        ft,
        "config, seeds, split, validation metrics, commit, wall time; refuses a validation set that shares "
        "events with the training set",
    )
    ft.add_argument(
        "--init",
        metavar="PATH",
        help="model.init: a raysvc export, a Sonata / Pointcept checkpoint file or a pimm export directory",
    )
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
