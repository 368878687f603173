"""The console filter of routed commands: raysvc's lines on the console, Ray's in the log file, --verbose shows both.
(A real fine-tune's console is checked in test_faults.)"""

from __future__ import annotations

import subprocess
import sys
import textwrap

from raysvc.console import shown

RAY_LINES = [
    "\x1b[36m(TrainController pid=15830)\x1b[0m Requesting resources: {'CPU': 1.0} * 1",
    "(RayTrainWorker pid=15962) Checkpoint successfully created at: Checkpoint(filesystem=local, path=/x)",
    "(TrainController pid=1, ip=10.0.0.2) [2026-12-01 08:10:34,872 E 15830 15860] core_worker.cc:2465: Actor ...",
    "2026-12-01 08:10:21,751\tWARNING authentication_token_setup.py:85 -- Token authentication is enabled",
    # a Ray Data progress bar redrawn in a worker: cursor moves, two colour codes, carriage returns
    "\x1b[A\x1b[A\r   \x1b[A\x1b[2m\x1b[36m(pid=32037) \x1b[0m- split(2, equal=False): Tasks: 0; 100%|##| 1.66k/1.66k",
    "(TrainController pid=4) Attempting to start training worker group of size 2",
    "[2026-12-07 01:19:13,713 E 7819 7819] core_worker.cc:2465: Actor with class name: 'MapWorker' and ID: '64'",
]


def test_shown_keeps_ours_and_what_matters_and_drops_ray_chatter():
    assert (
        shown("\x1b[36m(RayTrainWorker pid=15962)\x1b[0m [raysvc] step 2/24 loss 1.5") == "[raysvc] step 2/24 loss 1.5"
    )
    assert shown("(_read_task pid=7) [raysvc] warning: reading s3://b/x: retry 1 in 0.5 s") == (
        "[raysvc] warning: reading s3://b/x: retry 1 in 0.5 s"
    )
    assert all(shown(line) is None for line in RAY_LINES)
    kept = shown("(PlacementGroupCleaner pid=9) Cleaning up placement group = [abc] created by this run.")
    assert kept == "[ray] Cleaning up placement group = [abc] created by this run."
    assert shown("\x1b[36m(TrainController pid=5)\x1b[0m [FailurePolicy] RETRY") == "[ray] [FailurePolicy] RETRY"
    assert shown("shards:  12%|#2 | 1/8\rshards:  25%|##5 | 2/8") == "shards:  12%|#2 | 1/8\rshards:  25%|##5 | 2/8"
    assert shown('{"run": "runs/x", "steps": 24}') == '{"run": "runs/x", "steps": 24}'  # the command's own output
    assert shown("==> stage 2: pretraining") == "==> stage 2: pretraining"


SCRIPT = textwrap.dedent("""
    import sys, warnings
    from raysvc.console import routed
    with routed(sys.argv[1], verbose=sys.argv[2] == "1"):
        print("==> stage one")
        print("(RayTrainWorker pid=3) Setting up process group")
        print("(RayTrainWorker pid=3) [raysvc] step 1/2", file=sys.stderr)
        warnings.warn("something deprecated", DeprecationWarning, stacklevel=1)
        print("partial ", end="")
        print("line")
    print("after")
""")


def _run(tmp_path, verbose: bool) -> tuple[str, str, str]:
    log = tmp_path / f"console-{verbose}.log"
    p = subprocess.run(
        [sys.executable, "-W", "always", "-c", SCRIPT, str(log), "1" if verbose else "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0, p.stderr
    return p.stdout, p.stderr, log.read_text()


def test_routed_output_goes_to_the_console_filtered_and_to_the_log_whole(tmp_path):
    out, err, log = _run(tmp_path, verbose=False)
    assert out == "==> stage one\npartial line\nafter\n"
    assert err == "[raysvc] step 1/2\n"
    for line in (
        "==> stage one",
        "(RayTrainWorker pid=3) Setting up process group",
        "(RayTrainWorker pid=3) [raysvc] step 1/2",
        "something deprecated",
        "partial line",
    ):
        assert line in log
    assert "after" not in log  # only what was printed while routed


def test_verbose_shows_everything(tmp_path):
    out, err, log = _run(tmp_path, verbose=True)
    assert "(RayTrainWorker pid=3) Setting up process group" in out
    assert "(RayTrainWorker pid=3) [raysvc] step 1/2" in err and "something deprecated" in err
    assert "(RayTrainWorker pid=3) Setting up process group" in log


# What a command prints while routed, through a pipe or into a file (not a terminal): Ray Data's redrawn bar, a Ray
# log record with its traceback (as a logging handler writes it: one write), worker step lines and our own bar.
BUSY = textwrap.dedent("""
    import sys
    from raysvc.console import Progress, routed
    with routed(sys.argv[1]):
        print("==> stage one")
        sys.stderr.write("\\x1b[32mshards\\x1b[0m 1/4\\rshards 2/4\\rshards 4/4\\n")
        sys.stderr.write("\\x1b[A\\x1b[2m(pid=3)\\x1b[0m - split(2): 10%\\r(pid=3) - split(2): 100%\\n")
        sys.stderr.write("2026-12-01 08:10:21,751\\tERROR tune_controller.py:1 -- Trial task failed\\n"
                         "Traceback (most recent call last):\\n  File \\"x.py\\", line 1\\nValueError: boom\\n")
        for actor in ("ab" * 14, "cd" * 14):  # one event, said by two of Ray's processes
            print(f"(RayTrainWorker pid=4) Destroying worker since its placement group was removed ({actor})")
        print("          \x1b[A   ")  # what erasing a bar drawn elsewhere leaves
        for step in (1, 2, 3, 4):
            print(f"(RayTrainWorker pid=3) [raysvc] step {step}/4 loss 1.0", file=sys.stderr, flush=True)
        import os
        os.write(2, b"[2026-12-07 01:19:13,713 E 7 7] core_worker.cc:2465: from C++, past sys.stderr\\n")
        os.write(2, b"a C library's own note\\n")
        with Progress("predict", 100, "events") as bar:
            for _ in range(100):
                bar.update()
        print("result")
""")


def _busy(tmp_path, stderr) -> tuple[subprocess.CompletedProcess, str]:
    log = tmp_path / "busy.log"
    p = subprocess.run(
        [sys.executable, "-c", BUSY, str(log)], stdout=subprocess.PIPE, stderr=stderr, text=True, timeout=60
    )
    assert p.returncode == 0, p.stderr
    return p, log.read_text()


def test_a_pipe_or_file_gets_plain_lines_and_the_log_gets_everything_uncoloured(tmp_path):
    p, log = _busy(tmp_path, subprocess.PIPE)
    console = p.stdout + p.stderr
    assert "\x1b" not in console and "\r" not in console
    assert p.stdout.splitlines()[0] == "==> stage one" and p.stdout.splitlines()[2:] == ["result"]
    assert p.stdout.splitlines()[1].startswith("[ray] Destroying worker since its placement group was removed")
    err = p.stderr.splitlines()
    assert err[0] == "shards 4/4"  # the last drawing of a redrawn line only
    assert err[1:5] == [f"[raysvc] step {s}/4 loss 1.0" for s in (1, 2, 3, 4)]
    # written to file descriptor 2 directly: Ray's C++ line to the log only, anything else shown
    assert "a C library's own note" in err and "core_worker.cc" not in p.stderr and "core_worker.cc" in log
    err.remove("a C library's own note")  # read by a thread: its place among the lines may vary
    bar = err[5:]  # our bar: a line at 25, 50 and 75 %, then the final one
    assert [line.split(": ", 1)[1].split(" (")[0] for line in bar] == [
        "25/100 events",
        "50/100 events",
        "75/100 events",
        "100/100 events",
    ]
    assert "Traceback" not in p.stderr and "split(2)" not in p.stderr  # Ray's record and bar: log only
    assert "\x1b" not in log
    for line in ("ValueError: boom", "Traceback (most recent call last):", "(pid=3) - split(2): 100%", "result"):
        assert line in log


def test_a_terminal_gets_the_progress_lines_redrawn_in_place(tmp_path):
    import os
    import pty

    master, slave = pty.openpty()
    try:
        p, _ = _busy(tmp_path, slave)
    finally:
        os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the other end is closed: all read
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    text = out.decode()
    # each step line replaces the one before on the same terminal line; the next whole line starts on its own
    assert "\r[raysvc] step 1/4 loss 1.0\x1b[K\r[raysvc] step 2/4 loss 1.0\x1b[K" in text
    assert "\r[raysvc] predict: 100/100 events (100%)" in text
    assert "Traceback" not in text


def test_the_resource_watch_names_a_placement_group_that_waits_but_not_queued_tasks(ray_local):
    """On the suite's 2-CPU Ray with both CPUs held: tasks queued alone are normal (read-ahead), a placement group
    that cannot be placed (what a Train worker group or a Tune trial asks for) is said, with what is free."""
    import io
    import time

    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from raysvc.console import ResourceWatch

    @ray.remote(num_cpus=2)
    class Hog:
        def ping(self) -> int:
            return 1

    @ray.remote(num_cpus=1)
    def task() -> int:
        return 1

    hog = Hog.remote()
    ray.get(hog.ping.remote())
    said = io.StringIO()
    watch, pg = ResourceWatch(poll_s=0.5, after_s=1.0, stream=said), None
    try:
        refs = [task.remote() for _ in range(2)]
        time.sleep(2)
        assert watch.waiting() == ""
        pg = placement_group([{"CPU": 1}, {"CPU": 1}])
        with watch:
            deadline = time.monotonic() + 10
            while "waiting" not in said.getvalue() and time.monotonic() < deadline:
                time.sleep(0.2)
        line = said.getvalue()
        assert "a placement group of 2 x {CPU: 1}" in line and "0 of 2 CPU free" in line, line
    finally:
        if pg is not None:
            remove_placement_group(pg)
        ray.kill(hog)
    ray.get(refs)
