"""A private local Ray (what every driver starts without RAY_ADDRESS) listens on loopback only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

# Runs in its own process: it starts (and stops) its own private Ray, and lists the TCP sockets in LISTEN state held
# by itself and every process it spawned (GCS, raylet, workers, agents), read from /proc.
SCRIPT = textwrap.dedent("""
    import ipaddress, json, os, struct
    import ray
    from raysvc.ray_init import LOOPBACK_ENV, init_ray

    def descendants(root):
        kids = {}
        for p in filter(str.isdigit, os.listdir("/proc")):
            try:
                ppid = int(open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            kids.setdefault(ppid, []).append(int(p))
        out, todo = set(), [root]
        while todo:
            q = todo.pop()
            out.add(q)
            todo += kids.get(q, [])
        return out

    def listening(pids):
        owner = {}
        for pid in pids:
            try:
                for fd in os.listdir(f"/proc/{pid}/fd"):
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if link.startswith("socket:["):
                        owner[link[8:-1]] = pid
            except OSError:
                continue
        out = []
        for name in ("tcp", "tcp6"):
            for line in open(f"/proc/net/{name}").read().splitlines()[1:]:
                f = line.split()
                if f[3] == "0A" and f[9] in owner:  # 0A: LISTEN
                    raw = bytes.fromhex(f[1].split(":")[0])
                    words = struct.unpack("<" + "I" * (len(raw) // 4), raw)  # /proc prints host-order words
                    ip = ipaddress.ip_address(struct.pack(">" + "I" * len(words), *words))
                    if ip.version == 6 and ip.ipv4_mapped:
                        ip = ip.ipv4_mapped
                    out.append(str(ip))
        return out

    init_ray(num_cpus=1, include_dashboard=False, logging_level="ERROR")

    @ray.remote
    def task_ip():
        return ray.util.get_node_ip_address()

    @ray.remote
    def task_print_patch():
        return os.environ.get("RAY_TRAIN_ENABLE_PRINT_PATCH")

    result = {"driver_ip": ray.util.get_node_ip_address(), "task_ip": ray.get(task_ip.remote()),
              "print_patch": ray.get(task_print_patch.remote()),
              "env_left": os.environ.get(LOOPBACK_ENV), "listening": listening(descendants(os.getpid()))}
    ray.shutdown()
    print("RESULT " + json.dumps(result))
""")


def test_private_local_ray_listens_on_loopback_only():
    env_free = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    p = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=180, env=env_free)
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads(next(line for line in p.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert result["driver_ip"] == "127.0.0.1" and result["task_ip"] == "127.0.0.1"
    assert len(result["listening"]) >= 3  # GCS, raylet and workers at least: the scan sees them
    outside = [ip for ip in result["listening"] if not ip.startswith("127.") and ip != "::1"]
    assert not outside, f"the private Ray listens beyond loopback on {outside}"
    assert result["env_left"] is None  # nothing that this process starts later inherits the switch
    assert result["print_patch"] == "0"  # Train workers print each progress line once (see PRINT_PATCH_ENV)


def test_worker_env_keeps_a_print_patch_choice_already_made(monkeypatch):
    from raysvc.ray_init import PRINT_PATCH_ENV, _worker_env

    monkeypatch.delenv(PRINT_PATCH_ENV, raising=False)
    given = {"runtime_env": {"env_vars": {"OTHER": "1"}, "pip": ["x"]}, "num_cpus": 1}
    assert _worker_env(given) == {
        "runtime_env": {"env_vars": {PRINT_PATCH_ENV: "0", "OTHER": "1"}, "pip": ["x"]},
        "num_cpus": 1,
    }
    assert given["runtime_env"]["env_vars"] == {"OTHER": "1"}  # the caller's dict is not changed
    monkeypatch.setenv(PRINT_PATCH_ENV, "1")  # e.g. a job submitted with it in its runtime env
    assert _worker_env(given) == given


# The first start fails for real: its GCS port (the seam: ray_init.free_port) is held by another socket, so Ray's GCS
# cannot bind it and ray.init raises. The retry takes a fresh port and a longer wait, and this Ray then runs tasks.
RETRY = textwrap.dedent("""
    import json, os, socket
    import ray
    import raysvc.ray_init as ri
    from raysvc.seaweed import free_port

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    ports = [taken.getsockname()[1]]
    ri.free_port = lambda: ports.pop() if ports else free_port()
    ri.init_ray(num_cpus=1, include_dashboard=False, logging_level="ERROR")
    wait = ray.get(ray.remote(lambda: os.environ.get(ri.GCS_WAIT_ENV)).remote())
    ray.shutdown()
    print("RESULT " + json.dumps({"worker_wait": wait, "left": os.environ.get(ri.GCS_WAIT_ENV)}))
""")


@pytest.mark.slow
@pytest.mark.long  # ~60 s (Ray's GCS takes ~40 s to give up on a port it cannot bind); the next test covers the flow
def test_a_private_ray_that_fails_to_start_is_started_once_more_with_a_longer_wait():
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_gcs_server_port_wait_time_s")}
    p = subprocess.run([sys.executable, "-c", RETRY], capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads(p.stdout.split("RESULT ", 1)[1])
    assert "[raysvc] the local Ray did not start (RuntimeError: Failed to start GCS." in p.stderr
    assert "trying once more, waiting up to 120 s" in p.stderr
    assert result == {"worker_wait": "120", "left": None}  # the second Ray got the longer wait; the shell keeps its own


def test_a_private_ray_that_fails_twice_ends_with_one_clear_error(monkeypatch, capsys):
    import raysvc.ray_init as ri

    waits = []

    def fail(ray, kwargs, env):
        waits.append(env.get(ri.GCS_WAIT_ENV))
        raise RuntimeError(f"Failed to start GCS.\n(attempt {len(waits)})")

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv(ri.GCS_WAIT_ENV, "40")  # a user's own wait: the retry waits four times as long
    monkeypatch.setattr(ri, "_start_local", fail)
    with pytest.raises(ri.RayStartError) as e:
        ri.init_ray(num_cpus=1)
    assert waits == [None, "160"]
    assert str(e.value).startswith(
        "could not start a local Ray on 127.0.0.1, tried twice (first: RuntimeError: Failed to start GCS.; then, "
        "waiting up to 160 s: RuntimeError: Failed to start GCS.)"
    )
    assert "trying once more, waiting up to 160 s" in capsys.readouterr().err
