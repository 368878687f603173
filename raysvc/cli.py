"""`raysvc` command line: data | bench | pretrain | finetune | sweep | evaluate | compare | predict | serve | demo."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

from raysvc.config import ConfigError, load_config


def _print_json(obj: dict, path: str | None = None) -> None:
    text = json.dumps(obj, indent=2)
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            f.write(text + "\n")
    print(text)


def cmd_generate(a: argparse.Namespace) -> None:
    from raysvc.data.sources.synthetic import generate_dataset, generator_for
    from raysvc.storage import resolve

    cfg = load_config(generator_for(a.detector)[0], a.config, a.set)
    m = generate_dataset(resolve(a.out), a.events, a.seed, a.shard_events, cfg, workers=a.workers, detector=a.detector)
    print(f"wrote {m.events} events ({m.points} points) in {len(m.shards)} shards to {a.out}")


def cmd_convert(a: argparse.Namespace) -> None:
    from raysvc.data.sources.pilarnet import convert
    from raysvc.storage import resolve

    m = convert(a.pattern, resolve(a.out), a.shard_events, a.revision)
    print(f"converted {m.events} events ({m.points} points) into {len(m.shards)} shards at {a.out}")


def cmd_convert_wand(a: argparse.Namespace) -> None:
    from raysvc.data.sources.wand import convert
    from raysvc.storage import resolve

    m = convert(a.pattern, resolve(a.out), a.shard_events)
    skipped = {k: v for k, v in m.created_by.get("skipped", {}).items() if v}
    print(f"converted {m.events} events ({m.points} hit PMTs) into {len(m.shards)} shards at {a.out}")
    if skipped:
        print("skipped / relabelled: " + ", ".join(f"{k} {v}" for k, v in skipped.items()))


def cmd_inspect(a: argparse.Namespace) -> None:
    from raysvc.data.tools.stats import inspect_dataset
    from raysvc.storage import resolve

    stats = inspect_dataset(resolve(a.uri), verify=not a.no_verify)
    if a.json:
        _print_json(stats)
        return
    print(f"{stats['uri']}: {stats['events']} events, {stats['points']} points, {stats['shards']} shards")
    ppe = stats["points_per_event"]
    print(f"points/event: median {ppe['median']:.0f}, mean {ppe['mean']:.0f}, p5 {ppe['p5']:.0f}, p95 {ppe['p95']:.0f}")
    ref, ref_name = stats["reference"].get("class_fractions", {}), stats["reference"].get("name", "")
    for name, frac in stats["class_fractions"].items():
        published = f"   ({ref_name} {100 * ref[name]:.2f} %)" if name in ref else ""
        print(f"  {name:8s} {100 * frac:6.2f} %{published}")
    for k in ("interactions_per_event", "particles_per_event"):
        print(f"{k}: {stats[k].get('mean', 0):.2f} +- {stats[k].get('std', 0):.2f}")
    if stats.get("rings_per_event"):
        print("rings/event: " + ", ".join(f"{k}: {v}" for k, v in stats["rings_per_event"].items()))


def cmd_show(a: argparse.Namespace) -> None:
    from raysvc.data.tools.display import show_event, show_instances
    from raysvc.storage import resolve

    if a.predictions:
        print(show_instances(resolve(a.uri), resolve(a.predictions), a.event, a.out))
    else:
        print(show_event(resolve(a.uri), a.event, a.out))


def cmd_verify(a: argparse.Namespace) -> None:
    from raysvc.data.tools.verify import verify_dataset
    from raysvc.storage import resolve

    result = verify_dataset(resolve(a.uri))
    _print_json(result)
    if result["bad_events"]:
        sys.exit(1)


def cmd_subset(a: argparse.Namespace) -> None:
    from raysvc.data.streaming.subset import write_subsets
    from raysvc.storage import absolute_uri, resolve

    src, dst = resolve(absolute_uri(a.uri)), resolve(absolute_uri(a.out))
    m = write_subsets(src, {a.events: dst}, a.seed, a.shards)[a.events]
    print(f"{a.out}: {m.events} events of {a.uri} (subset seed {a.seed}) in {len(m.shards)} shards")


def cmd_bench_ingest(a: argparse.Namespace) -> None:
    from raysvc.bench.ingest import run_ingest_bench

    result = run_ingest_bench(
        events=a.events, uri=a.uri, batch_events=a.batch_events, repeats=a.repeats, shard_events=a.shard_events
    )
    if a.loaders:
        from raysvc.bench.loaders import run_loader_bench

        result["loaders"] = run_loader_bench(
            events=a.loader_events,
            steps=a.steps,
            parts=tuple(a.loader_parts.split(",")),
            log=lambda m: print(m, file=sys.stderr, flush=True),
        )
    if a.json:
        _print_json(result, a.out)
    else:
        print(
            f"ray data {result['ray_data_events_per_s']:.1f} ev/s, direct {result['direct_events_per_s']:.1f} "
            f"ev/s, ratio {result['ratio']:.2f}"
        )


def cmd_bench_ops(a: argparse.Namespace) -> None:
    from raysvc.bench.ops import run_ops_bench

    result = run_ops_bench(
        events=a.events,
        seed=a.seed,
        radius=a.radius,
        overlap=a.overlap,
        repeats=a.repeats,
        progress=lambda m: print(m, file=sys.stderr),
    )
    if a.json:
        _print_json(result, a.out)
        return
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


def cmd_bench_train(a: argparse.Namespace) -> None:
    from raysvc.bench.train import run_train_bench

    result = run_train_bench(
        events=a.events, steps=a.steps, batch=a.batch_events, threads=a.threads, log=lambda m: print(m, file=sys.stderr)
    )
    if a.json:
        _print_json(result, a.out)
        return
    for size in ("tiny", "small"):
        print(f"{size}: {result[f'{size}_fwd_bwd_s_per_event'] * 1e3:.0f} ms/event forward+backward")
    print(
        f"step: plain torch {result['plain_step_s'] * 1e3:.0f} ms, Ray Train {result['ray_train_step_s'] * 1e3:.0f}"
        f" ms, overhead {100 * result['ray_train_overhead']:+.1f} %"
    )


def cmd_bench_gpu(a: argparse.Namespace) -> None:
    from raysvc.bench.gpu import run_gpu_bench

    result = run_gpu_bench(
        a.device,
        events=a.events,
        steps=a.steps,
        batch=a.batch_events,
        log=lambda m: print(m, file=sys.stderr),
        profile=a.profile,
    )
    if a.json:
        _print_json(result, a.out)
    else:
        for name, ok in result["checks"].items():
            print(f"{'ok  ' if ok else 'FAIL'} {name}")
        for key in ("seg_tiny", "seg_small", "panda_tiny"):
            r = result.get(key, {})
            times = ", ".join(f"{k[:-7]} {v * 1e3:.0f} ms" for k, v in r.items() if k.endswith("_step_s"))
            ratios = ", ".join(f"{k[:-15]} x{v:.1f}" for k, v in r.items() if k.endswith("_speedup_vs_cpu"))
            print(f"{key} step ({r.get('events_per_step')} events): {times}" + (f"; vs CPU {ratios}" if ratios else ""))
    if not result["all_passed"]:
        raise SystemExit(1)


def cmd_bench_heap(a: argparse.Namespace) -> None:
    from raysvc.bench.heap import run_heap_bench

    result = run_heap_bench(
        task=a.task,
        events=a.events,
        steps=a.steps,
        batch=a.batch_events,
        threads=a.threads,
        only=tuple(a.variants) if a.variants else None,
        log=lambda m: print(m, file=sys.stderr),
    )
    if a.json:
        _print_json(result, a.out)
        return
    for k, v in result["variants"].items():
        print(
            f"{k:>10}: {v['step_s'] * 1e3:5.0f} ms/step (x{v['step_time_vs_glibc']:.2f}), private memory max "
            f"{v['private_mb_max']:5.0f} MB (x{v['private_mb_max_vs_glibc']:.2f}), peak RSS {v['peak_rss_mb']:5.0f} "
            f"MB (x{v['peak_rss_vs_glibc']:.2f}), same losses: {v['same_losses_as_glibc']}"
        )


def cmd_bench_serve(a: argparse.Namespace) -> None:
    from raysvc.bench.serve import run_serve_bench

    result = run_serve_bench(
        requests_n=a.requests,
        concurrency=a.concurrency,
        events=a.events,
        max_points=a.max_points,
        threads=a.threads,
        model=a.model,
        log=lambda m: print(m, file=sys.stderr),
        kill_replica=a.kill_replica,
    )
    if a.json:
        _print_json(result, a.out)
        return
    split = ", ".join(f"{k} {v:+.1f}" for k, v in result["overhead_split_ms"].items())
    print(
        f"overhead over in-process forward: {result['overhead_p50_ms']:+.1f} ms (p50: {split}); batching "
        f"throughput ratio {result['batching_throughput_ratio']}; errors {result['errors']}"
    )


def _run_job(a: argparse.Namespace, default_task: str) -> None:
    """Load the job YAML (its `task:` key names the task; `default_task` otherwise), run it, print the outcome."""
    from raysvc.train.driver import load_job, run_job

    summary = run_job(load_job(a.config, a.set, default_task))
    out = {"run": summary["uri"], "steps": summary["steps"]}
    if "val" in summary:
        val = summary["val"] or {}
        sem = val.get("semantic", val)  # a panoptic run nests its semantic metrics
        out |= {"val_miou": sem.get("miou"), "val_iou": sem.get("iou")}
        for task in ("particle", "interaction"):  # a panoptic run's instance tasks
            if task in val:
                out |= {f"val_{task}_pq": val[task]["pq"], f"val_{task}_ari": val[task]["ari"]}
    probe = summary.get("probe") or {}
    if "token_mean_f1" in probe:  # PoLAr-MAE's token probe
        out |= {
            "probe_token_mean_f1": probe["token_mean_f1"],
            "probe_random_token_mean_f1": probe.get("random_token_mean_f1"),
            "probe_token_f1": probe.get("token_f1"),
            "tokens": summary.get("tokens"),
        }
    elif "exports" in summary:  # cross-experiment pretraining: one backbone and probe per detector
        out |= {"exports": summary["exports"], "batching": summary.get("batching")}
        for name, p in probe.items():
            if p:
                out |= {
                    f"probe_{name}_pretrained_miou": p["pretrained_miou"],
                    f"probe_{name}_random_miou": p["random_miou"],
                }
    elif "probe" in summary:
        out |= {
            "probe_pretrained_miou": probe.get("pretrained_miou"),
            "probe_random_miou": probe.get("random_miou"),
            "monitor": summary.get("last_monitor"),
        }
    print(json.dumps(out, indent=2))


def cmd_finetune(a: argparse.Namespace) -> None:
    _run_job(a, "segmentation")


def cmd_pretrain(a: argparse.Namespace) -> None:
    _run_job(a, "panda")


def cmd_sweep(a: argparse.Namespace) -> None:
    from raysvc.sweep import run_sweep
    from raysvc.sweep.spec import load_spec

    summary = run_sweep(load_spec(a.spec, a.set))
    print(summary["table_md"], end="")
    rep = summary.get("representation") or {"trials": [], "failed": []}  # the C-NMS sweep's token-probe runs
    trials, failed = [*summary["trials"], *rep["trials"]], [*summary["failed"], *rep["failed"]]
    print(
        json.dumps(
            {
                "sweep": summary["uri"],
                "trials": len(trials),
                "failed": [{"trial": f["trial"]["name"], "error": f["error"]} for f in failed],
                "wall_s": round(summary["wall_s"], 1),
            },
            indent=2,
        )
    )
    if failed:
        print(
            f"raysvc: {len(failed)} of {len(failed) + len(trials)} trials failed "
            f"(errors in {summary['uri']}/summary.json)",
            file=sys.stderr,
        )
        _release_s3()
        sys.exit(1)


def _batch_ray(actors: int) -> None:
    """Start (or join) Ray for a batch-inference command that runs an actor pool; its chatter goes to the log."""
    if actors > 0:
        import ray

        from raysvc.ray_init import init_ray

        if not ray.is_initialized():
            init_ray(logging_level="WARNING", include_dashboard=False)


def cmd_evaluate(a: argparse.Namespace) -> None:
    from raysvc.inference.batch import evaluate_dataset
    from raysvc.storage import absolute_uri, resolve

    _batch_ray(a.actors)
    result = evaluate_dataset(
        resolve(absolute_uri(a.model)),
        resolve(absolute_uri(a.data)),
        a.batch_events,
        a.device,
        max_events=a.max_events,
        actors=a.actors,
        max_points=a.max_points,
        cpus_per_actor=a.cpus_per_actor,
        log=lambda m: print(m, file=sys.stderr),
    )
    _print_json(result, a.out)


def cmd_probe(a: argparse.Namespace) -> None:
    from raysvc.data.streaming.config import DataConfig
    from raysvc.storage import absolute_uri
    from raysvc.train.backbone_probe import probe_backbone
    from raysvc.train.probe import ProbeConfig
    from raysvc.train.token_probe import TokenProbeConfig

    if (a.init is None) == (a.random is None):
        sys.exit("raysvc probe: give an export directory or --random ARCH (the baseline), not both or neither")
    _batch_ray(1)  # the probe's events are read by Ray tasks or Ray Data either way
    events = {"train_events": a.train_events, "val_events": a.val_events}
    result = probe_backbone(
        absolute_uri(a.init) if a.init else None,
        DataConfig(uri=absolute_uri(a.data)),
        arch=a.random or "ptv3",
        size=a.size,
        point=ProbeConfig(**events),
        token=TokenProbeConfig(**events),
        radius_voxels=a.radius_voxels,
        seed=a.seed,
        center_events=a.center_events,
        actors=a.actors,
        cpus_per_actor=a.cpus_per_actor,
        log=lambda m: print(m, file=sys.stderr),
    )
    _print_json(result, a.out)


def cmd_compare(a: argparse.Namespace) -> None:
    from raysvc.compare import compare, format_table, load_arms, plot

    arms: dict[str, list[str]] = {}
    for spec in a.arm:
        name, sep, paths = spec.partition("=")
        if not sep or not name or name in arms:
            raise ValueError(f"--arm {spec!r}: expected a new NAME=EVAL.json[,EVAL.json ...]")
        arms[name] = [q for q in paths.split(",") if q]
    result = compare(load_arms(arms))
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "compare.json"), "w") as f:
        json.dump(result, f, indent=2)
    plot(result, os.path.join(a.out, "compare.png"))
    print(format_table(result))
    print(f"wrote {a.out}/compare.json and compare.png")


def cmd_predict(a: argparse.Namespace) -> None:
    from raysvc.inference.batch import predict_dataset
    from raysvc.storage import absolute_uri, resolve

    _batch_ray(a.actors)
    info = predict_dataset(
        resolve(absolute_uri(a.model)),
        resolve(absolute_uri(a.data)),
        resolve(absolute_uri(a.out)),
        a.batch_events,
        a.device,
        actors=a.actors,
        max_points=a.max_points,
        cpus_per_actor=a.cpus_per_actor,
        log=lambda m: print(m, file=sys.stderr),
    )
    print(json.dumps({k: v for k, v in info.items() if k != "shards"}, indent=2))


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def cmd_serve(a: argparse.Namespace) -> None:
    import signal
    import time

    from raysvc.inference.record import load_export
    from raysvc.ray_init import init_ray
    from raysvc.serve.app import FAST_PATH_ENV, HOW_TO_SET_TOKEN, ServeConfig, build_app, read_token
    from raysvc.storage import absolute_uri, resolve

    models = {}
    for item in ([a.checkpoint] if a.checkpoint else []) + (a.model or []):
        mid, _, uri = item.partition("=") if "=" in item else (None, "", item)  # ids have no "="; URIs may
        uri = absolute_uri(uri)
        mid = mid or uri.rstrip("/").rsplit("/", 1)[-1]
        if mid in models:
            raise ValueError(f"model id {mid!r} given twice; name them: --model ID=URI")
        load_export(resolve(uri))  # fails here, naming the directory, rather than in a replica
        models[mid] = uri
    batching = {
        k: v
        for k, v in (
            ("max_batch_size", a.max_batch_points),
            ("batch_wait_timeout_s", None if a.batch_wait_ms is None else a.batch_wait_ms / 1e3),
            ("body_timeout_s", a.body_timeout_s),
            ("max_body_bytes", a.max_body_bytes),
            ("max_ongoing_requests", a.max_ongoing_requests),
            ("max_queued_requests", a.max_queued_requests),
        )
        if v is not None
    }
    cfg = ServeConfig(
        models=models,
        auth=not a.no_auth,
        batching=not a.no_batching,
        replicas=a.replicas,
        cpus_per_replica=a.cpus_per_replica,
        torch_threads=a.torch_threads,
        **batching,
    )
    if cfg.auth and not read_token():
        raise ValueError(
            f"raysvc serve requires a bearer token: {HOW_TO_SET_TOKEN} (or --no-auth, for a trusted loopback-only test)"
        )
    if a.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"raysvc: warning: binding {a.host}, beyond loopback (auth {'on' if cfg.auth else 'OFF'})", file=sys.stderr
        )
    from ray import serve

    for key, value in FAST_PATH_ENV.items():  # for the Ray started here; one already running keeps its own
        os.environ.setdefault(key, value)
    init_ray(logging_level="WARNING", include_dashboard=False)
    signal.signal(signal.SIGTERM, _interrupt)  # stop like Ctrl-C: Serve and Ray shut down cleanly
    try:
        serve.start(http_options={"host": a.host, "port": a.port, "request_timeout_s": a.request_timeout_s})
        serve.run(build_app(cfg.model_dump()), name="raysvc", route_prefix="/")
        print(
            json.dumps(
                {
                    "url": f"http://{a.host}:{a.port}",
                    "models": models,
                    "default": cfg.default_model,
                    "auth": cfg.auth,
                    "batching": cfg.batching,
                }
            ),
            flush=True,
        )
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()


def cmd_demo(a: argparse.Namespace) -> None:
    from raysvc.demo import run_demo

    run_demo(
        workdir=a.workdir,
        events=a.events,
        storage=a.storage,
        workers=a.workers,
        pretrain_steps=a.pretrain_steps,
        finetune_steps=a.finetune_steps,
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raysvc", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="generate, convert, inspect, show and verify event datasets")
    dsub = data.add_subparsers(dest="data_command", required=True)
    g = dsub.add_parser("generate", help="synthetic LArTPC or water Cherenkov events -> shards")
    g.add_argument("--detector", default="lartpc", choices=["lartpc", "wch"], help="which detector's events")
    g.add_argument("--events", type=int, required=True)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--out", required=True, help="file:///path, a path, or s3://bucket/prefix")
    g.add_argument("--shard-events", type=int, default=500)
    g.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="generator processes")
    g.add_argument("--config", help="YAML with generator settings (GeneratorConfig, or WChGeneratorConfig for wch)")
    g.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a generator setting")
    g.set_defaults(fn=cmd_generate)
    c = dsub.add_parser("convert", help="PILArNet-M HDF5 files -> shards")
    c.add_argument("pattern", help="glob of .h5 files, e.g. 'ROOT/train/*.h5' (quote it)")
    c.add_argument("--out", required=True)
    c.add_argument("--shard-events", type=int, default=500)
    c.add_argument("--revision", default="auto", choices=["auto", "v1", "v2", "v3"])
    c.set_defaults(fn=cmd_convert)
    cw = dsub.add_parser("convert-wand", help="WAND / LUCiD water Cherenkov HDF5 files (sensor, hits, labl) -> shards")
    cw.add_argument("pattern", help="glob of the files, e.g. 'ROOT/**/*.h5' (quote it)")
    cw.add_argument("--out", required=True)
    cw.add_argument("--shard-events", type=int, default=500)
    cw.set_defaults(fn=cmd_convert_wand)
    i = dsub.add_parser("inspect", help="statistics of a dataset vs PILArNet-M")
    i.add_argument("uri")
    i.add_argument("--json", action="store_true")
    i.add_argument("--no-verify", action="store_true", help="skip sha256 checks of shards")
    i.set_defaults(fn=cmd_inspect)
    s = dsub.add_parser("show", help="event display PNG")
    s.add_argument("uri")
    s.add_argument("--event", type=int, required=True, help="event id")
    s.add_argument("--out", required=True)
    s.add_argument("--predictions", help="a panoptic model's `raysvc predict` output: true vs predicted instances")
    s.set_defaults(fn=cmd_show)
    v = dsub.add_parser("verify", help="check every shard (checksum, schema, values); exit 1 if any event is bad")
    v.add_argument("uri")
    v.set_defaults(fn=cmd_verify)
    su = dsub.add_parser(
        "subset",
        help="write the seeded n-event label subset (data.subset_events=n) as its own "
        "dataset, so a few-label run reads n events, not the whole set",
    )
    su.add_argument("uri")
    su.add_argument("--events", type=int, required=True)
    su.add_argument("--seed", type=int, default=0, help="the subset seed (data.subset_seed)")
    su.add_argument("--out", required=True)
    su.add_argument("--shards", type=int, default=2, help="at least this many shards (one per Train worker)")
    su.set_defaults(fn=cmd_subset)

    bench = sub.add_parser("bench", help="benchmarks that print ratios against a baseline from the same run")
    bsub = bench.add_subparsers(dest="bench_command", required=True)
    bi = bsub.add_parser("ingest", help="Ray Data streaming from SeaweedFS vs direct pyarrow reading")
    bi.add_argument("--json", action="store_true")
    bi.add_argument("--out", help="also write the JSON here")
    bi.add_argument("--events", type=int, default=1000)
    bi.add_argument("--shard-events", type=int, default=100)
    bi.add_argument("--uri", help="use this dataset instead of generating one into a local SeaweedFS")
    bi.add_argument("--batch-events", type=int, default=8)
    bi.add_argument("--repeats", type=int, default=3)
    bi.add_argument(
        "--loaders",
        action="store_true",
        help="also compare the training loaders (tasks, ray_data: delivery, a real pretraining's data wait, CPU and "
        "memory), prefetch and block size, and batch inference with 0 / 1 / 2 actors (~35 min on 2 cores)",
    )
    bi.add_argument("--loader-events", type=int, default=1200, help="--loaders: events of the pretraining set")
    bi.add_argument("--steps", type=int, default=40, help="--loaders: pretraining steps per run")
    bi.add_argument(
        "--loader-parts",
        default="delivery,choices,predict,pretrain",
        help="--loaders: which parts to run (delivery, choices: prefetch and block size, predict, pretrain)",
    )
    bi.set_defaults(fn=cmd_bench_ingest)

    bo = bsub.add_parser("ops", help="C-NMS vs FPS grouping, serialization, sparse conv vs spconv (one thread)")
    bo.add_argument("--json", action="store_true")
    bo.add_argument("--out", help="also write the JSON here")
    bo.add_argument("--events", type=int, default=48)
    bo.add_argument("--seed", type=int, default=0)
    bo.add_argument("--radius", type=float, default=5.0, help="group radius in voxels (PoLAr-MAE: 5)")
    bo.add_argument("--overlap", type=float, default=0.73, help="C-NMS overlap factor (PoLAr-MAE: 0.73)")
    bo.add_argument("--repeats", type=int, default=3)
    bo.set_defaults(fn=cmd_bench_ops)

    ft = sub.add_parser("finetune", help="train a segmentation model with Ray Train (locally or under ray job submit)")
    ft.add_argument("config", help="job YAML, e.g. jobs/semseg-tiny.yaml")
    ft.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a field, e.g. train.steps=100")
    ft.set_defaults(fn=cmd_finetune)

    pt = sub.add_parser(
        "pretrain", help="Panda self-supervised pretraining with Ray Train (locally or under ray job submit)"
    )
    pt.add_argument("config", help="job YAML, e.g. jobs/pretrain-panda-tiny.yaml")
    pt.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a field, e.g. train.steps=100")
    pt.set_defaults(fn=cmd_pretrain)

    sw = sub.add_parser(
        "sweep",
        help="a Ray Tune sweep from tune/*.yaml (C-NMS coverage, label efficiency); re-run the same spec to resume it",
    )
    sw.add_argument("spec", help="sweep YAML, e.g. tune/cnms.yaml")
    sw.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a field, e.g. events=20")
    sw.set_defaults(fn=cmd_sweep)

    ev = sub.add_parser("evaluate", help="metrics of an exported model on a labelled dataset (its training cuts)")
    ev.add_argument("--model", required=True, help="exported model directory (raysvc finetune's run)")
    ev.add_argument("--data", required=True, help="labelled dataset URI")
    ev.add_argument("--batch-events", type=int, default=4)
    ev.add_argument("--max-events", type=int, help="score only the first N events (in shard order)")
    ev.add_argument("--out", help="also write the JSON here")
    ev.add_argument("--device", default="cpu", help="torch device, e.g. cuda or cuda:1")
    _batch_args(ev)
    ev.set_defaults(fn=cmd_evaluate)
    pb = sub.add_parser(
        "probe",
        help="a backbone's per-point linear probe and token probe on held-out labelled events (any method)",
    )
    pb.add_argument("init", nargs="?", help="exported backbone or segmenter directory (raysvc pretrain's run)")
    pb.add_argument("--random", metavar="ARCH", help="probe a random initialisation of ARCH instead (ptv3, polarmae)")
    pb.add_argument("--size", default="tiny", help="preset of --random")
    pb.add_argument("--center-events", action="store_true", help="--random: centre each event (as Panda's views)")
    pb.add_argument("--data", required=True, help="labelled dataset URI (the first train + val events are used)")
    pb.add_argument("--train-events", type=int, default=100)
    pb.add_argument("--val-events", type=int, default=100)
    pb.add_argument("--radius-voxels", type=float, default=5.0, help="C-NMS radius of a PTv3 backbone's tokens")
    pb.add_argument("--seed", type=int, default=0)
    pb.add_argument("--actors", type=int, default=1, help="backbone replicas in a Ray Data actor pool (0: in process)")
    pb.add_argument("--cpus-per-actor", type=float, default=1.0, help="Ray CPUs (and torch threads) of each actor")
    pb.add_argument("--out", help="also write the JSON here")
    pb.set_defaults(fn=cmd_probe)
    cp = sub.add_parser(
        "compare",
        help="training arms across seeds from `raysvc evaluate` JSONs: mean / sd, each arm "
        "vs the first (Welch t-test, 95 %% interval), a PNG",
    )
    cp.add_argument(
        "--arm",
        action="append",
        required=True,
        metavar="NAME=EVAL.json[,EVAL.json ...]",
        help="one arm, one evaluate JSON per training seed; the first --arm is the baseline",
    )
    cp.add_argument("--out", required=True, help="directory for compare.json and compare.png")
    cp.set_defaults(fn=cmd_compare)
    pr = sub.add_parser("predict", help="per-point predictions of an exported model on a dataset")
    pr.add_argument("--model", required=True, help="exported model directory (model.safetensors + config.json)")
    pr.add_argument("--data", required=True, help="dataset URI (shards + manifest)")
    pr.add_argument(
        "--out", required=True, help="output URI: preds-NNNNN.parquet (event_id, num_points, pred) + manifest.json"
    )
    pr.add_argument("--batch-events", type=int, default=8)
    pr.add_argument("--device", default="cpu", help="torch device, e.g. cuda or cuda:1")
    _batch_args(pr)
    pr.set_defaults(fn=cmd_predict)

    bt = bsub.add_parser("train", help="fwd+bwd per event (tiny, small) and Ray Train step overhead vs plain torch")
    bt.add_argument("--json", action="store_true")
    bt.add_argument("--out", help="also write the JSON here")
    bt.add_argument("--events", type=int, default=40)
    bt.add_argument("--steps", type=int, default=12)
    bt.add_argument("--batch-events", type=int, default=2)
    bt.add_argument("--threads", type=int, default=1)
    bt.set_defaults(fn=cmd_bench_train)

    bg = bsub.add_parser(
        "gpu",
        help="the CUDA path against references (sparse conv vs dense conv3d, kNN / codes / "
        "attention / model vs CPU, bf16 vs fp32) and training steps timed against this machine's CPU",
    )
    bg.add_argument("--device", default="cuda")
    bg.add_argument("--events", type=int, default=24)
    bg.add_argument("--steps", type=int, default=10, help="timed steps per variant on the device (CPU: a quarter)")
    bg.add_argument("--batch-events", type=int, default=4)
    bg.add_argument("--profile", action="store_true", help="also profile one bf16 segmentation step per size (CUDA)")
    bg.add_argument("--json", action="store_true")
    bg.add_argument("--out", help="also write the JSON here (with --json)")
    bg.set_defaults(fn=cmd_bench_gpu)

    bh = bsub.add_parser(
        "heap",
        help="a training step under each allocator setting (glibc, trimmed, arenas, fixed "
        "mmap threshold, jemalloc; fresh process each): time, private memory, peak RSS",
    )
    bh.add_argument("--task", choices=["panda", "segmentation"], default="panda")
    bh.add_argument("--events", type=int, default=40)
    bh.add_argument("--steps", type=int, default=40)
    bh.add_argument("--batch-events", type=int, default=4)
    bh.add_argument("--threads", type=int, default=1)
    bh.add_argument(
        "--variants",
        nargs="+",
        help="a subset (glibc, the baseline, always runs): glibc trim-1 trim-10 arena-2 mmap-256k jemalloc "
        "jemalloc-bg; trim-K for any K trims every K steps",
    )
    bh.add_argument("--json", action="store_true")
    bh.add_argument("--out", help="also write the JSON here (with --json)")
    bh.set_defaults(fn=cmd_bench_heap)
    sv = sub.add_parser(
        "serve",
        help="the segmentation endpoint (Ray Serve, FastAPI) over exported fine-tuned "
        "models; bearer token from RAYSVC_SERVE_TOKEN or RAYSVC_SERVE_TOKEN_FILE",
    )
    sv.add_argument("--checkpoint", help="exported model directory (file:// or s3://); its id is its last path part")
    sv.add_argument(
        "--model",
        action="append",
        metavar="ID=URI",
        help="another model behind the endpoint (chosen with the X-Model-Id header)",
    )
    sv.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--replicas", type=int, default=1)
    sv.add_argument("--cpus-per-replica", type=float, default=1.0)
    sv.add_argument("--torch-threads", type=int, default=None)
    sv.add_argument("--no-batching", action="store_true", help="one forward per request")
    sv.add_argument(
        "--max-batch-points",
        type=int,
        help="points per batch (default 200,000; at least the largest event the endpoint takes)",
    )
    sv.add_argument(
        "--batch-wait-ms",
        type=float,
        help="how long a batch waits to fill (default 0: batches form "
        "from the requests queued during the previous forward)",
    )
    sv.add_argument("--no-auth", action="store_true", help="no bearer token (trusted loopback tests only)")
    sv.add_argument("--max-body-bytes", type=int, help="bytes per request body (default 16 MiB)")
    sv.add_argument("--body-timeout-s", type=float, help="time to receive a body before 408 (default 10)")
    sv.add_argument("--max-ongoing-requests", type=int, help="requests in flight per replica (default 32)")
    sv.add_argument("--max-queued-requests", type=int, help="requests queued at the proxy before 503 (default 64)")
    sv.add_argument(
        "--request-timeout-s", type=float, default=60.0, help="end-to-end limit at the proxy, 408 after it (default 60)"
    )
    sv.set_defaults(fn=cmd_serve)

    bs = bsub.add_parser(
        "serve",
        help="the endpoint under HTTP load: p50/p99, throughput, batching on vs off, "
        "overhead over an in-process forward",
    )
    bs.add_argument("--json", action="store_true")
    bs.add_argument("--out", help="also write the JSON here")
    bs.add_argument("--requests", type=int, default=200, help="requests per concurrency level")
    bs.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 16])
    bs.add_argument("--events", type=int, default=16, help="distinct events the requests cycle over")
    bs.add_argument("--max-points", type=int, default=4000, help="points per event (cut)")
    bs.add_argument("--threads", type=int, default=1, help="torch threads, in process and in the replica")
    bs.add_argument("--model", help="exported model directory (default: a seeded tiny model)")
    bs.add_argument(
        "--kill-replica",
        action="store_true",
        help="also SIGKILL the replica under load and report "
        "the error budget (failed requests, time until Serve answers again)",
    )
    bs.set_defaults(fn=cmd_bench_serve)

    d = sub.add_parser("demo", help="the main job end to end on embedded defaults")
    d.add_argument("--workdir", default="runs/demo")
    d.add_argument("--events", type=int, default=2000)
    d.add_argument("--storage", choices=["seaweedfs", "file"], default="seaweedfs")
    d.add_argument("--workers", type=int, default=2, help="Ray Train workers of the ingest check")
    d.add_argument("--pretrain-steps", type=int, default=150, help="tiny Panda pretraining steps (0: skip)")
    d.add_argument(
        "--finetune-steps",
        type=int,
        default=100,
        help="fine-tuning steps of the pretrained backbone on 100 labelled events, then serving it (0: skip both)",
    )
    d.set_defaults(fn=cmd_demo)
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


def _batch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--actors",
        type=int,
        default=1,
        help="model replicas of the Ray Data job (one GPU each with --device cuda); 0: in this process, no Ray",
    )
    p.add_argument("--max-points", type=int, default=400_000, help="at most this many points per model call")
    p.add_argument("--cpus-per-actor", type=float, default=1.0, help="Ray CPUs (and torch threads) of each actor")


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
}


def _command(args: argparse.Namespace) -> tuple[str, ...]:
    return tuple(x for x in (args.command, getattr(args, "bench_command", None)) if x)


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
    args = build_parser().parse_args(argv)
    from raysvc.data.contract.schema import EventDataError
    from raysvc.storage import StorageError

    try:
        with contextlib.ExitStack() as stack:
            if _command(args) in ROUTED:
                from raysvc.console import routed

                log = stack.enter_context(routed(_console_log(args), args.verbose))
                print(
                    f"[raysvc] Ray's own output: {log}" + ("" if args.verbose else " (--verbose shows it here)"),
                    file=sys.stderr,
                )
            args.fn(args)
    except (ConfigError, EventDataError, StorageError, FileNotFoundError, ValueError) as e:
        print(f"raysvc: error: {e}", file=sys.stderr)
        _release_s3()
        sys.exit(2)
    except Exception as e:
        verdict = _training_failure(e)
        if verdict is None:
            raise
        print(f"raysvc: error: {verdict}", file=sys.stderr)
        _release_s3()
        sys.exit(1)
    _release_s3()


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


def _release_s3() -> None:
    """Shut the AWS SDK down before interpreter exit. Left to static destructors, it aborted a `data inspect` of an
    s3:// dataset once ("terminate called without an active exception", exit -6) after printing its result
    (apache/arrow#41087, #36346: S3 must be finalised after the last S3FileSystem is gone)."""
    if "pyarrow.fs" not in sys.modules:
        return
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        return  # Ray's driver may still hold filesystems (run storage); it shuts down at exit itself
    import gc

    import pyarrow.fs

    gc.collect()  # the filesystems of finished commands
    pyarrow.fs.finalize_s3()


if __name__ == "__main__":
    main()
