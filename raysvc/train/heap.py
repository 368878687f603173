"""The C heap of a training worker between steps.

A step allocates and frees activations of a few MB each, sized by the batch's point count, which changes every step.
glibc keeps the freed blocks (its mmap threshold rises to the largest freed block, so later ones land on the heap)
and the heap fragments: a one-thread tiny fine-tune held 1.5 GB of private memory between steps, 0.5 GB with
`malloc_trim(0)` after each step, which costs time, as the next step faults its pages in again (README,
`raysvc bench heap`). Where glibc is absent (macOS, musl) trimming does nothing.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
from pathlib import Path

try:  # the symbols already loaded into this process: glibc's malloc_trim where there is one
    _malloc_trim = ctypes.CDLL(None).malloc_trim
except (OSError, AttributeError):
    _malloc_trim = None


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")
    ] + [("keepcost", ctypes.c_size_t)]


try:  # glibc >= 2.33
    _mallinfo2 = ctypes.CDLL(None).mallinfo2
    _mallinfo2.restype = _Mallinfo2
except (OSError, AttributeError):
    _mallinfo2 = None


# jemalloc with its freed pages purged by a background thread after 5 s: flat memory over long runs (benchmarks.md)
JEMALLOC_CONF = "background_thread:true,dirty_decay_ms:5000"


def jemalloc_path() -> str | None:
    """The jemalloc shared library inside Ray's wheel, if this Ray has one."""
    spec = importlib.util.find_spec("ray")
    if spec is None or not spec.origin:
        return None
    lib = Path(spec.origin).parent / "core" / "libjemalloc.so"
    return str(lib) if lib.exists() else None


def worker_runtime_env(allocator: str) -> dict | None:
    """The Train workers' runtime env for `train.allocator` (None: glibc, as the process starts). jemalloc must be
    preloaded when the process starts, so it goes into the workers' environment; its path is this Ray's, which on a
    cluster must be the same on every node (one image)."""
    if allocator == "glibc":
        return None
    lib = jemalloc_path()
    if lib is None:
        raise ValueError("train.allocator jemalloc: this Ray install ships no core/libjemalloc.so; use glibc")
    return {"env_vars": {"LD_PRELOAD": lib, "MALLOC_CONF": JEMALLOC_CONF}}


@functools.cache
def allocator() -> str:
    """The allocator this process runs under: "jemalloc" when it is loaded, else "glibc"."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "glibc"
    return "jemalloc" if "libjemalloc" in maps else "glibc"


def trim() -> bool:
    """Return the heap's free pages to the OS; True if glibc released any."""
    return bool(_malloc_trim(0)) if _malloc_trim is not None else False


def malloc_mb() -> dict[str, float] | None:
    """glibc's count of the C heap over all its arenas (`mallinfo2`): `live_mb` handed out and not freed (heap +
    mmapped blocks), `free_mb` freed but kept by glibc. Live memory that grows means something holds on to buffers;
    free memory that grows is the allocator keeping what was given back. None without glibc; meaningless under a
    preloaded allocator (jemalloc), which glibc's arenas do not see."""
    if _mallinfo2 is None:
        return None
    m = _mallinfo2()
    return {"live_mb": (m.uordblks + m.hblkhd) / 2**20, "free_mb": m.fordblks / 2**20}


def private_mb() -> float | None:
    """This process's private resident memory in MB (Linux), the part no other process shares; None elsewhere."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
    except OSError:
        return None
    kb = sum(int(fields[k].split()[0]) for k in ("Private_Clean", "Private_Dirty") if k in fields)
    return kb / 1024


def with_private_mb(rec: dict) -> dict:
    """A progress record with this process's private memory added, and glibc's live / kept-free heap beside it (so a
    growth can be told apart: live buffers, the allocator's free lists, or memory outside malloc), where readable."""
    mb = private_mb()
    if mb is None:
        return rec
    rec = {**rec, "private_mb": mb}
    heap = malloc_mb() if allocator() == "glibc" else None
    return rec if heap is None else {**rec, "heap_live_mb": heap["live_mb"], "heap_free_mb": heap["free_mb"]}


def memory_note(rec: dict) -> str:
    """The progress line's memory part: empty where `rec` has none."""
    if "private_mb" not in rec:
        return ""
    note = f", private memory {rec['private_mb']:.0f} MB"
    if "heap_live_mb" in rec:
        note += f" (heap live {rec['heap_live_mb']:.0f}, free {rec['heap_free_mb']:.0f})"
    return note
