"""`raysvc results table`: a results/ experiment's README tables and plots, rebuilt from its runs (raysvc.reports)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def cmd_table(a: argparse.Namespace) -> None:
    from raysvc.reports import check, rebuild

    folder, runs = Path(a.dir), Path(a.runs)
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


def add_parser(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser("results", help="rebuild a results/ experiment's README tables and plots from its runs")
    rsub = r.add_subparsers(dest="results_command", required=True)
    t = rsub.add_parser(
        "table",
        help="rebuild DIR's tables (into DIR/README.md, between `<!-- table:NAME -->` markers) and plots",
    )
    t.add_argument("dir", help="the experiment's folder, e.g. results/cross-experiment (its name picks the builder)")
    t.add_argument("--runs", default="runs", help="where the experiment's run directories are")
    t.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 if the README's tables differ from the rebuilt ones, printing the first difference",
    )
    t.set_defaults(fn=cmd_table)
