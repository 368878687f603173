"""`raysvc results table | run`: a results/ experiment's README tables and plots, rebuilt from its runs
(raysvc.reports), and the one command that runs a whole experiment from its experiment.yaml
(raysvc.train.experiment)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def cmd_table(a: argparse.Namespace) -> None:
    from raysvc.reports import check, default_runs, rebuild

    folder = Path(a.dir)
    runs = Path(a.runs) if a.runs else default_runs(folder)
    readme = folder / "README.md"
    if not a.check:
        changed = rebuild(folder, runs)
        print(f"{readme}: {'tables rebuilt' if changed else 'tables already up to date'}")
        return
    diff = check(folder, runs)
    if diff is not None:
        print(f"{readme}: the committed tables differ from those rebuilt from {runs}/; first difference, {diff}")
        sys.exit(1)
    print(f"{readme}: tables up to date")


def cmd_run(a: argparse.Namespace) -> None:
    from raysvc.train.experiment import describe_plan, run_experiment

    runs = run_experiment(a.dir, dry_run=a.dry_run)
    if a.dry_run:
        print(describe_plan(runs))
        return
    print(f"{a.dir}: {len(runs)} runs done; rebuilding its tables")
    a.runs, a.check = None, False
    cmd_table(a)


def add_parser(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser("results", help="rebuild a results/ experiment's README tables and plots from its runs")
    rsub = r.add_subparsers(dest="results_command", required=True)
    t = rsub.add_parser(
        "table",
        help="rebuild DIR's tables (into DIR/README.md, between `<!-- table:NAME -->` markers) and plots",
    )
    t.add_argument(
        "dir",
        help="the experiment's folder, e.g. results/label-efficiency (its experiment.yaml declares the tables; "
        "without one, its name picks a builder: results/cross-experiment)",
    )
    t.add_argument(
        "--runs",
        help="where the experiment's runs are (default: DIR/runs/ for an experiment with an experiment.yaml, else "
        "./runs, the run directories its README's commands make)",
    )
    t.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 if the README's tables differ from the rebuilt ones, printing the first difference",
    )
    t.set_defaults(fn=cmd_table)
    r_run = rsub.add_parser(
        "run",
        help="run every run of DIR/experiment.yaml (pretraining, fine-tunes, test scoring; resumes), write their "
        "records to DIR/runs/ and rebuild DIR's tables",
    )
    r_run.add_argument("dir", help="the experiment's folder, e.g. results/label-efficiency")
    r_run.add_argument("--dry-run", action="store_true", help="list the runs (done / to do) and their commands only")
    r_run.set_defaults(fn=cmd_run)
