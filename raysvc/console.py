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

On a terminal a progress line (ours, or a worker's `[raysvc] step i/n` line) is redrawn in place; anywhere else
(a file, a pipe, CI) every line is plain text: colours and cursor moves removed, a redrawn line reduced to its last
drawing. `Progress` is the one progress line of a long stage, and `ResourceWatch` says on the console when the
work waits for CPUs or GPUs that the cluster does not have free.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import threading
import time
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

TAG = "[raysvc]"
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# A line Ray forwarded from one of its processes: "(RayTrainWorker pid=123) ...", "(pid=9) ..." or
# "(TrainController pid=1, ip=10.0.0.2) ..." (colours removed first).
_RAY_PREFIX = re.compile(r"^\s*\((?:[\w.:<>-]+ )?pid=\d+(?:, ip=[^)]*)?\)\s?")
# A record of Ray's own logger in this process: "2026-12-01 08:10:21,751\tWARNING file.py:85 -- ...".
_IDS = re.compile(r"[0-9a-f]{16,}")  # Ray's actor, worker and placement group ids
# A worker's progress line, drawn in place on a terminal.
_STEP = re.compile(r"^\[raysvc\] (step \d+/\d+|ingest:) ")
_RAY_LOG = re.compile(
    r"^(?:\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s+(?:DEBUG|INFO|WARNING|ERROR|CRITICAL)\s"
    # or of Ray's C++ core in this process, written to file descriptor 2: "[2026-12-07 01:19:13,713 E 7819 7819] ..."
    r"|\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [DIWEF] \d+ \d+\] )"
)
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


def plain(text: str) -> str:
    """`text` as a file shows it: colours and cursor moves removed, a line redrawn with carriage returns reduced to
    its last drawing."""
    return "\n".join(_ANSI.sub("", line.rsplit("\r", 1)[-1]) for line in text.split("\n"))


class _Screen:
    """Whether the terminal's cursor sits after a line drawn in place (shared by the stdout and stderr filters: both
    write to one terminal), so that the next whole line starts on a line of its own."""

    open = False
    last_ray = ""  # the last [ray] line shown


class _Filter(io.TextIOBase):
    """A text stream that writes whole lines to `log` (uncoloured) and the `shown` part of each to `console`: in place
    or plain, as the console is a terminal or not."""

    def __init__(self, console, log, verbose: bool, screen: _Screen):
        self.console, self.log, self.verbose, self.screen = console, log, verbose, screen
        self.tty = console.isatty()
        self.pending = ""
        self.mute = False  # this process's own lines to the log only (see `own_output_to_log`)
        self.lock = threading.Lock()  # ResourceWatch writes from its own thread

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        with self.lock:
            return self._write(s)

    def _write(self, s: str) -> int:
        self.log.write(_ANSI.sub("", s))
        if self.verbose:
            return self.console.write(s if self.tty else plain(s))
        if not self.pending and s.endswith("\n") and _RAY_LOG.match(_ANSI.sub("", s)) and s[0] != "[":
            # a logging handler writes a whole record at once: its traceback lines are part of it
            first = shown(s.split("\n", 1)[0])
            if first is not None:
                self._line(first)
            return len(s)
        self.pending += s
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            out = shown(line)
            if out is not None and not (self.mute and out == line):
                self._line(out)
        if "\r" in self.pending:
            last = self.pending.rsplit("\r", 1)[-1]
            if self.tty and shown(self.pending) == self.pending:
                self._redraw(last)  # our progress bar redrawing its line: pass it on now
                self.pending = ""
            else:
                self.pending = "\r" + last  # only the last drawing can still show
        return len(s)

    def _line(self, text: str) -> None:
        if text.strip() == "" and text != "" or plain(text).strip() == "" and plain(text) != text:
            return  # blanks and cursor moves that erase a progress bar drawn elsewhere
        if text.startswith("[ray] "):
            key = _IDS.sub("", text)
            if key == self.screen.last_ray:
                return  # one Ray event said by each of its processes (five workers destroyed, ids aside): once
            self.screen.last_ray = key
        if not self.tty:
            self.console.write(plain(text) + "\n")
        elif "\r" in text or _STEP.match(text):
            self._redraw(text.rsplit("\r", 1)[-1])
        else:
            self.console.write(("\n" if self.screen.open else "") + text + "\n")
            self.screen.open = False

    def _redraw(self, text: str) -> None:
        self.console.write("\r" + text.rstrip() + "\x1b[K")
        self.console.flush()
        self.screen.open = True

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
    screen = _Screen()
    with open(path, "a", buffering=1) as log, ResourceWatch(), contextlib.ExitStack() as stack:
        err_console = saved[1] if verbose else stack.enter_context(_ErrorDescriptor(saved[1]))
        sys.stdout = _Filter(saved[0], log, verbose, screen)
        sys.stderr = _Filter(err_console, log, verbose, screen)
        pump = _DescriptorPump(sys.stderr).__enter__() if err_console is not saved[1] else None
        if not verbose:
            warnings.showwarning = lambda msg, cat, fn, ln, file=None, line=None: log.write(
                warnings.formatwarning(msg, cat, fn, ln, line)
            )
        _point_ray_logger(saved[1], sys.stderr)  # Ray's logger holds the stderr it saw when ray was imported
        try:
            yield path
        finally:
            if pump is not None:
                pump.__exit__()  # file descriptor 2 back to the terminal, and what the pipe still held filtered
            for stream in (sys.stdout, sys.stderr):
                if stream.pending:
                    stream.write("\n")
            if screen.open:
                err_console.write("\n")
            _point_ray_logger(sys.stderr, saved[1])
            sys.stdout, sys.stderr, warnings.showwarning = saved
            saved[1].flush()


class _ErrorDescriptor:
    """The console's stderr as a stream of its own (a duplicate of file descriptor 2), for the filter to write to
    while descriptor 2 itself points at `_DescriptorPump`'s pipe. The original stream is used as it is where it has
    no descriptor (a test's captured stream)."""

    def __init__(self, original):
        self.original, self.stream = original, original

    def __enter__(self):
        try:
            self.original.flush()
            fd = self.original.fileno()
        except (AttributeError, OSError, ValueError):
            return self.original
        if fd != 2:
            return self.original
        enc = getattr(self.original, "encoding", None) or "utf-8"
        self.stream = open(os.dup(2), "w", buffering=1, encoding=enc, errors="replace")
        return self.stream

    def __exit__(self, *exc) -> None:
        if self.stream is not self.original:
            self.stream.close()


class _DescriptorPump:
    """What C and C++ code in this process writes to file descriptor 2 (Ray's core worker logs its errors there,
    past sys.stderr) goes through `filt` like any other line: the descriptor points at a pipe that a thread reads.
    Afterwards the descriptor is restored; the thread drains what is left, then passes on anything a child process
    that inherited the pipe still writes, unfiltered, to the console."""

    def __init__(self, filt: _Filter):
        self.filt = filt
        self.done, self.drained = threading.Event(), threading.Event()
        self.saved_copy: int | None = None

    def __enter__(self) -> _DescriptorPump:
        self.saved = os.dup(2)
        read, write = os.pipe()
        os.dup2(write, 2)
        os.close(write)
        self.read = read
        self.thread = threading.Thread(target=self._pump, name="raysvc-fd2", daemon=True)
        self.thread.start()
        return self

    def _pump(self) -> None:
        import codecs
        import select

        decode = codecs.getincrementaldecoder("utf-8")(errors="replace")
        try:
            while not self.done.is_set() or select.select([self.read], [], [], 0)[0]:
                if not select.select([self.read], [], [], 0.2)[0]:
                    continue
                chunk = os.read(self.read, 65536)
                if not chunk:
                    return  # every writer gone: the command's end
                self.filt.write(decode.decode(chunk))
            self.drained.set()
            while chunk := os.read(self.read, 65536):  # after the command: a child's late output, as it is
                os.write(self.saved_copy, chunk)
        finally:
            self.drained.set()
            os.close(self.read)
            if self.saved_copy is not None:
                os.close(self.saved_copy)

    def __exit__(self, *exc) -> None:
        sys.stderr.flush()
        self.saved_copy = os.dup(self.saved)
        os.dup2(self.saved, 2)  # the pipe's write end closes here, unless a child process holds it too
        os.close(self.saved)
        self.done.set()
        self.drained.wait(timeout=5)


@contextlib.contextmanager
def own_output_to_log() -> Iterator[None]:
    """For the duration, what this process itself prints to stdout goes to the log file only (a library's tables: Ray
    Tune prints its experiment and status tables whatever its verbosity); lines forwarded from Ray's workers are
    judged as always. Nothing changes when the output is not routed, or routed with --verbose."""
    out = sys.stdout
    if not isinstance(out, _Filter) or out.verbose:
        yield
        return
    out.mute = True
    try:
        yield
    finally:
        out.mute = False


def _point_ray_logger(old, new) -> None:
    """Move the stream handlers of Ray's loggers (`ray`, `ray.data`, ...) that write to `old` over to `new` (ray
    imported or not yet: a handler made while the filter is on holds the filter, and is moved back on the way out)."""
    names = ["ray", *(n for n in logging.root.manager.loggerDict if n.startswith("ray."))]
    for name in names:
        for h in logging.getLogger(name).handlers:
            if isinstance(h, logging.StreamHandler) and h.stream is old:
                h.setStream(new)


class Progress:
    """The one progress line of a long stage: `desc done/total (pct) rate, note`. On a terminal it is redrawn in place
    (at most ten times a second); elsewhere a plain line is printed at each quarter of `total` (or every `every_s`
    seconds without a total), so a log holds a handful of lines per stage. Written to stderr: stdout keeps only a
    command's result."""

    def __init__(self, desc: str, total: int | None = None, unit: str = "", every_s: float = 30.0, stream=None):
        self.desc, self.total, self.unit, self.every_s = desc, total, unit, every_s
        self.stream = stream
        self.done, self.note = 0, ""
        self.t0 = self.t_drawn = time.monotonic()
        self.quarter = 0
        self.closed = False

    def _out(self):
        return self.stream or sys.stderr

    def text(self) -> str:
        unit = f" {self.unit}" if self.unit else ""
        if self.total:
            count = f"{self.done}/{self.total}{unit} ({100 * self.done / self.total:.0f}%)"
        else:
            count = f"{self.done}{unit}"
        dt = time.monotonic() - self.t0
        rate = f", {self.done / dt:.2f}{unit}/s" if self.done and dt > 0 and self.unit else ""
        return f"[raysvc] {self.desc}: {count}{rate}, {dt:.0f} s" + (f"; {self.note}" if self.note else "")

    def update(self, n: int = 1, note: str | None = None) -> None:
        self.done += n
        if note is not None:
            self.note = note
        now, out = time.monotonic(), self._out()
        if out.isatty():
            if now - self.t_drawn >= 0.1 or (self.total and self.done >= self.total):
                out.write("\r" + self.text() + "\x1b[K")
                out.flush()
                self.t_drawn = now
            return
        quarter = 4 * self.done // self.total if self.total else 0
        if (self.total and quarter > self.quarter and self.done < self.total) or (
            not self.total and now - self.t_drawn >= self.every_s
        ):
            print(self.text(), file=out, flush=True)
            self.quarter, self.t_drawn = quarter, now

    def close(self, note: str | None = None) -> None:
        """The final line, always printed (on a terminal: the line drawn in place, finished)."""
        if self.closed:
            return
        self.closed = True
        if note is not None:
            self.note = note
        out = self._out()
        print(("\r" if out.isatty() else "") + self.text() + ("\x1b[K" if out.isatty() else ""), file=out, flush=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(items: Iterable, desc: str, total: int | None = None, unit: str = "") -> Iterator:
    """`items`, with a `Progress` line that counts them."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)
    with Progress(desc, total, unit) as bar:
        for item in items:
            yield item
            bar.update()


class ResourceWatch:
    """While a command runs, a thread asks the Ray cluster this process is connected to (if any, every `poll_s`
    seconds) what its work waits for: resource requests of tasks and actors, and groups of bundles (a Ray Train worker
    group, a Tune trial's placement group) that cannot be placed. A demand that lasts `after_s` seconds is said on the
    console with what the cluster has free, once, then every minute while it lasts, and its end is said too. (Ray
    says it in its own log only, which a person waiting at the console does not see.)"""

    def __init__(self, poll_s: float = 2.0, after_s: float = 4.0, again_s: float = 60.0, stream=None):
        self.poll_s, self.after_s, self.again_s, self.stream = poll_s, after_s, again_s, stream
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="raysvc-resource-watch", daemon=True)

    def __enter__(self) -> ResourceWatch:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(timeout=5)

    def _say(self, text: str) -> None:
        print(text, file=self.stream or sys.stderr, flush=True)

    def _run(self) -> None:
        since, said = None, None  # when the current wait began; when it was last said
        while not self.stop.wait(self.poll_s):
            try:
                waits = self.waiting()
            except Exception:  # Ray starting, stopping or not there: nothing to say
                waits = None
            now = time.monotonic()
            if not waits:
                if said is not None and waits == "":
                    self._say(f"[raysvc] resources free: the work that waited {now - since:.0f} s runs")
                since, said = None, None
                continue
            since = since or now
            if now - since >= self.after_s and (said is None or now - said >= self.again_s):
                self._say(f"[raysvc] waiting {now - since:.0f} s for resources: {waits}")
                said = now

    def waiting(self) -> str | None:
        """What the connected cluster's work waits for, in words: "" for nothing, None when Ray is not running here.
        Tasks alone waiting is not a wait worth saying: read-ahead queues tasks on purpose (a training rank keeps
        `prefetch` reads in flight); a placement group, or an actor, that cannot be placed is."""
        ray = sys.modules.get("ray")
        if ray is None or not ray.is_initialized():
            return None
        from ray._private.state import state as global_state
        from ray.autoscaler.v2.sdk import get_cluster_status

        status = get_cluster_status(ray.get_runtime_context().gcs_address, timeout=max(1, int(self.poll_s)))
        demands = status.resource_demands
        parts = []
        if demands.ray_task_actor_demand:
            actors = global_state.actor_table(None, actor_state_name="PENDING_CREATION").values()
            names = sorted({a["ActorClassName"] for a in actors})
            if names:
                shapes = [
                    f"{b.count} x {_bundle(b.bundle)}"
                    for d in demands.ray_task_actor_demand
                    for b in d.bundles_by_count
                ]
                parts.append(f"{', '.join(shapes)} (actors {', '.join(names)} and tasks)")
        for g in demands.placement_group_demand:
            bundles = ", ".join(f"{b.count} x {_bundle(b.bundle)}" for b in g.bundles_by_count)
            parts.append(f"a placement group of {bundles} (a Train worker group or a Tune trial)")
        if not parts:
            return ""
        total, free = status.total_resources(), status.available_resources()
        have = ", ".join(f"{free.get(k, 0):g} of {total[k]:g} {k}" for k in ("CPU", "GPU") if total.get(k))
        return f"{'; '.join(parts)}; the cluster has {have or 'no CPU or GPU'} free"


def _bundle(resources) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(resources.items()) if not k.startswith("node:")) + "}"
