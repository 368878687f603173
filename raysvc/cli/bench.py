"""`raysvc bench ...`: every benchmark is one row of BENCHES (options, run function, summary) and runs through
`cmd_bench`, which prints its JSON (--json, also to --out) or its summary. The defaults of a benchmark's settings
stand in its options here, once: its run function takes them as arguments."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from dataclasses import dataclass

from raysvc.cli.common import keywords, log, print_json

Option = tuple[str, dict]  # one add_argument call: the flag and its keywords


def _opt(flag: str, **kw) -> Option:
    return flag, kw


def _ints(**defaults: int) -> tuple[Option, ...]:
    """Integer options in this order, each with its default: `batch_events=8` is `--batch-events` (default 8)."""
    return tuple(_opt(f"--{name.replace('_', '-')}", type=int, default=v) for name, v in defaults.items())


def _json_opts(out_help: str) -> tuple[Option, Option]:
    return _opt("--json", action="store_true"), _opt("--out", help=out_help)


@dataclass(frozen=True)
class Bench:
    help: str
    run: str  # "module:function", imported only when the benchmark runs (it loads torch, Ray)
    options: tuple[Option, ...]  # in the order --help lists them
    # the run function's keywords, its progress callback aside: dests, or "keyword=dest", or a function of the
    # parsed options that returns them
    kwargs: tuple[str, ...] | Callable[[argparse.Namespace], dict]
    summary: Callable[[dict], None]  # what is printed without --json
    progress: str | None = "log"  # the run function's keyword for progress lines (to stderr); None: it has none
    extend: Callable[[argparse.Namespace, dict], None] | None = None  # adds to the result before it is printed
    passed: Callable[[dict], bool] = lambda result: True  # False: exit 1, after printing (the GPU checks)


def _loaders(a: argparse.Namespace, result: dict) -> None:
    if a.loaders:
        from raysvc.bench.loaders import run_loader_bench

        result["loaders"] = run_loader_bench(
            events=a.loader_events, steps=a.steps, parts=tuple(a.loader_parts.split(",")), log=log
        )


def _ingest_summary(result: dict) -> None:
    print(
        f"ray data {result['ray_data_events_per_s']:.1f} ev/s, direct {result['direct_events_per_s']:.1f} "
        f"ev/s, ratio {result['ratio']:.2f}"
    )


def _ops_summary(result: dict) -> None:
    g, s, c = result["grouping"], result["serialization"], result["sparse_conv"]
    print(
        f"C-NMS + ball {g['cnms_ball_events_per_s']:.0f} ev/s, FPS + ball {g['fps_ball_events_per_s']:.0f} ev/s, "
        f"FPS + kNN {g['fps_knn_events_per_s']:.0f} ev/s; C-NMS vs FPS + ball {g['cnms_vs_fps_ball']:.2f}x"
    )
    t = result["tokenizer"]
    print(
        f"PoLAr-MAE tokens (grouping + patches + {t['embed']}): C-NMS + ball {t['cnms_ball_tokens_events_per_s']:.0f} "
        f"ev/s, FPS + ball {t['fps_ball_tokens_events_per_s']:.0f}, FPS + kNN {t['fps_knn_tokens_events_per_s']:.0f}"
    )
    print(
        f"serialization (1 thread): z {s['z_mpts_per_s']:.1f} Mpts/s ({s['z_vs_torch']:.1f}x torch), "
        f"hilbert {s['hilbert_mpts_per_s']:.1f} Mpts/s ({s['hilbert_vs_torch']:.1f}x torch)"
    )
    print(
        f"sparse conv fwd+bwd (1 thread, {c['points']} points): ours {c['ours_fwd_bwd_s'] * 1e3:.1f} ms, "
        f"spconv CPU {c.get('spconv_cpu_fwd_bwd_s', float('nan')) * 1e3:.1f} ms"
    )


def _train_summary(result: dict) -> None:
    for size in ("tiny", "small"):
        print(f"{size}: {result[f'{size}_fwd_bwd_s_per_event'] * 1e3:.0f} ms/event forward+backward")
    print(
        f"step: plain torch {result['plain_step_s'] * 1e3:.0f} ms, Ray Train {result['ray_train_step_s'] * 1e3:.0f}"
        f" ms, overhead {100 * result['ray_train_overhead']:+.1f} %"
    )
    for task in ("seg", "panda"):
        if f"{task}_tiny_profile" in result:
            p = result[f"{task}_tiny_profile"]
            print(
                f"{task} tiny: {result[f'{task}_tiny_s_per_step'] * 1e3:.0f} ms/step, "
                f"{100 * p['gemm_share_of_timed_step']:.0f} % in "
                f"matrix multiplies at {p['gemm_gflops']:.0f} GFLOP/s (the costliest shapes "
                f"{p['top_gemm_gflops_in_step']:.0f} in the step, {p['top_gemm_gflops_alone']:.0f} alone)"
            )


def _gpu_summary(result: dict) -> None:
    for name, ok in result["checks"].items():
        print(f"{'ok  ' if ok else 'FAIL'} {name}")
    for key in ("seg_tiny", "seg_small", "panda_tiny", "panda_base"):
        r = result.get(key, {})
        if not r:
            continue
        times = ", ".join(f"{k[:-7] or 'step'} {v * 1e3:.0f} ms" for k, v in r.items() if k.endswith("step_s"))
        ratios = ", ".join(f"{k[:-15]} x{v:.1f}" for k, v in r.items() if k.endswith("_speedup_vs_cpu"))
        print(f"{key} step ({r.get('events_per_step')} events): {times}" + (f"; vs CPU {ratios}" if ratios else ""))
        if "step_vs_a100_reference" in r:
            print(f"{key}: x{r['step_vs_a100_reference']:.2f} the A100 figure ({r['a100_reference_s']} s/iter)")


def _launches_summary(result: dict) -> None:
    for key, r in result.items():
        if isinstance(r, dict) and "device_ops_by_phase" in r:
            phases = ", ".join(f"{p} {n}" for p, n in r["device_ops_by_phase"].items())
            print(f"{key}: {r['device_ops']} device ops ({phases}), {r['syncs']} syncs, {r['host_ops']} host ops")


def _heap_summary(result: dict) -> None:
    for k, v in result["variants"].items():
        print(
            f"{k:>10}: {v['step_s'] * 1e3:5.0f} ms/step (x{v['step_time_vs_glibc']:.2f}), private memory max "
            f"{v['private_mb_max']:5.0f} MB (x{v['private_mb_max_vs_glibc']:.2f}), peak RSS {v['peak_rss_mb']:5.0f} "
            f"MB (x{v['peak_rss_vs_glibc']:.2f}), faulted {v['faulted_mb_per_step']:4.0f} MB/step, same losses: "
            f"{v['same_losses_as_glibc']}"
        )


def _serve_summary(result: dict) -> None:
    split = ", ".join(f"{k} {v:+.1f}" for k, v in result["overhead_split_ms"].items())
    print(
        f"overhead over in-process forward: {result['overhead_p50_ms']:+.1f} ms (p50: {split}); batching "
        f"throughput ratio {result['batching_throughput_ratio']}; errors {result['errors']}"
    )


BENCHES: dict[str, Bench] = {
    "ingest": Bench(
        help="Ray Data streaming from SeaweedFS vs direct pyarrow reading",
        run="raysvc.bench.ingest:run_ingest_bench",
        options=(
            *_json_opts("also write the JSON here"),
            *_ints(events=1000, shard_events=100),
            _opt("--uri", help="use this dataset instead of generating one into a local SeaweedFS"),
            *_ints(batch_events=8, repeats=3),
            _opt(
                "--loaders",
                action="store_true",
                help="also compare the training loaders (tasks, ray_data: delivery, a real pretraining's data wait, "
                "CPU and memory), prefetch and block size, and batch inference with 0 / 1 / 2 actors (~35 min on 2 "
                "cores)",
            ),
            _opt("--loader-events", type=int, default=1200, help="--loaders: events of the pretraining set"),
            _opt("--steps", type=int, default=40, help="--loaders: pretraining steps per run"),
            _opt(
                "--loader-parts",
                default="delivery,choices,predict,pretrain",
                help="--loaders: which parts to run (delivery, choices: prefetch and block size, predict, pretrain)",
            ),
        ),
        kwargs=("events", "uri", "batch_events", "repeats", "shard_events"),
        summary=_ingest_summary,
        progress=None,
        extend=_loaders,
    ),
    "ops": Bench(
        help="C-NMS vs FPS grouping, serialization, sparse conv vs spconv (one thread)",
        run="raysvc.bench.ops:run_ops_bench",
        options=(
            *_json_opts("also write the JSON here"),
            *_ints(events=48, seed=0),
            _opt("--radius", type=float, default=5.0, help="group radius in voxels (PoLAr-MAE: 5)"),
            _opt("--overlap", type=float, default=0.73, help="C-NMS overlap factor (PoLAr-MAE: 0.73)"),
            *_ints(repeats=3),
        ),
        kwargs=("events", "seed", "radius", "overlap", "repeats"),
        summary=_ops_summary,
        progress="progress",
    ),
    "train": Bench(
        help="fwd+bwd per event (tiny, small) and Ray Train step overhead vs plain torch",
        run="raysvc.bench.train:run_train_bench",
        options=(
            *_json_opts("also write the JSON here"),
            *_ints(events=40, steps=12, batch_events=2, threads=1),
            _opt(
                "--profile",
                action="store_true",
                help="also time and profile a tiny segmentation and a tiny Panda step: the share of matrix "
                "multiplies and their speed against the same shapes alone",
            ),
        ),
        kwargs=("events", "steps", "batch=batch_events", "threads", "profile"),
        summary=_train_summary,
    ),
    "gpu": Bench(
        help="the CUDA path against references (sparse conv vs dense conv3d, kNN / codes / "
        "attention / model vs CPU, bf16 vs fp32) and training steps timed against this machine's CPU",
        run="raysvc.bench.gpu:run_gpu_bench",
        options=(
            _opt("--device", default="cuda"),
            *_ints(events=24),
            _opt("--steps", type=int, default=10, help="timed steps per variant on the device (CPU: a quarter)"),
            *_ints(batch_events=4),
            _opt("--profile", action="store_true", help="also profile one bf16 segmentation step per size (CUDA)"),
            _opt(
                "--panda-base-events",
                type=int,
                default=None,
                help="events per timed Panda-Base step (bf16 on a GPU, beside the A100 figure of 0.895 s/iter); "
                "default 12 on a GPU, 0 (skipped) on the CPU",
            ),
            *_json_opts("also write the JSON here (with --json)"),
        ),
        kwargs=("device", "events", "steps", "batch=batch_events", "profile", "panda_base_events"),
        summary=_gpu_summary,
        passed=lambda result: result["all_passed"],
    ),
    "launches": Bench(
        help="device ops and syncs per training step (segmentation, Panda, PoLAr-MAE), counted on the CPU by "
        "replaying the device path, by phase and against a larger batch",
        run="raysvc.bench.launches:run_launches_bench",
        options=(
            *_json_opts("also write the JSON here"),
            _opt("--tasks", default="seg,panda,polarmae", help="comma-separated: seg, panda, polarmae"),
            _opt("--sizes", default="tiny", help="comma-separated model sizes: tiny, small"),
            _opt("--batch-events", default="2,4", help="comma-separated events per step; the first is the headline"),
            *_ints(events=16),
        ),
        kwargs=lambda a: dict(
            tasks=tuple(a.tasks.split(",")),
            sizes=tuple(a.sizes.split(",")),
            batches=tuple(int(b) for b in a.batch_events.split(",")),
            events=a.events,
        ),
        summary=_launches_summary,
    ),
    "heap": Bench(
        help="a training step under each allocator setting (glibc, trimmed, arenas, fixed "
        "mmap threshold, huge pages, jemalloc; fresh process each): time, private memory, pages faulted in, peak RSS",
        run="raysvc.bench.heap:run_heap_bench",
        options=(
            _opt("--task", choices=["panda", "segmentation"], default="panda"),
            *_ints(events=40, steps=40, batch_events=4, threads=1),
            _opt(
                "--variants",
                nargs="+",
                help="a subset (glibc, the baseline, always runs): glibc trim-1 trim-10 arena-2 mmap-256k mmap-4m "
                "glibc-thp trim-1-thp jemalloc jemalloc-bg jemalloc-bg-30s jemalloc-keep; trim-K for any K trims "
                "every K steps",
            ),
            *_json_opts("also write the JSON here (with --json)"),
        ),
        kwargs=("task", "events", "steps", "batch=batch_events", "threads", "only=variants"),
        summary=_heap_summary,
    ),
    "serve": Bench(
        help="the endpoint under HTTP load: p50/p99, throughput, batching on vs off, "
        "overhead over an in-process forward",
        run="raysvc.bench.serve:run_serve_bench",
        options=(
            *_json_opts("also write the JSON here"),
            _opt("--requests", type=int, default=200, help="requests per concurrency level"),
            _opt("--concurrency", type=int, nargs="+", default=[1, 8, 16]),
            _opt("--events", type=int, default=16, help="distinct events the requests cycle over"),
            _opt("--max-points", type=int, default=4000, help="points per event (cut)"),
            _opt("--threads", type=int, default=1, help="torch threads, in process and in the replica"),
            _opt("--model", help="exported model directory (default: a seeded tiny model)"),
            _opt(
                "--kill-replica",
                action="store_true",
                help="also SIGKILL the replica under load and report "
                "the error budget (failed requests, time until Serve answers again)",
            ),
        ),
        kwargs=("requests_n=requests", "concurrency", "events", "max_points", "threads", "model", "kill_replica"),
        summary=_serve_summary,
    ),
}


def run_function(bench: Bench) -> Callable[..., dict]:
    module, _, name = bench.run.partition(":")
    return getattr(importlib.import_module(module), name)


def run_keywords(bench: Bench, a: argparse.Namespace) -> dict:
    """Everything the run function is called with: the settings parsed from the command line (the only place their
    defaults stand) and the progress callback."""
    kwargs = bench.kwargs(a) if callable(bench.kwargs) else keywords(a, bench.kwargs)
    return kwargs | ({bench.progress: log} if bench.progress else {})


def cmd_bench(a: argparse.Namespace) -> None:
    bench = BENCHES[a.bench_command]
    result = run_function(bench)(**run_keywords(bench, a))
    if bench.extend:
        bench.extend(a, result)
    if a.json:
        print_json(result, a.out)
    else:
        bench.summary(result)
    if not bench.passed(result):
        raise SystemExit(1)


def add_parser(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="benchmarks that print ratios against a baseline from the same run")
    bsub = bench.add_subparsers(dest="bench_command", required=True)
    for name, spec in BENCHES.items():
        p = bsub.add_parser(name, help=spec.help)
        for flag, kw in spec.options:
            p.add_argument(flag, **kw)
        p.set_defaults(fn=cmd_bench)
