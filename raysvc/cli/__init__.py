"""`raysvc` command line: data | display | bench | pretrain | finetune | sweep | evaluate | compare | predict | serve |
weights | demo | results."""

# The docstring above is `raysvc --help`'s description. One module per command group, each with its cmd_* functions
# and an add_parser(sub) that registers them; this module routes the console, runs the command and maps failures to
# exit codes (2: bad input, 1: a failed training run).

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

from raysvc.cli import bench, data, demo, display, evaluate, inference, results, train, weights
from raysvc.cli.common import ends_with_command, release_s3
from raysvc.config import ConfigError

# In `raysvc --help` order.
GROUPS = (data, display, bench, train, evaluate, inference, weights, demo, results)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raysvc", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.add_parser(sub)
    for leaf in _leaves(p):
        leaf.add_argument(
            "--verbose",
            action="store_true",
            help="show Ray's own output (start-up notes, its "
            "workers' logs, warnings) on the console too; it always goes to the log file",
        )
    return p


def _leaves(parser: argparse.ArgumentParser):
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield parser
    for action in subs:
        for child in action.choices.values():
            yield from _leaves(child)


# Commands that start or join Ray: their console shows raysvc's own lines, Ray's go to a log file (raysvc.console).
ROUTED = {
    ("finetune",),
    ("pretrain",),
    ("sweep",),
    ("demo",),
    ("serve",),
    ("predict",),
    ("evaluate",),
    ("probe",),
    ("bench", "ingest"),
    ("bench", "train"),
    ("results", "run"),
}


# What re-running an interrupted command does, said when Ctrl-C stops it.
RESUMES = {
    ("results", "run"): "finished runs are skipped and an interrupted run restarts from its last checkpoint",
    ("pretrain",): "it restarts from its last checkpoint (same run.name)",
    ("finetune",): "it restarts from its last checkpoint (same run.name)",
    ("sweep",): "finished trials are kept and the sweep goes on",
}


def _command(args: argparse.Namespace) -> tuple[str, ...]:
    sub = getattr(args, "bench_command", None) or getattr(args, "results_command", None)
    return tuple(x for x in (args.command, sub) if x)


def _console_log(args: argparse.Namespace) -> Path:
    """Where a routed command's full output goes: under the run directory of a training job with local storage,
    under the demo's workdir, else under runs/logs/."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if args.command in ("finetune", "pretrain"):
        from raysvc.storage import resolve

        try:
            from raysvc.train.driver import load_job

            cfg = load_job(args.config, args.set, "segmentation" if args.command == "finetune" else "panda")
            run = resolve(cfg.run.storage).join(cfg.run.name)
            if not run.is_s3:
                return Path(run.path) / "logs" / f"console-{stamp}.log"
            return Path("runs") / "logs" / f"{cfg.run.name}-{stamp}.log"
        except Exception:  # a bad config is reported by the command itself
            pass
    if args.command == "demo":
        return Path(args.workdir) / "logs" / f"console-{stamp}.log"
    return Path("runs") / "logs" / f"{'-'.join(_command(args))}-{stamp}.log"


def main(argv: list[str] | None = None) -> None:
    """The `raysvc` command line; with `argv`, one command run in this process (which then goes on)."""
    ends_with_command(argv is None)
    args = build_parser().parse_args(argv)
    from raysvc.data.contract.schema import EventDataError
    from raysvc.ray_init import RayStartError
    from raysvc.storage import StorageError

    interrupted = False
    try:
        with contextlib.ExitStack() as stack:
            if _command(args) in ROUTED and not getattr(args, "dry_run", False):  # a dry run starts nothing
                from raysvc.console import routed

                log = stack.enter_context(routed(_console_log(args), args.verbose))
                print(
                    f"[raysvc] Ray's own output: {log}" + ("" if args.verbose else " (--verbose shows it here)"),
                    file=sys.stderr,
                )
            try:
                args.fn(args)
            except KeyboardInterrupt:  # said inside the routed block, so that the run's log file says it too
                how = RESUMES.get(_command(args))
                print(
                    f"\nraysvc: {' '.join(_command(args))} interrupted"
                    + (f"; run the same command again to resume: {how}" if how else ""),
                    file=sys.stderr,
                )
                interrupted = True
                ray = sys.modules.get("ray")
                if ray is not None and ray.is_initialized():  # now, so that Ray's last lines go to the log file
                    ray.shutdown()
    except (ConfigError, EventDataError, StorageError, FileNotFoundError, ValueError, RayStartError) as e:
        print(f"raysvc: error: {e}", file=sys.stderr)
        release_s3()
        sys.exit(2)
    except Exception as e:
        verdict = _training_failure(e)
        if verdict is None:
            raise
        print(f"raysvc: error: {verdict}", file=sys.stderr)
        release_s3()
        sys.exit(1)
    release_s3()
    if interrupted:
        sys.exit(130)  # the shell's code for a command stopped by SIGINT


def _training_failure(e: BaseException) -> str | None:
    """One line for a failed Ray Train run (the worker's own error, unwrapped from Ray's task errors, with its rank),
    or None if `e` is something else. Ray has printed the traceback by then; this is the verdict under it."""
    failures = getattr(e, "worker_failures", None)
    if failures is None or not type(e).__module__.startswith("ray."):
        return None
    if not failures:
        return f"training failed: {str(e).splitlines()[0]}"
    rank, err = min(failures.items())
    while getattr(err, "cause", None) is not None and err.cause is not err:  # RayTaskError -> the task's exception
        err = err.cause
    message = " ".join(str(err).split())[:1000]
    return f"training failed on rank {rank} ({len(failures)} worker(s) failed): {type(err).__name__}: {message}"
