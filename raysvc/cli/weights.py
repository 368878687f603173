"""`raysvc weights import | export`: bring a Sonata / Pointcept checkpoint or a pimm export in as a raysvc export,
and write a raysvc export in pimm's layout (docs/weights.md)."""

from __future__ import annotations

import argparse
import json

from raysvc.cli.common import log, resolved


def cmd_import(a: argparse.Namespace) -> None:
    from raysvc.config import parse_overrides
    from raysvc.hub import Answers
    from raysvc.hub.convert import import_model
    from raysvc.hub.pimm import read_json

    config = None
    if a.config:
        config = read_json(resolved(a.config))
        if not isinstance(config, dict):
            raise ValueError(f"{a.config}: expected a JSON object (the model's keyword arguments)")
    answers = Answers(
        source=a.source,
        config=config,
        prefix=a.prefix,
        detector=a.detector,
        grid_voxels=a.grid_voxels,
        center_events=a.center_events,
        licence=a.licence,
        class_names=a.class_names.split(",") if a.class_names else None,
        preprocess=parse_overrides(a.preprocess),
        head=a.head,
        allow_missing=a.allow_missing or [],
    )
    got = import_model(resolved(a.src), resolved(a.out), answers)
    rec = got.record
    log(f"[raysvc] licence of these weights: {rec.licence}")
    if got.skipped:
        log(f"[raysvc] not imported (outside --prefix {a.prefix}): {len(got.skipped)} keys, {got.skipped[:8]}")
    print(
        json.dumps(
            {
                "out": a.out,
                "from": got.format,
                "kind": rec.kind,
                "detector": rec.detector,
                "licence": rec.licence,
                "parameters": sum(v.numel() for v in got.state.values()),
                "skipped": len(got.skipped),
            },
            indent=2,
        )
    )


def cmd_export(a: argparse.Namespace) -> None:
    from raysvc.hub.convert import export_pimm

    record = export_pimm(resolved(a.src), resolved(a.out), a.encoder_only)
    if record.licence:
        log(f"[raysvc] licence of these weights: {record.licence}")
    print(json.dumps({"out": a.out, "format": a.format, "kind": record.kind, "licence": record.licence}, indent=2))


def add_parser(sub: argparse._SubParsersAction) -> None:
    w = sub.add_parser("weights", help="import Sonata / Pointcept / pimm checkpoints; export pimm's layout")
    wsub = w.add_subparsers(dest="weights_command", required=True)
    im = wsub.add_parser(
        "import",
        help="write a raysvc export from a Sonata / Pointcept checkpoint file or a pimm export directory; what the "
        "source does not state (detector, grid, centring, licence) must be given",
    )
    im.add_argument("src", help="checkpoint file (.pth) or export directory; local or s3://")
    im.add_argument("--out", required=True, help="the new export directory (must not exist)")
    im.add_argument("--from", dest="source", default="auto", choices=["auto", "raysvc", "sonata", "pimm"])
    im.add_argument("--config", help="JSON file with the model config, for a checkpoint that carries none")
    im.add_argument("--prefix", help="read only the keys under this prefix, e.g. student.backbone. (others listed)")
    im.add_argument("--detector", help="the detector whose events the model reads (raysvc data list detectors)")
    im.add_argument("--grid-voxels", type=float, help="grid sampling cell side in voxels the model was trained on")
    im.add_argument(
        "--center-events",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="whether each event was shifted to its mean (Panda's views are)",
    )
    im.add_argument("--licence", help="the weights' licence, where the source does not state it (e.g. MIT)")
    im.add_argument("--class-names", help="a segmenter's classes in output order, comma-separated (pimm states none)")
    im.add_argument(
        "--preprocess", action="append", metavar="KEY=VALUE", help="a preprocessing field unlike the detector's"
    )
    im.add_argument("--head", choices=["lin", "dec"], help="write a segmenter with this head (needs --allow-missing)")
    im.add_argument(
        "--allow-missing",
        action="append",
        choices=["heads"],
        help="heads: the head and decoder, which an encoder-only source lacks, start from a seeded initialisation",
    )
    im.set_defaults(fn=cmd_import)
    ex = wsub.add_parser("export", help="write a raysvc export in another library's layout (pimm)")
    ex.add_argument("src", help="raysvc export directory (or any format `weights import` reads)")
    ex.add_argument("--format", required=True, choices=["pimm"])
    ex.add_argument("--out", required=True, help="the new directory (must not exist)")
    ex.add_argument("--encoder-only", action="store_true", help="a segmenter's encoder alone, as a backbone")
    ex.set_defaults(fn=cmd_export)
