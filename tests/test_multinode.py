"""A Ray cluster of two nodes on 127.0.0.1 (a head and a worker node, token auth): a fine-tune, a pretraining whose
2 workers are placed one per node, and a batch prediction whose model actors run on both, all reading and writing
SeaweedFS only (no shared working directory), and a relative path refused by name."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from raysvc.storage import S3Options, read_bytes, resolve
from tests.ray_cluster import BIN, REPO, RayCluster


@pytest.mark.slow
def test_two_node_cluster_runs_finetune_spread_pretraining_and_batch_prediction_from_s3(s3_env, tmp_path):
    from raysvc.data.sources.synthetic import generate_dataset

    s3 = S3Options(endpoint_url=s3_env.endpoint)
    generate_dataset(resolve("s3://multinode/train", s3), 16, seed=8, shard_events=4, show_progress=False)
    # 1 event per validation shard: 8 read tasks and 8 prediction files
    generate_dataset(resolve("s3://multinode/val", s3), 8, seed=9, shard_events=1, show_progress=False)
    work = tmp_path / "driver"  # the drivers' working directory; nothing is written here
    work.mkdir()

    # 2 CPUs per node and 1.5 per model actor below: each node can hold one actor only, so the pool must use both
    # (with 1 CPU per actor, Ray may place both on one node, and once did)
    with RayCluster(tmp_path, head_cpus=2) as cluster:
        cluster.add_node(cpus=2)
        env = cluster.env | s3_env.env() | {"RAY_ADDRESS": cluster.gcs}

        def raysvc(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
            p = subprocess.run(
                [str(BIN / "raysvc"), *args], env=env, capture_output=True, text=True, timeout=600, cwd=work
            )
            assert (p.returncode == 0) == ok, p.stdout[-3000:] + p.stderr[-3000:]
            return p

        common = ["run.storage=s3://multinode/runs", "run.wandb_mode=offline", "train.batch_events=2"]
        common += ["data.uri=s3://multinode/train", "data.read_cpus=0.25", "scaling.cpus_per_worker=0.5"]
        sets = common + ["val_data.uri=s3://multinode/val", "val_data.read_cpus=0.25", "run.name=ft"]
        sets += ["train.steps=2", "train.val_every=2", "train.checkpoint_every=2", "scaling.workers=1"]
        raysvc("finetune", str(REPO / "jobs" / "semseg-tiny.yaml"), *[x for s in sets for x in ("--set", s)])
        ft = json.loads(read_bytes(resolve("s3://multinode/runs/ft/summary.json", s3)))
        assert ft["steps"] == 2 and ft["val"]["miou"] is not None

        sets = common + ["probe_data.uri=s3://multinode/val", "probe_data.read_cpus=0.25", "run.name=pt"]
        sets += ["train.steps=2", "train.checkpoint_every=2", "probe.every=2", "probe.train_events=2"]
        sets += ["probe.val_events=2", "views.local_views=2", "panda.head_hidden=64", "panda.prototypes=64"]
        sets += ["scaling.workers=2", "scaling.placement_strategy=STRICT_SPREAD", "data.loader=ray_data"]
        raysvc("pretrain", str(REPO / "jobs" / "pretrain-panda-tiny.yaml"), *[x for s in sets for x in ("--set", s)])
        pt = json.loads(read_bytes(resolve("s3://multinode/runs/pt/summary.json", s3)))
        assert pt["steps"] == 2 and len(set(pt["worker_nodes"])) == 2  # one worker on each node

        args = ["--model", "s3://multinode/runs/ft", "--data", "s3://multinode/val", "--out", "s3://multinode/preds"]
        raysvc("predict", *args, "--actors", "2", "--cpus-per-actor", "1.5", "--batch-events", "1")
        manifest = json.loads(read_bytes(resolve("s3://multinode/preds/manifest.json", s3)))
        assert manifest["events"] == 8 and manifest["actor_nodes"] == 2  # one actor on each node
        assert manifest["files"] == [f"preds-{i:05d}.parquet" for i in range(8)]

        # a relative path names the driver's directory, which the other node does not share: refused by name
        bad = raysvc("finetune", str(REPO / "jobs" / "semseg-tiny.yaml"), "--set", "run.storage=runs", ok=False)
        assert "run.storage='runs' is a relative path" in bad.stderr and "2 nodes" in bad.stderr
    assert not os.listdir(work) or set(os.listdir(work)) <= {"runs"}  # only console logs, if any
