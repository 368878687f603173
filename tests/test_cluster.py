"""Cluster launch files (cluster/): every manifest parses and holds the secure defaults (token auth, secrets only
by reference, a memory-backed /dev/shm); every raysvc command and config they name exists and validates; the local
head script creates a private token and binds loopback; the SLURM script runs end to end against stand-ins for the
SLURM and container tools this machine does not have (recording what they were asked to do)."""

from __future__ import annotations

import os
import re
import shlex
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

from raysvc.cli import build_parser
from raysvc.config import load_config

REPO = Path(__file__).parents[1]
CLUSTER = REPO / "cluster"


def _commands() -> set[str]:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return set(sub.choices)


def _validate_raysvc_command(argv: list[str]) -> None:
    """`raysvc pretrain|finetune|sweep CONFIG [--set k=v ...]`: the config exists and validates with the overrides."""
    from raysvc.sweep.spec import load_spec
    from raysvc.train.tasks.panda import PretrainConfig
    from raysvc.train.tasks.segmentation import FinetuneConfig

    assert argv[0] == "raysvc" and argv[1] in _commands(), argv
    config = REPO / argv[2]
    assert config.is_file(), f"{argv[2]} named by a cluster file does not exist"
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    if argv[1] == "sweep":
        load_spec(str(config), sets)
    else:
        load_config({"pretrain": PretrainConfig, "finetune": FinetuneConfig}[argv[1]], config, sets)


def _containers(doc: dict) -> list[tuple[dict, dict]]:
    """(container, pod spec) of every pod template in a KubeRay resource."""
    spec = doc["spec"]
    pods = []
    if doc["kind"] == "RayCluster":
        pods = [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
    elif doc["kind"] == "RayJob":
        pods = [spec["submitterPodTemplate"]["spec"]]
    elif doc["kind"] == "RayService":
        rc = spec["rayClusterConfig"]
        pods = [rc["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in rc["workerGroupSpecs"]]
    return [(c, pod) for pod in pods for c in pod["containers"]]


def test_kuberay_manifests_keep_secrets_in_secrets_and_auth_on():
    docs = [d for f in sorted((CLUSTER / "kuberay").glob("*.yaml")) for d in yaml.safe_load_all(f.read_text())]
    kinds = {d["kind"]: d for d in docs}
    assert {"RayCluster", "RayJob", "RayService"} <= set(kinds)
    cluster = kinds["RayCluster"]
    for doc in docs:
        for c, pod in _containers(doc):
            env = {e["name"]: e for e in c.get("env", [])}
            assert env["RAY_AUTH_MODE"]["value"] == "token", c["name"]
            token_dir = os.path.dirname(env["RAY_AUTH_TOKEN_PATH"]["value"])
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            volumes = {v["name"]: v for v in pod.get("volumes", [])}
            assert "secret" in volumes[mounts[token_dir]], "the Ray token comes from a Secret, as a file"
            for name in (
                "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY",
                "WANDB_API_KEY",
                "RAY_AUTH_TOKEN",
                "RAYSVC_SERVE_TOKEN",
            ):
                assert "value" not in env.get(name, {}), f"{name} written into a manifest"
    for c, pod in _containers(cluster) + _containers(kinds["RayService"]):  # every Ray node: S3 credentials by
        # reference, a memory-backed /dev/shm
        assert {"name": "raysvc-s3"} in [e["secretRef"] for e in c["envFrom"]]
        shm = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}["/dev/shm"]
        assert {v["name"]: v for v in pod["volumes"]}[shm]["emptyDir"]["medium"] == "Memory"
    workers = cluster["spec"]["workerGroupSpecs"]
    assert all(
        int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) > 0 for g in workers
    )
    job = kinds["RayJob"]
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    _validate_raysvc_command(shlex.split(job["spec"]["entrypoint"]))


def test_every_raysvc_command_in_the_cluster_files_names_a_real_config():
    found = 0
    for f in CLUSTER.rglob("*"):
        if f.is_file():
            for m in re.finditer(r"raysvc (\w+) ((?:jobs|tune)/[\w./-]+\.yaml)", f.read_text()):
                assert m.group(1) in _commands(), (f, m.group(0))
                assert (REPO / m.group(2)).is_file(), (f, m.group(0))
                found += 1
    assert found >= 4


def test_containerfile_copies_only_paths_that_exist():
    copies = [
        line.split()[1:-1] for line in (CLUSTER / "Containerfile").read_text().splitlines() if line.startswith("COPY ")
    ]
    assert copies
    for srcs in copies:
        for src in srcs:
            assert (REPO / src).exists(), src


def test_local_head_script_makes_a_private_token_and_binds_loopback(tmp_path):
    token = tmp_path / "ray" / "auth_token"
    env = {**os.environ, "RAY": "echo", "RAY_AUTH_TOKEN_PATH": str(token), "RAYSVC_DASHBOARD_PORT": "18265"}
    p = subprocess.run(
        [str(CLUSTER / "local" / "start-head.sh"), "--num-cpus=2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    args = p.stdout.strip().splitlines()[-1].split()  # `echo` stands in for `ray`: the arguments it would get
    assert args[:2] == ["start", "--head"] and "--num-cpus=2" in args
    assert "--node-ip-address=127.0.0.1" in args and "--dashboard-host=127.0.0.1" in args
    assert "--dashboard-port=18265" in args
    secret = token.read_text()
    assert re.fullmatch(r"[0-9a-f]{64}", secret) and stat.S_IMODE(token.stat().st_mode) == 0o600
    assert secret not in p.stdout
    subprocess.run([str(CLUSTER / "local" / "start-head.sh")], env=env, capture_output=True, timeout=30, check=True)
    assert token.read_text() == secret  # an existing token is kept


STUB = """#!/bin/bash
echo "$(basename "$0") $*" >> "$STUB_LOG"
{body}
"""


@pytest.mark.parametrize("site,tool", [("perlmutter", "podman-hpc"), ("s3df", "apptainer")])
def test_slurm_script_starts_head_and_workers_in_containers_then_the_command(tmp_path, site, tool):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stubs = {
        "scontrol": 'printf "nid001\\nnid002\\nnid003\\n"',
        # srun: drop its options, run the step here (the node names are the stand-in's only fiction)
        "srun": 'while [[ "$1" == -* ]]; do case "$1" in -w) shift 2;; *) shift;; esac; done; exec "$@"',
        "hostname": "echo 10.0.0.7",
        tool: "exit 0",
    }
    for name, body in stubs.items():
        f = bin_dir / name
        f.write_text(STUB.format(body=body))
        f.chmod(0o755)
    log = tmp_path / "calls.log"
    home = tmp_path / "home"
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "STUB_LOG": str(log),
        "HOME": str(home),
        "SLURM_JOB_NODELIST": "nid[001-003]",
        "SLURM_SUBMIT_DIR": str(REPO),
        "SLURM_CPUS_ON_NODE": "64",
        "RAYSVC_START_WAIT": "0",
        "AWS_SECRET_ACCESS_KEY": "s3cr3t-never-logged",
    }
    cmd = ["raysvc", "pretrain", "jobs/pretrain-panda-base.yaml", "--set", "scaling.workers=12"]
    p = subprocess.run(
        ["bash", str(CLUSTER / "slurm" / "ray-cluster.sbatch"), site, *cmd],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    calls = [line for line in log.read_text().splitlines() if line.startswith(tool)]
    assert len(calls) == 3, calls  # the head, the workers (one srun over the other nodes), the command
    head = next(c for c in calls if "ray start --head" in c)
    workers = next(c for c in calls if "ray start --block --address" in c)
    command = next(c for c in calls if "ray start" not in c)
    assert "ray start --head --block --node-ip-address=10.0.0.7 --port=6379 --dashboard-host=127.0.0.1" in head
    assert "--num-gpus=4" in head and "--num-cpus=64" in head
    assert "ray start --block --address=10.0.0.7:6379" in workers
    assert command.endswith(" ".join(cmd))
    _validate_raysvc_command(cmd)
    if tool == "podman-hpc":
        assert "--gpu" in head and "--shm-size=64g" in head and f"{REPO}:/app" in head
        assert "--env=AWS_SECRET_ACCESS_KEY" in command and "--env=RAY_ADDRESS" in command
    else:
        assert "exec --nv" in head and f"{REPO}:/app" in head
    assert "s3cr3t-never-logged" not in log.read_text() + p.stdout + p.stderr
    token = home / ".ray" / "raysvc_auth_token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and len(token.read_text()) == 64


def _check_serve_config(config: dict, loopback: bool) -> None:
    """A Serve config: its import path is our app builder, its args validate, the proxy binds as declared."""
    import importlib

    from raysvc.serve.app import ServeConfig

    assert (config["http_options"]["host"] == "127.0.0.1") == loopback
    for app in config["applications"]:
        module, attr = app["import_path"].split(":")
        assert callable(getattr(importlib.import_module(module), attr))
        ServeConfig.model_validate(app["args"])


def test_serve_configs_point_at_the_app_and_validate():
    from raysvc.serve.app import FAST_PATH_ENV

    _check_serve_config(yaml.safe_load((CLUSTER / "serve" / "segment.yaml").read_text()), loopback=True)
    service = yaml.safe_load((CLUSTER / "kuberay" / "rayservice.yaml").read_text())
    _check_serve_config(yaml.safe_load(service["spec"]["serveConfigV2"]), loopback=False)  # pod network, behind
    env = {
        e["name"]: e
        for e in service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["RAYSVC_SERVE_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "raysvc-serve-token"
    for name, value in FAST_PATH_ENV.items():  # the request-path switches raysvc serve sets for its own Ray
        assert env[name]["value"] == value


@pytest.mark.parametrize("job", sorted((Path(__file__).parents[1] / "jobs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_job_file_validates(job):
    from raysvc.train.driver import load_job

    cfg = load_job(str(job), [], "panda" if job.name.startswith("pretrain-") else "segmentation")  # by its task: key
    assert cfg.train.steps > 0 and cfg.run.name and cfg.task in job.read_text()
