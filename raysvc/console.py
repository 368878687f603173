"""What a raysvc command prints: its own progress and result on the console, Ray's chatter in a log file.

Ray forwards every line its workers, actors and controllers print to the driver's stdout / stderr, prefixed with
`(Name pid=N)`, and its own logger writes start-up notes and warnings there too: a short fine-tune printed ~40
lines of which ~20 were ours, the demo ~600. `routed()` puts a line filter in front of this process's stdout and
stderr: every line goes to the log file, and the console shows

- lines that do not come from Ray (the command's own stages, bars and result),
- lines from Ray's processes carrying our `[raysvc]` tag (the workers' progress), without Ray's prefix,
- Ray's lines that a person must see even when things are quiet (a removed placement group, a destroyed worker, a
  restarted worker group): IMPORTANT below.

With `--verbose` the console gets everything, as without the filter. Python warnings of this process (Ray's
deprecation notes, mostly) go to the log file only.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

TAG = "[raysvc]"
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# A line Ray forwarded from one of its processes: "(RayTrainWorker pid=123) ...", "(pid=9) ..." or
# "(TrainController pid=1, ip=10.0.0.2) ..." (colours removed first).
_RAY_PREFIX = re.compile(r"^\s*\((?:[\w.:<>-]+ )?pid=\d+(?:, ip=[^)]*)?\)\s?")
# A record of Ray's own logger in this process: "2026-12-01 08:10:21,751\tWARNING file.py:85 -- ...".
_RAY_LOG = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s+(?:DEBUG|INFO|WARNING|ERROR|CRITICAL)\s")
# Ray's words for events that change what the run does: shown whatever their source. ("[FailurePolicy] RETRY" is
# Ray Train's decision to restart the worker group after a failure, "RAISE" to give up.)
IMPORTANT = (
    "placement group was removed",
    "Cleaning up placement group",
    "Destroying worker",
    "[FailurePolicy]",
    "PreemptionError",
)


def shown(line: str) -> str | None:
    """What the console shows of one output line (without its newline), or None for the log file only. A line
    redrawn with carriage returns (a progress bar) is judged by its last drawing."""
    clean = _ANSI.sub("", line.rsplit("\r", 1)[-1])
    m = _RAY_PREFIX.match(clean)
    if m:
        rest = clean[m.end() :]
        if TAG in rest:
            return rest
        return f"[ray] {rest}" if any(w in rest for w in IMPORTANT) else None
    if _RAY_LOG.match(clean):
        return f"[ray] {clean}" if any(w in clean for w in IMPORTANT) else None
    return line


class _Filter(io.TextIOBase):
    """A text stream that writes whole lines to `log` and the `shown` part of each to `console`."""

    def __init__(self, console, log, verbose: bool):
        self.console, self.log, self.verbose = console, log, verbose
        self.pending = ""

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        self.log.write(s)
        if self.verbose:
            return self.console.write(s)
        self.pending += s
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            out = shown(line)
            if out is not None:
                self.console.write(out + "\n")
        if "\r" in self.pending and shown(self.pending) == self.pending:
            self.console.write(self.pending)  # our progress bar redrawing its line: pass it on now
            self.pending = ""
        return len(s)

    def flush(self) -> None:
        self.log.flush()
        self.console.flush()

    def isatty(self) -> bool:
        return self.console.isatty()

    def fileno(self) -> int:
        return self.console.fileno()


@contextlib.contextmanager
def routed(log_path: str | Path, verbose: bool = False) -> Iterator[Path]:
    """Filter this process's stdout / stderr (see the module doc) for the duration; every line, shown or not, is
    appended to `log_path`."""
    path = Path(log_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    saved = sys.stdout, sys.stderr, warnings.showwarning
    with open(path, "a", buffering=1) as log:
        sys.stdout = _Filter(saved[0], log, verbose)
        sys.stderr = _Filter(saved[1], log, verbose)
        if not verbose:
            warnings.showwarning = lambda msg, cat, fn, ln, file=None, line=None: log.write(
                warnings.formatwarning(msg, cat, fn, ln, line)
            )
        _point_ray_logger(saved[1], sys.stderr)  # Ray's logger holds the stderr it saw when ray was imported
        try:
            yield path
        finally:
            for stream in (sys.stdout, sys.stderr):
                if stream.pending:
                    stream.write("\n")
            _point_ray_logger(sys.stderr, saved[1])
            sys.stdout, sys.stderr, warnings.showwarning = saved


def _point_ray_logger(old, new) -> None:
    """Move the stream handlers of Ray's logger that write to `old` over to `new` (ray imported or not yet: a handler
    made while the filter is on holds the filter, and is moved back on the way out)."""
    for h in logging.getLogger("ray").handlers:
        if isinstance(h, logging.StreamHandler) and h.stream is old:
            h.setStream(new)
