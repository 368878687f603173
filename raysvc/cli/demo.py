"""`raysvc demo`: the main job end to end (raysvc.demo)."""

from __future__ import annotations

import argparse

from raysvc.cli.common import keywords


def cmd_demo(a: argparse.Namespace) -> None:
    from raysvc.demo import run_demo

    run_demo(
        **keywords(a, ("workdir", "events", "storage", "workers", "pretrain_steps", "finetune_steps", "probe_events"))
    )


def add_parser(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("demo", help="the main job end to end on embedded defaults")
    d.add_argument("--workdir", default="runs/demo")
    d.add_argument("--events", type=int, default=2000)
    d.add_argument("--storage", choices=["seaweedfs", "file"], default="seaweedfs")
    d.add_argument("--workers", type=int, default=2, help="Ray Train workers of the ingest check")
    d.add_argument("--pretrain-steps", type=int, default=100, help="tiny Panda pretraining steps (0: skip)")
    d.add_argument(
        "--finetune-steps",
        type=int,
        default=100,
        help="fine-tuning steps of the pretrained backbone on 100 labelled events, then serving it (0: skip both)",
    )
    d.add_argument(
        "--probe-events",
        type=int,
        default=60,
        help="held-out events the pretraining's linear probe fits on, and as many again that it scores (of the 160"
        " generated, about 130 pass the cuts)",
    )
    d.set_defaults(fn=cmd_demo)
