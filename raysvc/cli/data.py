"""`raysvc data ...`: generate, convert, inspect, show, verify and subset event datasets."""

from __future__ import annotations

import argparse
import os
import sys

from raysvc.cli.common import print_json
from raysvc.config import load_config


class _GeneratingDetectors:
    """`data generate --detector` choices: the registered detectors that have a generator, looked up only when the
    option is parsed or its help printed, so that building the parser of every other command skips the registry
    (numpy and the entry-point scan: ~0.3 s of `raysvc --help`)."""

    def _names(self) -> list[str]:
        from raysvc.data.sources.synthetic import generating_detectors

        return generating_detectors()

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __iter__(self):
        return iter(self._names())


def cmd_generate(a: argparse.Namespace) -> None:
    from raysvc.data.contract.detectors import DEFAULT_DETECTOR
    from raysvc.data.sources.synthetic import generate_dataset, generator_for
    from raysvc.storage import resolve

    detector = a.detector or DEFAULT_DETECTOR
    cfg = load_config(generator_for(detector)[0], a.config, a.set)
    m = generate_dataset(resolve(a.out), a.events, a.seed, a.shard_events, cfg, workers=a.workers, detector=detector)
    print(f"wrote {m.events} events ({m.points} points) in {len(m.shards)} shards to {a.out}")


def cmd_convert(a: argparse.Namespace) -> None:
    from raysvc.data.sources.pilarnet import convert
    from raysvc.storage import resolve

    m = convert(a.pattern, resolve(a.out), a.shard_events, a.revision)
    print(f"converted {m.events} events ({m.points} points) into {len(m.shards)} shards at {a.out}")


def cmd_convert_wand(a: argparse.Namespace) -> None:
    from raysvc.data.sources.wand import convert
    from raysvc.storage import resolve

    m = convert(a.pattern, resolve(a.out), a.shard_events)
    skipped = {k: v for k, v in m.created_by.get("skipped", {}).items() if v}
    print(f"converted {m.events} events ({m.points} hit PMTs) into {len(m.shards)} shards at {a.out}")
    if skipped:
        print("skipped / relabelled: " + ", ".join(f"{k} {v}" for k, v in skipped.items()))


def cmd_inspect(a: argparse.Namespace) -> None:
    from raysvc.data.tools.stats import inspect_dataset
    from raysvc.storage import resolve

    stats = inspect_dataset(resolve(a.uri), verify=not a.no_verify)
    if a.json:
        print_json(stats)
        return
    print(f"{stats['uri']}: {stats['events']} events, {stats['points']} points, {stats['shards']} shards")
    ppe = stats["points_per_event"]
    print(f"points/event: median {ppe['median']:.0f}, mean {ppe['mean']:.0f}, p5 {ppe['p5']:.0f}, p95 {ppe['p95']:.0f}")
    ref, ref_name = stats["reference"].get("class_fractions", {}), stats["reference"].get("name", "")
    for name, frac in stats["class_fractions"].items():
        published = f"   ({ref_name} {100 * ref[name]:.2f} %)" if name in ref else ""
        print(f"  {name:8s} {100 * frac:6.2f} %{published}")
    for k in ("interactions_per_event", "particles_per_event"):
        print(f"{k}: {stats[k].get('mean', 0):.2f} +- {stats[k].get('std', 0):.2f}")
    if stats.get("rings_per_event"):
        print("rings/event: " + ", ".join(f"{k}: {v}" for k, v in stats["rings_per_event"].items()))


def cmd_show(a: argparse.Namespace) -> None:
    from raysvc.data.tools.display import show_event, show_instances
    from raysvc.storage import resolve

    if a.predictions:
        print(show_instances(resolve(a.uri), resolve(a.predictions), a.event, a.out))
    else:
        print(show_event(resolve(a.uri), a.event, a.out))


def cmd_verify(a: argparse.Namespace) -> None:
    from raysvc.data.tools.verify import verify_dataset
    from raysvc.storage import resolve

    result = verify_dataset(resolve(a.uri))
    print_json(result)
    if result["bad_events"]:
        sys.exit(1)


def cmd_subset(a: argparse.Namespace) -> None:
    from raysvc.data.streaming.subset import write_subsets
    from raysvc.storage import absolute_uri, resolve

    src, dst = resolve(absolute_uri(a.uri)), resolve(absolute_uri(a.out))
    m = write_subsets(src, {a.events: dst}, a.seed, a.shards)[a.events]
    print(f"{a.out}: {m.events} events of {a.uri} (subset seed {a.seed}) in {len(m.shards)} shards")


def add_parser(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="generate, convert, inspect, show and verify event datasets")
    dsub = data.add_subparsers(dest="data_command", required=True)
    g = dsub.add_parser("generate", help="synthetic events of a detector (LArTPC, water Cherenkov, ...) -> shards")
    g.add_argument(
        "--detector",
        choices=_GeneratingDetectors(),
        metavar="DETECTOR",  # else argparse lists the choices, loading the registry, as it builds every command
        help="which detector's events: %(choices)s (default lartpc)",
    )
    g.add_argument("--events", type=int, required=True)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--out", required=True, help="file:///path, a path, or s3://bucket/prefix")
    g.add_argument("--shard-events", type=int, default=500)
    g.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="generator processes")
    g.add_argument("--config", help="YAML with the detector's generator settings (lartpc: GeneratorConfig)")
    g.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a generator setting")
    g.set_defaults(fn=cmd_generate)
    c = dsub.add_parser("convert", help="PILArNet-M HDF5 files -> shards")
    c.add_argument("pattern", help="glob of .h5 files, e.g. 'ROOT/train/*.h5' (quote it)")
    c.add_argument("--out", required=True)
    c.add_argument("--shard-events", type=int, default=500)
    c.add_argument("--revision", default="auto", choices=["auto", "v1", "v2", "v3"])
    c.set_defaults(fn=cmd_convert)
    cw = dsub.add_parser(
        "convert-wand",
        help="a WAND / LUCiD water Cherenkov tree (sensor, hits, labl, edep per configuration) -> shards",
    )
    cw.add_argument("pattern", metavar="ROOT", help="the tree's folder, or a glob of its files, e.g. 'ROOT/**/*.h5'")
    cw.add_argument("--out", required=True)
    cw.add_argument("--shard-events", type=int, default=500)
    cw.set_defaults(fn=cmd_convert_wand)
    i = dsub.add_parser("inspect", help="statistics of a dataset vs PILArNet-M")
    i.add_argument("uri")
    i.add_argument("--json", action="store_true")
    i.add_argument("--no-verify", action="store_true", help="skip sha256 checks of shards")
    i.set_defaults(fn=cmd_inspect)
    s = dsub.add_parser("show", help="event display PNG")
    s.add_argument("uri")
    s.add_argument("--event", type=int, required=True, help="event id")
    s.add_argument("--out", required=True)
    s.add_argument("--predictions", help="a panoptic model's `raysvc predict` output: true vs predicted instances")
    s.set_defaults(fn=cmd_show)
    v = dsub.add_parser("verify", help="check every shard (checksum, schema, values); exit 1 if any event is bad")
    v.add_argument("uri")
    v.set_defaults(fn=cmd_verify)
    su = dsub.add_parser(
        "subset",
        help="write the seeded n-event label subset (data.subset_events=n) as its own "
        "dataset, so a few-label run reads n events, not the whole set",
    )
    su.add_argument("uri")
    su.add_argument("--events", type=int, required=True)
    su.add_argument("--seed", type=int, default=0, help="the subset seed (data.subset_seed)")
    su.add_argument("--out", required=True)
    su.add_argument("--shards", type=int, default=2, help="at least this many shards (one per Train worker)")
    su.set_defaults(fn=cmd_subset)
