"""`raysvc display`: an interactive HTML event display (plotly, self-contained) of a dataset's first events."""

from __future__ import annotations

import argparse


def cmd_display(a: argparse.Namespace) -> None:
    from raysvc.data.tools.display_html import build_display
    from raysvc.storage import resolve

    info = build_display(
        resolve(a.data),
        resolve(a.out),
        a.events,
        resolve(a.predictions) if a.predictions else None,
        a.max_points,
        a.seed,
    )
    capped = sum(e["drawn"] < e["points"] for e in info["events"])
    print(
        f"wrote {info['out']}: {len(info['events'])} events"
        + (f", {capped} of them subsampled to {a.max_points} points" if capped else "")
    )


def add_parser(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("display", help="interactive HTML event display (3D, by class / prediction / instance / energy)")
    d.add_argument("--data", required=True, help="dataset URI (file:// path or s3://)")
    d.add_argument("--out", required=True, help="the HTML file to write")
    d.add_argument("--events", type=int, default=5, help="the first N events of the dataset (default 5)")
    d.add_argument("--predictions", help="`raysvc predict` output over the same dataset: predicted classes too")
    d.add_argument("--max-points", type=int, default=20_000, help="points drawn per event at most (seeded subsample)")
    d.add_argument("--seed", type=int, default=0, help="seed of the subsample")
    d.set_defaults(fn=cmd_display)
