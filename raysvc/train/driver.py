"""The one job driver: `raysvc finetune`, `raysvc pretrain` and the sweeps' trials all run `run_job`.

Everything that can be checked on the driver is checked before a worker starts: the config (by pydantic, naming the
field), the datasets (manifest + preflight of every shard: the task's `prepare`) and the storage (created /
writable). Then a TorchTrainer runs `train.loop.train_loop` on `scaling.workers` workers; the run lives at
`run.storage/run.name`, where Ray keeps its checkpoints, so re-running with the same name resumes. At the end the
task exports its model and draws its plots, and the driver writes `summary.json` beside them.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path

import torch
import yaml
from pydantic import BaseModel

from raysvc.config import ConfigError, load_config
from raysvc.data.streaming.config import DataConfig
from raysvc.data.streaming.prepared import Prepared
from raysvc.data.streaming.transforms import report
from raysvc.ray_init import init_ray
from raysvc.storage import Location, absolute_uri, ensure_dir, resolve, write_bytes_atomic
from raysvc.train import heap
from raysvc.train.config import JobConfig, RunSection, ScalingSection
from raysvc.train.tasks import get_task, task_names


def load_job(path: str | None, sets: list[str] | None, default_task: str) -> JobConfig:
    """The typed config of a job YAML (+ `--set` overrides): the task named by its `task:` key (or `default_task`)
    validates it. A task of another kind than `default_task`'s (a fine-tuning job given to `raysvc pretrain`) is an
    error that says which command runs it."""
    task = default_task
    if path:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"{path}: cannot read config ({e})") from e
        task = raw.get("task", task) if isinstance(raw, dict) else task
    task = next((s.split("=", 1)[1].strip() for s in sets or [] if s.startswith("task=")), task)
    if task not in task_names():
        raise ConfigError(f"{path or 'job'}: task {task!r} is not one of {task_names()}")
    cls, expected = get_task(task), get_task(default_task).kind
    if cls.kind != expected:
        raise ConfigError(
            f"{path or 'job'}: task {task!r} is a {cls.kind} task: run it with `raysvc {cls.kind}`, "
            f"not `raysvc {expected}`"
        )
    return load_config(cls.config, path, sets)


def fit(
    loop,
    loop_config: dict,
    scaling: ScalingSection,
    run: RunSection,
    storage_root: Location,
    callbacks: list | None = None,
    worker_env: dict | None = None,
) -> dict:
    """Run `loop` on `scaling.workers` workers (Ray started here unless it is already), return state.pt of the last
    checkpoint. `callbacks`: Ray Train callbacks of the run (e.g. Tune's report callback inside a sweep);
    `worker_env`: the workers' runtime env (the allocator's preload)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        init_ray(logging_level="WARNING")  # RAY_ADDRESS (set by `ray job submit`) selects the cluster
    resources = {"CPU": scaling.cpus_per_worker} | ({"GPU": 1} if scaling.use_gpu else {})
    trainer = TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=scaling.workers,
            use_gpu=scaling.use_gpu,
            resources_per_worker=resources,
            placement_strategy=scaling.placement_strategy,
        ),
        run_config=RunConfig(
            name=run.name,
            storage_path=storage_root.path,
            storage_filesystem=storage_root.fs if storage_root.is_s3 else None,
            failure_config=FailureConfig(max_failures=run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=run.keep_checkpoints),
            callbacks=callbacks or None,
            worker_runtime_env=worker_env,
        ),
    )
    result = _fit(trainer)
    if result.checkpoint is None:
        raise RuntimeError(f"run {run.name}: finished without a checkpoint ({result.error})")
    with result.checkpoint.as_directory() as d:
        return torch.load(os.path.join(d, "state.pt"), map_location="cpu", weights_only=False)


def _fit(trainer):
    """`trainer.fit()`, with a Ctrl-C raised as KeyboardInterrupt. Ray Train answers SIGINT in the driver by aborting
    the run (its workers stop; what was checkpointed stays) and then calls sys.exit(0) inside its signal handler: the
    command would end with no word of why, or run its next stage. Its handler also outlives fit(); ours comes back."""
    import signal
    import threading

    main_thread = threading.current_thread() is threading.main_thread()  # Ray registers its handler only there
    previous = signal.getsignal(signal.SIGINT) if main_thread else None
    try:
        return trainer.fit()
    except SystemExit:
        if not main_thread:
            raise
        raise KeyboardInterrupt from None
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)


def data_report(state: dict, prep: Prepared | dict[str, Prepared]) -> dict:
    """What the training ranks' read tasks read, cut and skipped over the whole run (read-ahead included), plus the
    shards the driver's preflight left out: the count behind "nothing is dropped silently". `prep`: the training
    data, or {source: its data} for a job that reads several."""
    total: Counter = Counter()
    for p in prep.values() if isinstance(prep, dict) else [prep]:
        total.update(p.skipped)
    for c in state.get("counts", []):
        total.update(c)
    return report(total)


def _paths(cfg: JobConfig) -> list[tuple[str, object, str]]:
    """(field name, section, attribute) of every storage path of the job: every DataConfig's uri, at the top or
    inside a section (a cross-experiment job's `sources`)."""
    out = [("run.storage", cfg.run, "storage")]

    def walk(obj, name: str) -> None:
        if isinstance(obj, DataConfig):
            out.append((f"{name}.uri", obj, "uri"))
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{name}.{k}")
        elif isinstance(obj, BaseModel):
            for k in type(obj).model_fields:
                walk(getattr(obj, k), f"{name}.{k}")

    for name in type(cfg).model_fields:
        walk(getattr(cfg, name), name)
    model = getattr(cfg, "model", None)
    if getattr(model, "init", None):
        out.append(("model.init", model, "init"))
    return out


def _absolute(cfg: JobConfig, nodes: int = 1) -> None:
    """Relative paths in the config become absolute here, on the driver: workers may run elsewhere. On a cluster of
    several nodes a relative path is refused: it names this driver's working directory, which other nodes do not
    share (absolute paths are taken to be on a filesystem every node mounts)."""
    for field, section, attr in _paths(cfg):
        value = getattr(section, attr)
        if nodes > 1 and absolute_uri(value) != value:
            raise ConfigError(
                f"{field}={value!r} is a relative path, and this Ray cluster has {nodes} nodes that do not share "
                "the driver's working directory: give an s3:// URI, or an absolute path on a filesystem every node "
                "mounts"
            )
        setattr(section, attr, absolute_uri(value))


def _cluster_nodes() -> int:
    """Alive nodes of the cluster this driver joins (RAY_ADDRESS); 1 for a private local Ray."""
    if not os.environ.get("RAY_ADDRESS"):
        return 1
    import ray

    if not ray.is_initialized():
        init_ray(logging_level="WARNING")
    return sum(1 for n in ray.nodes() if n.get("Alive"))


def run_job(cfg: JobConfig, log=print, fault: dict | None = None, callbacks: list | None = None) -> dict:
    """Run (or resume) the job and export its result; returns the summary. `fault` ({"step": n, "marker": path,
    "kind": "raise" | "sigkill"}) makes rank 0 fail once at step n: the hook the fault-tolerance tests use.
    `callbacks` go to the Train run (a sweep passes Tune's report callback)."""
    from raysvc.train.loop import train_loop

    t0 = time.time()
    task = get_task(cfg.task)
    cfg = cfg.model_copy(deep=True)
    _absolute(cfg, _cluster_nodes())
    inputs = task.prepare(cfg, log)
    worker_env = heap.worker_runtime_env(cfg.train.allocator)
    storage_root = resolve(cfg.run.storage)
    ensure_dir(storage_root)
    run_loc = storage_root.join(cfg.run.name)
    state = fit(
        train_loop,
        {"task": cfg.task, "job": cfg.model_dump(mode="json"), "inputs": inputs, "fault": fault},
        cfg.scaling,
        cfg.run,
        storage_root,
        callbacks,
        worker_env,
    )
    own = task.finish(cfg, state, run_loc, inputs, log)
    summary = {
        "run": cfg.run.name,
        "task": cfg.task,
        "uri": run_loc.uri,
        "steps": state["step"],
        "workers": cfg.scaling.workers,
        "worker_nodes": state.get("nodes"),
        **own,
        "history": state["history"],
        "data": data_report(state, inputs["train_data"]),
        "wall_s": time.time() - t0,
        "config": cfg.model_dump(mode="json"),
    }
    write_bytes_atomic(run_loc.join("summary.json"), json.dumps(summary, indent=2).encode())
    return summary
