"""raysvc.train.heap: trimming a fragmented C heap, and the private memory the progress lines report."""

from __future__ import annotations

import json
import mmap
import subprocess
import sys

import pytest

from raysvc.train import heap

FRAGMENT = """
import json, sys
from raysvc.train import heap
# 300 MB in 100 KB blocks (below glibc's mmap threshold, so on the heap); keeping every 10th block alive pins the
# heap's top, so only malloc_trim can give the freed blocks between them back
blocks = [bytearray(100_000) for _ in range(3000)]
kept = blocks[::10]
del blocks
before = heap.private_mb()
released = heap.trim() if sys.argv[1] == "trim" else False
print(json.dumps({"before": before, "after": heap.private_mb(), "released": released, "kept": len(kept)}))
"""


def _run(mode: str) -> dict:
    p = subprocess.run([sys.executable, "-c", FRAGMENT, mode], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc_trim and /proc are Linux")
def test_trim_gives_a_fragmented_heaps_free_pages_back():
    kept = _run("keep")
    assert kept["before"] > 250 and kept["after"] > 250  # the freed 270 MB stay with the process untrimmed
    trimmed = _run("trim")
    assert trimmed["released"] is True
    assert trimmed["before"] > 250 and trimmed["after"] < trimmed["before"] - 200  # 30 MB of blocks stay alive


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/smaps_rollup is Linux")
def test_private_mb_counts_what_this_process_alone_touched():
    # fresh anonymous pages, each written once: 200 MB private. (A bytearray came from the heap, which, after the
    # tests before it in the same process, could already hold 200 MB of touched free pages: it then grew by 0.)
    ballast = mmap.mmap(-1, 200 * 2**20)
    before = heap.private_mb()
    for page in range(0, len(ballast), mmap.PAGESIZE):
        ballast[page] = 1
    grown = heap.private_mb() - before
    assert grown == pytest.approx(200, rel=0.05)
    rec = heap.with_private_mb({"step": 3})
    assert rec["step"] == 3 and rec["private_mb"] > 200 and len(ballast)
    assert heap.memory_note(rec).startswith(", private memory ") and heap.memory_note({"step": 3}) == ""


def test_the_heap_bench_runs_each_task_s_steps_in_process(tmp_path):
    """`raysvc bench heap --task panda|segmentation` steps the job's own training step on generated events (the
    Panda stepper once unpacked the shared stepper's answer wrongly and failed before its first step)."""
    import math

    from raysvc.bench.heap import _measure
    from raysvc.data.sources.synthetic import generate_dataset
    from raysvc.storage import resolve

    generate_dataset(resolve(str(tmp_path / "train")), 8, seed=5, shard_events=4, show_progress=False)
    generate_dataset(resolve(str(tmp_path / "val")), 2, seed=6, shard_events=2, show_progress=False)
    for task in ("panda", "segmentation"):
        r = _measure(task, str(tmp_path), 2, 2, 1, 1, 0)  # trimmed after every step
        assert len(r["losses"]) == 2 and all(math.isfinite(x) and x > 0 for x in r["losses"]), task
        assert r["private_mb_max"] > 100 and [c[0] for c in r["curve"]] == [1, 2]
        # each step faults in again the activation pages the trim gave back: tens of MB at least, counted per step
        assert r["faulted_mb_per_step"] > 10, (task, r["faulted_mb_per_step"])
