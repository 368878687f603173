"""`raysvc demo`: the main job end to end on embedded defaults.

Start a local SeaweedFS (or use file://), generate synthetic events into Parquet shards on it, check their statistics
against PILArNet-M, stream them back through Ray Data into Ray Train workers (DDP over gloo) that count every event,
then pretrain the tiny PTv3 with Panda on those events (streamed from S3) and compare the linear probe on its frozen
features with the same probe on the random initialisation, on held-out labelled events. Then fine-tune the pretrained
backbone on 100 labelled events, serve the result over HTTP (`raysvc serve`, bearer token, 127.0.0.1) and check the
endpoint's answers on the held-out events against the same model in process. Writes summary.json + plots.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from raysvc.data.contract.detectors import get_detector  # noqa: E402
from raysvc.ray_init import init_ray


def _stage(msg: str) -> None:
    print(f"\n==> {msg}", flush=True)


class _Stages:
    """The demo's stages, each announced on the console and timed: summary.json's "stages_s" says where a run's
    time went."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._open: tuple[str, float] | None = None

    def __call__(self, key: str, msg: str) -> None:
        self.close()
        _stage(msg)
        self._open = (key, time.perf_counter())

    def close(self) -> None:
        if self._open is not None:
            key, t0 = self._open
            self.seconds[key] = round(time.perf_counter() - t0, 1)
            self._open = None


def _plot(stats: dict, ingest: dict, out: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    class_names = get_detector(stats["detector"]).class_names
    ours = [stats["class_fractions"][c] * 100 for c in class_names]
    ref = [stats["reference_pilarnet_m"]["class_fractions"][c] * 100 for c in class_names]
    x = np.arange(len(class_names))
    axes[0].bar(x - 0.2, ours, 0.4, label="generated")
    axes[0].bar(x + 0.2, ref, 0.4, label="PILArNet-M")
    axes[0].set_xticks(x, class_names)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("% of points")
    axes[0].set_title("semantic class fractions")
    axes[0].legend()
    ppe = stats["points_per_event"]
    axes[1].bar(["p5", "median", "mean", "p95"], [ppe["p5"], ppe["median"], ppe["mean"], ppe["p95"]])
    axes[1].axhspan(2000, 30000, color="green", alpha=0.1, label="PILArNet-M range (after cuts)")
    axes[1].set_ylabel("points per event")
    axes[1].set_title(f"{stats['events']} events, {stats['points']:,} points")
    axes[1].legend()
    workers = ingest["workers"]
    axes[2].bar([f"rank {w['rank']}" for w in workers], [w["events"] for w in workers])
    axes[2].set_ylabel("events streamed")
    axes[2].set_title(f"Ray Data -> {len(workers)} Train workers: {ingest['events']} events, each once")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _fresh(run_dir: Path) -> None:
    """The demo measures a new run each time: a run of the same name would otherwise be resumed (or, finished,
    reported again) from an earlier demo, whatever the job files say now."""
    if run_dir.exists():
        print(f"    removing the previous demo's run {run_dir}")
        shutil.rmtree(run_dir)


def _job(name: str) -> Path:
    """A job spec of the checkout the demo runs from (the demo runs the same jobs a user would)."""
    job = Path(__file__).resolve().parents[2] / "jobs" / name
    if not job.exists():
        raise FileNotFoundError(f"{job}: the demo runs this job spec; run the demo from a raysvc checkout")
    return job


def _pretrain(uri: str, heldout: str, work: Path, steps: int, probe_events: int) -> dict:
    """Tiny Panda on the demo events, probe at step 0 (random init), mid-way and at the end."""
    from raysvc.config import load_config
    from raysvc.train.driver import run_job
    from raysvc.train.tasks.panda import PretrainConfig

    sets = [
        f"data.uri={uri}",
        f"probe_data.uri={heldout}",
        f"run.storage={work}",
        f"run.name=pretrain-{steps}",
        f"train.steps={steps}",
        f"train.checkpoint_every={steps}",
        f"probe.every={max(steps // 2, 1)}",
        f"probe.train_events={probe_events}",
        f"probe.val_events={probe_events}",
        "train.log_every=25",
        "train.monitor_every=25",
        # the job file's lr, views and momentum are set for 880 steps; over 150 these gained more (README)
        "train.lr=0.002",
        "views.local_views=6",
        "panda.momentum=[0.994, 1.0]",
    ]
    job = _job("pretrain-panda-tiny.yaml")  # before anything is removed
    _fresh(work / f"pretrain-{steps}")
    return run_job(load_config(PretrainConfig, job, sets))


def _finetune(uri: str, heldout: str, backbone: str, work: Path, steps: int, label_events: int) -> dict:
    """fft of the pretrained backbone on `label_events` labelled events of the dataset (a seeded subset), validated
    on the held-out events: the few-label fine-tuning the pretraining is for."""
    from raysvc.config import load_config
    from raysvc.train.driver import run_job
    from raysvc.train.tasks.segmentation import FinetuneConfig

    sets = [
        f"data.uri={uri}",
        f"data.subset_events={label_events}",
        f"val_data.uri={heldout}",
        f"model.init={backbone}",
        "model.mode=fft",
        f"run.storage={work}",
        f"run.name=finetune-{steps}",
        f"train.steps={steps}",
        f"train.val_every={steps}",
        "train.val_events=80",
        f"train.checkpoint_every={steps}",
        f"train.log_every={max(steps // 4, 1)}",
    ]
    job = _job("semseg-tiny.yaml")  # before anything is removed
    _fresh(work / f"finetune-{steps}")
    return run_job(load_config(FinetuneConfig, job, sets))


def _serve_check(model_dir: str, heldout: str, work: Path, events: int = 20, meanwhile=lambda: None) -> tuple:
    """`raysvc serve` on the fine-tuned model (127.0.0.1, a fresh bearer token); the held-out events over HTTP as
    JSON, one at a time; their answers compared with the same model run in process, and scored against the
    labels. The in-process answers and `meanwhile()` are worked out while the server starts (it is mostly idle
    then: Ray and Serve coming up). Returns (the check's figures, what `meanwhile()` returned)."""
    import secrets

    import requests
    import torch

    from raysvc.data.contract.schema import flat_coords, flat_values
    from raysvc.data.streaming.shards import load_manifest, read_shard
    from raysvc.inference.metrics import ConfusionMatrix, compute
    from raysvc.inference.segmenter import Segmenter
    from raysvc.seaweed import free_port
    from raysvc.serve.process import ServeProcess
    from raysvc.storage import resolve

    root = resolve(heldout)
    manifest = load_manifest(root)
    class_names = manifest.detector_spec.class_names
    table = read_shard(root, manifest.shards[0]).slice(0, events)
    lengths = table.column("num_points").to_numpy()
    xyz, energy, labels = flat_coords(table), flat_values(table, "energy"), flat_values(table, "semantic")
    splits = np.cumsum(lengths)[:-1]
    evs = list(zip(np.split(xyz.astype(np.float32), splits), np.split(energy.astype(np.float32), splits), strict=True))
    token = secrets.token_hex(16)
    t0 = time.time()
    server = ServeProcess(["--checkpoint", model_dir, "--torch-threads", "1"], free_port(), token, work / "serve.log")
    with server.launched() as srv:
        torch.set_num_threads(1)
        seg = Segmenter(resolve(model_dir))
        # one event per forward, as the endpoint runs requests that arrive one at a time: a batch of other sizes may
        # round the last bits of a logit differently (matrix kernels block by size) and flip a near-tied point
        local = [seg.predict_events([ev])[0] for ev in evs]
        alongside = meanwhile()
        srv.wait_ready()
        up_s = time.time() - t0
        print(f"    endpoint {srv.url} up in {up_s:.0f}s; sending {len(evs)} held-out events as JSON")
        answers, latency = [], []
        with requests.Session() as http:
            http.headers["Authorization"] = f"Bearer {token}"
            for p, e in evs:
                t1 = time.perf_counter()
                r = http.post(f"{srv.url}/v1/segment", json={"points": p.tolist(), "energies": e.tolist()}, timeout=60)
                latency.append(1e3 * (time.perf_counter() - t1))
                r.raise_for_status()
                answers.append(np.asarray(r.json()["classes"], np.int8))
    same = sum(np.array_equal(a, b) for a, b in zip(answers, local, strict=True))
    pred = np.concatenate(answers)
    scored = pred >= 0  # -1: at or below the energy threshold, never seen by the model
    cm = ConfusionMatrix(len(class_names)).update(
        torch.from_numpy(pred[scored]).long(), torch.from_numpy(labels[scored].astype(np.int64))
    )
    metrics = compute(cm.matrix, class_names)
    figures = {
        "events": len(evs),
        "identical_to_in_process": same,
        "startup_s": round(up_s, 1),
        "latency_p50_ms": float(np.percentile(latency, 50)),
        "miou": metrics["miou"],
        "f1": metrics["f1"],
    }
    return figures, alongside


def _display(model_dir: str, work: Path, seed: int, events: int = 6) -> Path:
    """`raysvc display` of the fine-tuned model's predictions on a few new labelled events: the interactive page a
    physicist opens to look at its segmentation (truth, prediction, errors per point)."""
    from raysvc.data.sources.synthetic import generate_dataset
    from raysvc.data.tools.display_html import build_display
    from raysvc.inference.batch import predict_dataset
    from raysvc.storage import resolve

    data, preds, out = work / "display-events", work / "display-predictions", work / "predictions.html"
    for old in (data, preds):
        shutil.rmtree(old, ignore_errors=True)
    generate_dataset(resolve(str(data)), events, seed + 2000, events, workers=1, show_progress=False)
    predict_dataset(resolve(model_dir), resolve(str(data)), resolve(str(preds)), log=lambda m: None)
    build_display(resolve(str(data)), resolve(str(out)), events, resolve(str(preds)))
    return out


def run_demo(
    workdir: str = "runs/demo",
    events: int = 2000,
    storage: str = "seaweedfs",
    workers: int = 2,
    seed: int = 0,
    shard_events: int = 250,
    pretrain_steps: int = 100,
    finetune_steps: int = 100,
    label_events: int = 100,
    probe_events: int = 60,
) -> dict:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from raysvc.data.sources.synthetic import generate_dataset
    from raysvc.data.streaming.config import DataConfig
    from raysvc.data.streaming.pipeline import build_dataset
    from raysvc.data.tools.display import show_event
    from raysvc.data.tools.stats import inspect_dataset
    from raysvc.demo.ingest import ExactSplitDataConfig, ingest_loop
    from raysvc.seaweed import SeaweedS3
    from raysvc.storage import resolve

    work = Path(workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    stage = _Stages()
    with contextlib.ExitStack() as stack:
        if storage == "seaweedfs":
            stage("seaweedfs", "starting SeaweedFS (S3) on 127.0.0.1")
            server = stack.enter_context(SeaweedS3(data_dir=str(work / "seaweedfs")))
            os.environ.update(server.env())
            uri = "s3://raysvc-demo/events"
            print(f"    endpoint {server.endpoint}, dataset {uri}")
        else:
            uri = (work / "events").as_uri()
        root = resolve(uri)

        stage("generate", f"generating {events} synthetic LArTPC events (seed {seed}) into {uri}")
        t0 = time.time()
        manifest = generate_dataset(root, events, seed, shard_events, workers=os.cpu_count() or 1)
        t_gen = time.time() - t0
        print(f"    {manifest.events} events, {manifest.points:,} points, {len(manifest.shards)} shards, {t_gen:.1f}s")

        stage("statistics", "dataset statistics vs PILArNet-M (checksums verified)")
        stats = inspect_dataset(root)
        for c in manifest.detector_spec.class_names:
            print(
                f"    {c:7s} {100 * stats['class_fractions'][c]:6.2f} %   (PILArNet-M "
                f"{100 * stats['reference_pilarnet_m']['class_fractions'][c]:.2f} %)"
            )
        show_event(root, 0, str(work / "event0.png"))

        os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
        if not ray.is_initialized():
            stage("ray", "starting a private Ray on 127.0.0.1")
            init_ray(include_dashboard=False, logging_level="WARNING")
            stack.callback(ray.shutdown)
        heldout = uri.rsplit("/", 1)[0] + "/heldout"
        stage(
            "ingest",
            f"streaming through Ray Data into {workers} Ray Train workers (DDP, gloo); meanwhile generating 160"
            f" held-out labelled events (seed {seed + 1000}) into {heldout}",
        )
        # the held-out set is written beside the ingest check, whose Train workers mostly wait on Ray Data
        pool = stack.enter_context(ThreadPoolExecutor(1))
        held = pool.submit(generate_dataset, resolve(heldout), 160, seed + 1000, 80, workers=1, show_progress=False)
        cfg = DataConfig(uri=uri, batch_events=8)
        stream = build_dataset(cfg)
        # Fractional CPUs per worker: on a 2-core machine whole CPUs would leave none for the read tasks (hang).
        trainer = TorchTrainer(
            ingest_loop,
            train_loop_config={
                "batch_events": cfg.batch_events,
                "num_classes": len(manifest.detector_spec.class_names),
            },
            scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 0.5}),
            torch_config=TorchConfig(backend="gloo"),
            datasets={"train": stream.dataset},
            dataset_config=ExactSplitDataConfig(),
            run_config=RunConfig(name=f"demo-ingest-{int(time.time())}", storage_path=str(work / "ray_results")),
        )
        t0 = time.time()
        result = trainer.fit()
        t_stream = time.time() - t0
        with result.checkpoint.as_directory() as d:
            ingest = json.loads(Path(d, "ingest.json").read_text())
        ledger = stream.report()
        held.result()
        stage(
            "pretrain",
            f"Panda pretraining of the tiny PTv3: {pretrain_steps} steps on {uri} (2 Train workers), linear probe "
            "on frozen features vs the random initialisation",
        )
        pretrain = _pretrain(uri, heldout, work, pretrain_steps, probe_events) if pretrain_steps else None
        finetune = serving = view = None
        if pretrain is not None and finetune_steps:
            stage(
                "finetune",
                f"fine-tuning the pretrained backbone (fft) on {label_events} labelled events for {finetune_steps}"
                f" steps, validated on the held-out events",
            )
            finetune = _finetune(uri, heldout, pretrain["uri"], work, finetune_steps, label_events)
            stage(
                "serve",
                "serving the fine-tuned model over HTTP (raysvc serve: Ray Serve, bearer token, 127.0.0.1); while it"
                " starts, an interactive event display of its predictions (raysvc display)",
            )
            serving, view = _serve_check(
                finetune["uri"], heldout, work, meanwhile=lambda: _display(finetune["uri"], work, seed)
            )
            print(f"    wrote {view}: open it in a browser (truth, prediction, errors per point; offline)")
        stage("shutdown", "stopping Ray and SeaweedFS")
    stage.close()

    ok = ingest["events"] == ingest["unique_events"] == ledger["events_out"]
    summary = {
        "ok": ok,
        "dataset": {
            "uri": uri,
            "storage": storage,
            "events": manifest.events,
            "shards": len(manifest.shards),
            "generate_s": round(t_gen, 2),
        },
        "statistics": {
            k: stats[k]
            for k in (
                "points_per_event",
                "class_fractions",
                "interactions_per_event",
                "particles_per_event",
                "reference_pilarnet_m",
            )
        },
        "stream": {
            "events_delivered": ingest["events"],
            "unique_events": ingest["unique_events"],
            "points": ingest["points"],
            "workers": ingest["workers"],
            "seconds": round(t_stream, 2),
            "ledger": ledger,
        },
        "pretrain": None
        if pretrain is None
        else {
            "steps": pretrain["steps"],
            "probe": pretrain["probe"],
            "last_monitor": pretrain["last_monitor"],
            "run": pretrain["uri"],
            "wall_s": round(pretrain["wall_s"], 1),
        },
        "finetune": None
        if finetune is None
        else {
            "steps": finetune["steps"],
            "label_events": label_events,
            "val": finetune["val"],
            "run": finetune["uri"],
            "wall_s": round(finetune["wall_s"], 1),
        },
        "serve": serving,
        "display": None if view is None else str(view),
        "stages_s": stage.seconds,
        "total_s": round(time.time() - t_start, 1),
    }
    (work / "summary.json").write_text(json.dumps(summary, indent=2))
    _plot(stats, ingest, work / "summary.png")
    _stage("summary")
    print(
        f"    events generated {manifest.events}; after cuts {ledger['events_out']} "
        f"(min-points cut {ledger['cut_min_points']}, bad skipped {ledger['skipped_bad_total']})"
    )
    per_worker = ", ".join(str(w["events"]) for w in ingest["workers"])
    print(
        f"    delivered to Train workers: {ingest['events']} ({per_worker} per worker), each exactly once: "
        f"{ingest['events'] == ingest['unique_events']}"
    )
    if pretrain is not None and pretrain["probe"]:
        pr = pretrain["probe"]
        print(
            f"    linear probe on {pretrain['steps']}-step tiny Panda features: mIoU {pr['pretrained_miou']:.3f} vs "
            f"{pr['random_miou']:.3f} on the random initialisation ({pr['gain']:+.3f}); curve "
            f"{[(s, round(m, 3)) for s, m in pr['curve']]}"
        )
        for name in manifest.detector_spec.class_names:
            print(
                f"      F1 {name:7s} pretrained {pr['pretrained']['f1'][name] or 0:.3f}  random "
                f"{pr['random']['f1'][name] or 0:.3f}"
            )
        mon = pretrain["last_monitor"]
        print(
            f"    collapse monitors: {mon['proto_used_frac']:.2f} of prototypes used (perplexity "
            f"{mon['proto_perplexity']:.0f}), feature std {mon['feat_std']:.3f}; run in {pretrain['uri']}"
        )
    if finetune is not None:
        print(
            f"    fine-tuned on {label_events} labelled events ({finetune['steps']} steps): held-out mIoU "
            f"{finetune['val']['miou']:.3f}; run in {finetune['uri']}"
        )
    if serving is not None:
        print(
            f"    endpoint: {serving['identical_to_in_process']}/{serving['events']} held-out events answered "
            f"exactly as in process, mIoU {serving['miou']:.3f}, p50 {serving['latency_p50_ms']:.0f} ms per "
            f"event"
        )
    wrote = [work / "summary.json", work / "summary.png", work / "event0.png", *([view] if view else [])]
    print(f"    wrote {', '.join(map(str, wrote))}")
    took = ", ".join(f"{k} {v:.0f}" for k, v in stage.seconds.items())
    print(f"    total {summary['total_s']}s ({took} s) -> {'OK' if ok else 'MISMATCH'}")
    if not ok:
        raise RuntimeError(f"demo: delivered {ingest['events']} events, expected {ledger['events_out']}")
    if serving is not None and serving["identical_to_in_process"] != serving["events"]:
        raise RuntimeError(
            f"demo: the endpoint answered {serving['events'] - serving['identical_to_in_process']} "
            f"of {serving['events']} events differently from the same model in process"
        )
    return summary
