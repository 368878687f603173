"""`raysvc evaluate | probe | compare`: an exported model's metrics, a backbone's probes, training arms compared."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from raysvc.cli.common import (
    add_batch_args,
    add_cpus_per_actor,
    add_run_record,
    batch_kwargs,
    batch_ray,
    keywords,
    log,
    print_json,
    resolved,
)


def cmd_evaluate(a: argparse.Namespace) -> None:
    from raysvc.inference.batch import evaluate_dataset

    batch_ray(a.actors)

    def evaluate():
        return evaluate_dataset(
            resolved(a.model), resolved(a.data), a.batch_events, a.device, max_events=a.max_events, **batch_kwargs(a)
        )

    if a.run_record:
        from raysvc.data.streaming.config import DataConfig
        from raysvc.train.experiment import evaluate_with_record

        result = evaluate_with_record(a.model, DataConfig(uri=a.data), a.run_record, evaluate)
    else:
        result = evaluate()
    print_json(result, a.out)


def cmd_probe(a: argparse.Namespace) -> None:
    from raysvc.data.streaming.config import DataConfig
    from raysvc.storage import absolute_uri
    from raysvc.train.backbone_probe import probe_backbone
    from raysvc.train.probe import ProbeConfig
    from raysvc.train.run_record import load_avg
    from raysvc.train.token_probe import TokenProbeConfig

    if (a.init is None) == (a.random is None):
        sys.exit("raysvc probe: give an export directory or --random ARCH (the baseline), not both or neither")
    batch_ray(1)  # the probe's events are read by Ray tasks or Ray Data either way
    events = {"train_events": a.train_events, "val_events": a.val_events}
    t0, split_ids, load = time.time(), {}, load_avg()
    result = probe_backbone(
        absolute_uri(a.init) if a.init else None,
        DataConfig(uri=absolute_uri(a.data)),
        arch=a.random or "ptv3",
        size=a.size,
        point=ProbeConfig(**events),
        token=TokenProbeConfig(**events),
        **keywords(a, ("radius_voxels", "seed", "center_events", "actors", "cpus_per_actor")),
        log=log,
        split_ids=split_ids,
        fit_data=DataConfig(uri=absolute_uri(a.fit_data)) if a.fit_data else None,
    )
    if a.run_record:
        from raysvc.train.experiment import probe_record

        probe_record(vars(a), result, split_ids, a.run_record, time.time() - t0, load)
    print_json(result, a.out)


def cmd_compare(a: argparse.Namespace) -> None:
    from raysvc.compare import compare, format_table, load_arms, plot

    arms: dict[str, list[str]] = {}
    for spec in a.arm:
        name, sep, paths = spec.partition("=")
        if not sep or not name or name in arms:
            raise ValueError(f"--arm {spec!r}: expected a new NAME=EVAL.json[,EVAL.json ...]")
        arms[name] = [q for q in paths.split(",") if q]
    result = compare(load_arms(arms))
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "compare.json"), "w") as f:
        json.dump(result, f, indent=2)
    plot(result, os.path.join(a.out, "compare.png"))
    print(format_table(result))
    print(f"wrote {a.out}/compare.json and compare.png")


def add_parser(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser("evaluate", help="metrics of an exported model on a labelled dataset (its training cuts)")
    ev.add_argument("--model", required=True, help="exported model directory (raysvc finetune's run)")
    ev.add_argument("--data", required=True, help="labelled dataset URI")
    ev.add_argument("--batch-events", type=int, default=4)
    ev.add_argument("--max-events", type=int, help="score only the first N events (in shard order)")
    ev.add_argument("--out", help="also write the JSON here")
    ev.add_argument("--device", default="cpu", help="torch device, e.g. cuda or cuda:1")
    add_run_record(
        ev,
        "--data scored as the test set; refuses a test set that shares events with the model's training or "
        "validation set (from its run's summary.json)",
    )
    add_batch_args(ev)
    ev.set_defaults(fn=cmd_evaluate)
    pb = sub.add_parser(
        "probe",
        help="a backbone's per-point linear probe and token probe on held-out labelled events (any method)",
    )
    pb.add_argument("init", nargs="?", help="exported backbone or segmenter directory (raysvc pretrain's run)")
    pb.add_argument("--random", metavar="ARCH", help="probe a random initialisation of ARCH instead (ptv3, polarmae)")
    pb.add_argument("--size", default="tiny", help="preset of --random")
    pb.add_argument("--center-events", action="store_true", help="--random: centre each event (as Panda's views)")
    pb.add_argument("--data", required=True, help="labelled dataset URI (the first train + val events are used)")
    pb.add_argument(
        "--fit-data",
        help="fit the probes on the first --train-events events of this labelled dataset (a validation split) and "
        "score them on the first --val-events of --data (the test split)",
    )
    pb.add_argument("--train-events", type=int, default=100)
    pb.add_argument("--val-events", type=int, default=100)
    pb.add_argument("--radius-voxels", type=float, default=5.0, help="C-NMS radius of a PTv3 backbone's tokens")
    pb.add_argument("--seed", type=int, default=0)
    pb.add_argument("--actors", type=int, default=1, help="backbone replicas in a Ray Data actor pool (0: in process)")
    add_cpus_per_actor(pb)
    pb.add_argument("--out", help="also write the JSON here")
    add_run_record(pb, "the fitting events as train, the scored ones as test")
    pb.set_defaults(fn=cmd_probe)
    cp = sub.add_parser(
        "compare",
        help="training arms across seeds from `raysvc evaluate` JSONs: mean / sd, each arm "
        "vs the first (Welch t-test, 95 %% interval), a PNG",
    )
    cp.add_argument(
        "--arm",
        action="append",
        required=True,
        metavar="NAME=EVAL.json[,EVAL.json ...]",
        help="one arm, one evaluate JSON per training seed; the first --arm is the baseline",
    )
    cp.add_argument("--out", required=True, help="directory for compare.json and compare.png")
    cp.set_defaults(fn=cmd_compare)
