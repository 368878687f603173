"""What the job drivers (`finetune`, `pretrain`) share: run a per-worker loop under a TorchTrainer whose run lives at
`run.storage/run.name` (re-running the same name resumes), and hand back the final checkpoint's state."""

from __future__ import annotations

import os
from collections import Counter

import torch

from raysvc.data.pipeline import Prepared
from raysvc.data.transforms import report
from raysvc.ray_init import init_ray
from raysvc.storage import Location
from raysvc.train.job_config import RunSection, ScalingSection


def fit(loop, loop_config: dict, scaling: ScalingSection, run: RunSection, storage_root: Location,
        callbacks: list | None = None) -> dict:  # fmt: skip
    """Run `loop` on `scaling.workers` workers (Ray started here unless it is already), return state.pt of the last
    checkpoint. `callbacks`: Ray Train callbacks of the run (e.g. Tune's report callback inside a sweep)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        init_ray(logging_level="WARNING")  # RAY_ADDRESS (set by `ray job submit`) selects the cluster
    resources = {"CPU": scaling.cpus_per_worker} | ({"GPU": 1} if scaling.use_gpu else {})
    trainer = TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=scaling.workers, use_gpu=scaling.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=run.name, storage_path=storage_root.path,
                             storage_filesystem=storage_root.fs if storage_root.is_s3 else None,
                             failure_config=FailureConfig(max_failures=run.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=run.keep_checkpoints),
                             callbacks=callbacks or None),
    )  # fmt: skip
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"run {run.name}: finished without a checkpoint ({result.error})")
    with result.checkpoint.as_directory() as d:
        return torch.load(os.path.join(d, "state.pt"), map_location="cpu", weights_only=False)


def data_report(state: dict, prep: Prepared) -> dict:
    """What the training ranks' read tasks read, cut and skipped over the whole run (read-ahead included), plus the
    shards the driver's preflight left out: the count behind "nothing is dropped silently"."""
    total: Counter = Counter(prep.skipped)
    for c in state.get("counts", []):
        total.update(c)
    return report(total)
