"""Helpers the command groups share: JSON output, Ray for batch inference, the S3 shutdown before exit."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from raysvc.storage import Location


def print_json(obj: dict, path: str | None = None) -> None:
    text = json.dumps(obj, indent=2)
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            f.write(text + "\n")
    print(text)


def log(message: str) -> None:
    """Progress lines go to stderr, so that stdout holds only the result (--json output stays parseable)."""
    print(message, file=sys.stderr, flush=True)


def keywords(a: argparse.Namespace, names: Iterable[str]) -> dict:
    """A function's keyword arguments from parsed options: each name is an option's dest, passed under that name, or
    "keyword=dest" where the function calls it otherwise."""
    out = {}
    for name in names:
        key, _, dest = name.partition("=")
        out[key] = getattr(a, dest or key)
    return out


def resolved(uri: str) -> Location:
    """A command-line URI or path, made absolute, as a Location (filesystem and path)."""
    from raysvc.storage import absolute_uri, resolve

    return resolve(absolute_uri(uri))


def batch_ray(actors: int) -> None:
    """Start (or join) Ray for a batch-inference command that runs an actor pool; its chatter goes to the log."""
    if actors > 0:
        import ray

        from raysvc.ray_init import init_ray

        if not ray.is_initialized():
            init_ray(logging_level="WARNING", include_dashboard=False)


def add_batch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--actors",
        type=int,
        default=1,
        help="model replicas of the Ray Data job (one GPU each with --device cuda); 0: in this process, no Ray",
    )
    p.add_argument("--max-points", type=int, default=400_000, help="at most this many points per model call")
    add_cpus_per_actor(p)


def batch_kwargs(a: argparse.Namespace) -> dict:
    """The batch-inference keywords of the options add_batch_args adds, with progress lines to the log."""
    return {**keywords(a, ("actors", "max_points", "cpus_per_actor")), "log": log}


# Whether this process ends with its command: true for the `raysvc` script and `python -m raysvc.cli` (main() with no
# argv), false for a command run in process (`main([...])` from a test or a notebook), which must keep S3 usable.
_process_ends_with_command = False


def ends_with_command(on: bool) -> None:
    global _process_ends_with_command
    _process_ends_with_command = on


def release_s3() -> None:
    """Shut the AWS SDK down before interpreter exit. Left to static destructors, it aborted a `data inspect` of an
    s3:// dataset once ("terminate called without an active exception", exit -6) after printing its result
    (apache/arrow#41087, #36346: S3 must be finalised after the last S3FileSystem is gone). Only where the process
    ends with the command: once finalised, S3 cannot be started again in that process."""
    if "pyarrow.fs" not in sys.modules or not _process_ends_with_command:
        return
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        return  # Ray's driver may still hold filesystems (run storage); it shuts down at exit itself
    import gc

    import pyarrow.fs

    gc.collect()  # the filesystems of finished commands
    pyarrow.fs.finalize_s3()


def add_cpus_per_actor(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cpus-per-actor",
        type=float,
        default=None,
        help="Ray CPUs (and torch threads) of each actor; default: an equal share of what the cluster leaves after "
        "the read tasks",
    )


def add_run_record(p: argparse.ArgumentParser, what: str) -> None:
    """`--run-record PATH`: the run record of docs/results.md; `what` says which sets it records and refuses."""
    p.add_argument("--run-record", metavar="PATH", help=f"write the run record here (docs/results.md): {what}")
