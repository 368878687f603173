"""`ray job submit` of segmentation, pretraining, sweep and serving jobs to a real local Ray head started with token
auth, as on a cluster."""

from __future__ import annotations

import json
import secrets
import subprocess

import pytest

from raysvc.seaweed import free_port
from raysvc.serve.process import wait_until_healthy
from tests.ray_cluster import BIN, REPO, RayCluster


@pytest.fixture()
def ray_head(tmp_path):
    """cluster/local/start-head.sh --block (token auth, 127.0.0.1) with every port free-picked; stopped at the end."""
    with RayCluster(tmp_path) as cluster:
        yield cluster.dashboard, cluster.env


@pytest.mark.slow
@pytest.mark.long
def test_ray_job_submit_runs_finetune_pretrain_sweep_and_serve_jobs_with_token_auth(ray_head, tmp_path):
    from raysvc.data.sources.synthetic import generate_dataset
    from raysvc.storage import resolve

    address, env = ray_head
    generate_dataset(resolve(str(tmp_path / "train")), 16, seed=8, shard_events=4, show_progress=False)
    generate_dataset(resolve(str(tmp_path / "val")), 6, seed=9, shard_events=6, show_progress=False)
    no_token = {k: v for k, v in env.items() if k not in ("RAY_AUTH_TOKEN_PATH",)} | {"HOME": str(tmp_path)}
    denied = subprocess.run(
        [str(BIN / "ray"), "job", "list", "--address", address],
        env=no_token,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert denied.returncode != 0  # auth is really on

    sets = [
        f"data.uri={tmp_path / 'train'}",
        f"val_data.uri={tmp_path / 'val'}",
        f"run.storage={tmp_path / 'runs'}",
        "run.name=submitted",
        "train.steps=4",
        "train.val_every=4",
        "train.checkpoint_every=4",
        "train.batch_events=2",
        "scaling.workers=2",
        "scaling.cpus_per_worker=0.5",
        "scaling.torch_threads=1",
        "data.read_cpus=0.25",
        "val_data.read_cpus=0.25",
        "run.wandb_mode=offline",
    ]
    p = subprocess.run(
        [
            str(BIN / "ray"),
            "job",
            "submit",
            "--address",
            address,
            "--working-dir",
            str(REPO),
            "--",
            "raysvc",
            "finetune",
            "jobs/semseg-tiny.yaml",
            *[a for s in sets for a in ("--set", s)],
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert p.returncode == 0 and "succeeded" in p.stdout, p.stdout[-4000:] + p.stderr[-2000:]
    assert p.stdout.count("[raysvc] step 4/4 loss") == 1, p.stdout[-4000:]  # rank 0's progress line, not doubled
    run = tmp_path / "runs" / "submitted"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["workers"] == 2 and summary["val"]["miou"] is not None
    assert (run / "model.safetensors").stat().st_size > 1e6 and (run / "config.json").exists()

    sets = [
        f"data.uri={tmp_path / 'train'}",
        f"probe_data.uri={tmp_path / 'val'}",
        f"run.storage={tmp_path / 'runs'}",
        "run.name=pretrained",
        "train.steps=2",
        "train.checkpoint_every=2",
        "train.batch_events=2",
        "probe.every=2",
        "probe.train_events=2",
        "probe.val_events=2",
        "views.local_views=2",
        "panda.head_hidden=64",
        "panda.prototypes=64",
        "scaling.workers=2",
        "scaling.cpus_per_worker=0.5",
        "data.read_cpus=0.25",
        "probe_data.read_cpus=0.25",
        "run.wandb_mode=offline",
    ]
    p = subprocess.run(
        [
            str(BIN / "ray"),
            "job",
            "submit",
            "--address",
            address,
            "--working-dir",
            str(REPO),
            "--",
            "raysvc",
            "pretrain",
            "jobs/pretrain-panda-tiny.yaml",
            *[a for s in sets for a in ("--set", s)],
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert p.returncode == 0 and "succeeded" in p.stdout, p.stdout[-4000:] + p.stderr[-2000:]
    run = tmp_path / "runs" / "pretrained"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["workers"] == 2 and [s for s, _ in summary["probe"]["curve"]] == [0, 2]
    assert (run / "backbone.safetensors").stat().st_size > 1e6 and (run / "config.json").exists()

    sets = [
        f"data.uri={tmp_path / 'val'}",
        f"storage={tmp_path / 'sweeps'}",
        "events=3",
        "cnms.radius=[5]",
        "cnms.overlap=[0.5,1.0]",
        "fps_knn.groups=[16]",
        "fps_ball=null",
        "pretrain=null",  # coverage only: the token-probe objective's pretrainings are tested in test_sweep.py
        "wandb_mode=offline",
    ]
    p = subprocess.run(
        [
            str(BIN / "ray"),
            "job",
            "submit",
            "--address",
            address,
            "--working-dir",
            str(REPO),
            "--",
            "raysvc",
            "sweep",
            "tune/cnms.yaml",
            *[a for s in sets for a in ("--set", s)],
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert p.returncode == 0 and "succeeded" in p.stdout, p.stdout[-4000:] + p.stderr[-2000:]
    summary = json.loads((tmp_path / "sweeps" / "cnms" / "summary.json").read_text())
    assert [r["trial"]["name"] for r in summary["trials"]] == ["cnms-r5-o0.5", "cnms-r5-o1", "fps_knn-g16"]

    # the endpoint as a long-running job on the cluster, serving the model the first job exported; only the path
    # of the token's file travels in the runtime env (cluster/README.md)
    serve_token = tmp_path / "serve_token"
    serve_token.write_text(secrets.token_hex(16))
    port = free_port()
    runtime_env = json.dumps({"env_vars": {"RAYSVC_SERVE_TOKEN_FILE": str(serve_token)}})
    p = subprocess.run(
        [
            str(BIN / "ray"),
            "job",
            "submit",
            "--address",
            address,
            "--no-wait",
            "--submission-id",
            "serve-job",
            "--working-dir",
            str(REPO),
            "--runtime-env-json",
            runtime_env,
            "--",
            "raysvc",
            "serve",
            "--checkpoint",
            str(tmp_path / "runs" / "submitted"),
            "--port",
            str(port),
            "--torch-threads",
            "1",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    try:
        _segment_when_up(f"http://127.0.0.1:{port}", serve_token.read_text(), address, env)
    finally:
        subprocess.run(
            [str(BIN / "ray"), "job", "stop", "--address", address, "serve-job"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    status = subprocess.run(
        [str(BIN / "ray"), "job", "status", "--address", address, "serve-job"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    assert "was stopped" in status, status


def _segment_when_up(url: str, token: str, address: str, env: dict, timeout_s: float = 180) -> None:
    """Wait for the endpoint's /healthz, then segment one generated event with the bearer token."""
    import numpy as np
    import requests

    from raysvc.data.sources.lartpc_generator import GeneratorConfig, generate_event

    if not wait_until_healthy(url, timeout_s):
        logs = subprocess.run(
            [str(BIN / "ray"), "job", "logs", "--address", address, "serve-job"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
        raise AssertionError(f"the submitted endpoint did not come up:\n{logs[-3000:]}")
    ev = generate_event(GeneratorConfig(), 5, 0)
    body = {"points": ev["coord"].tolist(), "energies": ev["energy"].tolist()}
    assert requests.post(f"{url}/v1/segment", json=body, timeout=60).status_code == 401  # auth on in the job too
    r = requests.post(f"{url}/v1/segment", json=body, headers={"Authorization": f"Bearer {token}"}, timeout=60)
    assert r.status_code == 200, r.text
    classes = np.asarray(r.json()["classes"])
    assert len(classes) == len(ev["energy"]) and set(classes[ev["energy"] > 0.13]) <= set(range(5))
