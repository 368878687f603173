"""`raysvc bench heap`: where a training worker's memory goes, and what each allocator setting does about it.

The same training steps (tiny Panda pretraining, or tiny fine-tuning; same batches, same order, same seed, one
thread) run once per variant, each in a fresh process (a heap's history belongs to its process) started with the
variant's environment:

- `glibc`: today's default, never trimmed (the baseline of every ratio);
- `trim-K`: glibc, `malloc_trim(0)` every K steps (`train.trim_heap` does K = 1);
- `arena-2`: glibc with MALLOC_ARENA_MAX=2 (fewer per-thread arenas);
- `mmap-256k`, `mmap-4m`: glibc with its mmap threshold fixed at 256 KiB / 4 MiB (GLIBC_TUNABLES): glibc raises
  the threshold to the largest block freed so far, after which activations of a few MB come from the heap and
  fragment it; fixed, each block above it is mmapped and returned to the OS when freed;
- `jemalloc`: jemalloc preloaded (the libjemalloc.so that ships inside Ray's wheel, so it is wherever Ray is);
  `jemalloc-bg` the same with a background purging thread and freed pages kept for 5 s; `jemalloc-bg-30s` kept for
  30 s; `jemalloc-keep` never purged (the allocator's own speed, without the cost of giving pages back);
- `glibc-thp`, `trim-1-thp`: glibc asking for transparent huge pages (`glibc.malloc.hugetlb=1`), untrimmed and
  trimmed every step: whether refaulting 2 MiB pages is cheaper than 4 KiB ones.

Reported per variant: median seconds per step, private memory between steps (largest, last), peak RSS, the median
MB of fresh pages faulted in per step (minor faults x page size: memory handed back and touched again), ratios
against `glibc`, and whether the losses are bit-identical to it (an allocator must not change the arithmetic).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from raysvc.bench.train import _job, first_batches, generate_bench_data, plain_training
from raysvc.ray_init import environ
from raysvc.train import heap
from raysvc.train.run_record import load_avg, portable  # a result file names no machine's paths
from raysvc.train.worker import seed_everything

PRETRAIN_JOB = Path(__file__).parents[2] / "jobs" / "pretrain-panda-tiny.yaml"


def variants() -> dict[str, tuple[dict, int]]:
    """name -> (environment of the fresh process, trim every K steps or 0)."""
    out = {
        "glibc": ({}, 0),
        "trim-1": ({}, 1),
        "trim-10": ({}, 10),
        "arena-2": ({"MALLOC_ARENA_MAX": "2"}, 0),
        "mmap-256k": ({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=262144"}, 0),
        # only the largest blocks (activations of several MB) mmapped: they cannot fragment the heap
        "mmap-4m": ({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=4194304"}, 0),
        "glibc-thp": ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, 0),
        "trim-1-thp": ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, 1),
    }
    lib = heap.jemalloc_path()
    if lib:
        out["jemalloc"] = ({"LD_PRELOAD": lib}, 0)
        # purging from a background thread instead of on the allocating thread, freed pages kept for 5 s first
        out["jemalloc-bg"] = ({"LD_PRELOAD": lib, "MALLOC_CONF": heap.JEMALLOC_CONF}, 0)
        # decay counts pages, not their reuse: with steady churn even 30 s purges what every step touches again
        out["jemalloc-bg-30s"] = ({"LD_PRELOAD": lib, "MALLOC_CONF": "background_thread:true,dirty_decay_ms:30000"}, 0)
        out["jemalloc-keep"] = ({"LD_PRELOAD": lib, "MALLOC_CONF": "dirty_decay_ms:-1,muzzy_decay_ms:-1"}, 0)
    return out


def segmentation_stepper(data: Path, steps: int, batch: int, threads: int) -> tuple[Callable[[int], float], int]:
    from raysvc.train.tasks.segmentation import train_step

    cfg = _job(data, data / "runs", "tiny", steps, batch, threads)
    seed_everything(cfg.train.seed * 1000)  # as rank 0 of a Train run: every variant draws the same numbers
    model, params, opt, loss_fn = plain_training(cfg)
    batches = first_batches(cfg, steps)
    return (
        lambda i: float(train_step(model, params, opt, loss_fn, batches[i % len(batches)], cfg, torch.device("cpu")))
    ), len(batches)


def panda_stepper(data: Path, steps: int, batch: int, threads: int) -> tuple[Callable[[int], float], int]:
    from raysvc.bench.gpu import _panda_stepper as stepper
    from raysvc.config import load_config
    from raysvc.data.streaming.reader import read_preprocessed
    from raysvc.data.streaming.shards import load_manifest
    from raysvc.data.streaming.views import collate_views, table_views
    from raysvc.storage import resolve
    from raysvc.train.tasks.panda import PretrainConfig

    seed_everything(0)  # views and masks draw from numpy's and torch's global generators, as in a Train worker
    sets = [f"data.uri={data / 'train'}", "probe_data=null", f"train.steps={steps}", f"train.batch_events={batch}"]
    cfg = load_config(PretrainConfig, str(PRETRAIN_JOB), sets)
    loc = resolve(str(data / "train"))
    manifest = load_manifest(loc)
    tables = [
        read_preprocessed(loc, rec, cfg.data.preprocess, None, True, manifest.detector_spec)[0]
        for rec in manifest.shards
    ]
    events = [ev for t in tables for ev in table_views(t, cfg.views, seed=0, epoch=0)]
    batches = [collate_views(events[i : i + batch]) for i in range(0, len(events) - batch + 1, batch)]
    step, losses, _ = stepper(cfg, batches, torch.device("cpu"))

    def run(i: int) -> float:
        step(i)
        return losses[-1]

    return run, len(batches)


def _measure(task: str, data: str, steps: int, batch: int, trim_every: int, threads: int, warmup: int) -> dict:
    """One variant, in its own process: `steps` training steps cycling over the run's batches."""
    torch.set_num_threads(threads)
    make = panda_stepper if task == "panda" else segmentation_stepper
    step, n_batches = make(Path(data), steps, batch, threads)
    times, private, losses, curve, faulted = [], [], [], [], []
    page_mb = resource.getpagesize() / 2**20
    for i in range(steps):
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        losses.append(step(i))
        if trim_every and (i + 1) % trim_every == 0:
            heap.trim()
        times.append(time.perf_counter() - t0)  # the trim is part of the step's cost
        faulted.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) * page_mb)
        private.append(heap.private_mb())
        glibc = heap.malloc_mb() if "LD_PRELOAD" not in os.environ else None
        curve.append([i + 1, private[-1], *((glibc["live_mb"], glibc["free_mb"]) if glibc else (None, None))])
    return {
        "step_s": statistics.median(times[warmup:]),
        "total_s": sum(times[warmup:]),
        "private_mb_max": max(private),
        "private_mb_end": private[-1],
        "faulted_mb_per_step": statistics.median(faulted[warmup:]),  # a huge page counts as one fault
        "distinct_batches": n_batches,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "losses": losses,
        "curve": curve,  # per step: [step, private MB, glibc live MB, glibc kept-free MB] (None under jemalloc)
    }


def run_heap_bench(
    task: str,
    events: int,
    steps: int,
    batch: int,
    threads: int,
    only: tuple[str, ...] | None,
    warmup: int = 5,
    log=print,
) -> dict:
    table = variants()
    for n in only or ():  # any trim cadence: trim-K trims every K steps
        if n.startswith("trim-") and n[5:].isdigit() and int(n[5:]) > 0:
            table.setdefault(n, ({}, int(n[5:])))
    names = list(only or table)
    unknown = [n for n in names if n not in table]
    if unknown or "glibc" not in names:
        raise ValueError(f"variants {names}: each one of {list(table)}, and glibc (the baseline) among them")
    names = ["glibc"] + [n for n in names if n != "glibc"]
    out: dict = {
        "settings": {
            "task": task,
            "events": events,
            "steps": steps,
            "batch_events": batch,
            "threads": threads,
            "warmup_steps": warmup,
            "variants": {n: {"env": portable(table[n][0]), "trim_every": table[n][1]} for n in names},
            "load_avg_start": load_avg(),
        },
        "variants": {},
    }
    spawn = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        generate_bench_data(data, events, log)
        for name in names:
            env, every = table[name]
            log(f"[raysvc] {name}: {steps} {task} steps in a fresh process")
            # a spawned process starts from this environment (LD_PRELOAD needs it at exec)
            with environ(env), spawn.Pool(1) as pool:
                args = (task, str(data), steps, batch, every, threads, warmup)
                out["variants"][name] = pool.apply(_measure, args)
    out["settings"]["load_avg_end"] = load_avg()
    base = out["variants"]["glibc"]
    for v in out["variants"].values():
        v["step_time_vs_glibc"] = v["total_s"] / base["total_s"]
        v["private_mb_max_vs_glibc"] = v["private_mb_max"] / base["private_mb_max"]
        v["peak_rss_vs_glibc"] = v["peak_rss_mb"] / base["peak_rss_mb"]
        v["same_losses_as_glibc"] = v["losses"] == base["losses"]
    return out
