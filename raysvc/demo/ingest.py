"""The demo's ingest check, the simplest Ray Train loop: each worker streams its split of the events and counts what
it saw, proving the data plane end to end (Ray Data -> streaming_split -> Train workers -> DDP collectives). Rank 0
reports the gathered totals.

Ray Train's default DataConfig splits with `streaming_split(equal=True)`, which silently drops up to world_size - 1
rows per pass to make the splits equal. `ExactSplitDataConfig` splits with equal=False instead, so that the check
can see every event arrive exactly once.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import ray.train
import torch
import torch.distributed as dist

from raysvc.data.streaming.pipeline import iter_packed


def ingest_loop(config: dict) -> None:
    shard = ray.train.get_dataset_shard("train")
    ctx = ray.train.get_context()
    ids: list[int] = []
    points = 0
    num_classes = config["num_classes"]  # of the dataset's detector
    classes = np.zeros(num_classes, np.int64)
    batches = 0
    checksum = 0.0
    for batch in iter_packed(shard, config["batch_events"]):
        ids.extend(batch["event_id"].tolist())
        points += int(batch["offset"][-1])
        classes += np.bincount(batch["semantic"].numpy(), minlength=num_classes)[:num_classes]
        checksum += float(batch["feat"].double().sum())
        batches += 1
        if ctx.get_world_rank() == 0 and batches % 25 == 0:  # the stage's progress line on the driver's console
            print(f"[raysvc] ingest: rank 0 has received {len(ids)} events", flush=True)
    mine = {
        "rank": ctx.get_world_rank(),
        "event_ids": ids,
        "points": points,
        "classes": classes.tolist(),
        "batches": batches,
        "feat_sum": checksum,
    }
    gathered: list = [None] * ctx.get_world_size()
    if dist.is_available() and dist.is_initialized():
        dist.all_gather_object(gathered, mine)  # gloo on CPU, NCCL on GPU: the collectives training will use
    else:
        gathered = [mine]
    # Train V2: report() is a barrier every rank joins; results travel as a checkpoint (Result.metrics comes from
    # checkpoints), persisted under the run's storage_path, so a driver on another node can read them.
    if ctx.get_world_rank() != 0:
        ray.train.report({})
        return
    all_ids = [i for g in gathered for i in g["event_ids"]]
    summary = {
        "workers": [
            {k: v for k, v in g.items() if k != "event_ids"} | {"events": len(g["event_ids"])} for g in gathered
        ],
        "events": len(all_ids),
        "unique_events": len(set(all_ids)),
        "event_ids": sorted(all_ids),
        "points": int(sum(g["points"] for g in gathered)),
        "class_counts": np.sum([g["classes"] for g in gathered], axis=0).tolist(),
        "torch_threads": torch.get_num_threads(),
    }
    with tempfile.TemporaryDirectory() as d:
        Path(d, "ingest.json").write_text(json.dumps(summary))
        ray.train.report(
            {k: v for k, v in summary.items() if k != "event_ids"}, checkpoint=ray.train.Checkpoint.from_directory(d)
        )


class ExactSplitDataConfig(ray.train.DataConfig):
    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        output = [{} for _ in range(world_size)]
        to_split = set(datasets) if self._datasets_to_split == "all" else set(self._datasets_to_split)
        hints = worker_node_ids if self._enable_shard_locality else None
        for name, ds in datasets.items():
            if ds.name is None:
                ds.set_name(name)
            ds = ds.copy(ds)
            ds.context.execution_options = self._resolve_execution_options(name)
            if name in to_split:
                for i, split in enumerate(ds.streaming_split(world_size, equal=False, locality_hints=hints)):
                    output[i][name] = split
            else:
                for i in range(world_size):
                    output[i][name] = ds.iterator()
        return output
