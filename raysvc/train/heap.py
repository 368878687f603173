"""The C heap of a training worker between steps.

A step allocates and frees activations of a few MB each, sized by the batch's point count, which changes every step.
glibc keeps the freed blocks (its mmap threshold rises to the largest freed block, so later ones land on the heap)
and the heap fragments: a one-thread tiny fine-tune held 1.5 GB of private memory between steps, 0.5 GB with
`malloc_trim(0)` after each step, which costs time, as the next step faults its pages in again (README,
`raysvc bench heap`). Where glibc is absent (macOS, musl) trimming does nothing.
"""

from __future__ import annotations

import ctypes

try:  # the symbols already loaded into this process: glibc's malloc_trim where there is one
    _malloc_trim = ctypes.CDLL(None).malloc_trim
except (OSError, AttributeError):
    _malloc_trim = None


def trim() -> bool:
    """Return the heap's free pages to the OS; True if glibc released any."""
    return bool(_malloc_trim(0)) if _malloc_trim is not None else False


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
    """A progress record with this process's private memory added, where it can be read."""
    mb = private_mb()
    return rec if mb is None else {**rec, "private_mb": mb}


def memory_note(rec: dict) -> str:
    """The progress line's memory part: empty where `rec` has none."""
    return f", private memory {rec['private_mb']:.0f} MB" if "private_mb" in rec else ""
