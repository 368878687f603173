"""A real Ray cluster on 127.0.0.1 for the tests: a head started by the script users run
(cluster/local/start-head.sh: token auth, loopback) and optional worker nodes (`ray start --address`), every port
free-picked, each node in its own session and stopped by its PID at the end, checked gone."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from raysvc.seaweed import free_port
from raysvc.serve.process import session_processes

REPO = Path(__file__).parents[1]
BIN = Path(sys.executable).parent


def _node_ports(gcs: int) -> dict:
    base = 20000 + (gcs + free_port()) % 1500 * 20
    return {
        "--node-manager-port": free_port(),
        "--object-manager-port": free_port(),
        "--metrics-export-port": free_port(),
        "--dashboard-agent-listen-port": free_port(),
        "--dashboard-agent-grpc-port": free_port(),
        "--runtime-env-agent-port": free_port(),
        "--min-worker-port": base,
        "--max-worker-port": base + 19,
    }


class RayCluster:
    """`with RayCluster(tmp_path, head_cpus) as c:` a head; `c.add_node(cpus)` adds a worker node. `c.env`: what a
    client needs (token auth); `c.gcs` the GCS address (RAY_ADDRESS for a driver), `c.dashboard` the job API."""

    def __init__(self, tmp_path: Path, head_cpus: int = 2):
        self.tmp_path, self.head_cpus = tmp_path, head_cpus
        self.procs: list[tuple[subprocess.Popen, object]] = []

    def __enter__(self) -> RayCluster:
        token = self.tmp_path / "auth_token"
        token.write_text(secrets.token_hex(32))
        env = {
            **os.environ,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token),
            "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
            "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
        }
        env.pop("RAY_ADDRESS", None)
        port, dash = free_port(), free_port()
        # a private temp dir (short: it holds Unix sockets) keeps this head out of /tmp/ray/ray_current_cluster,
        # which plain ray.init() calls elsewhere would otherwise try to join after the head is gone
        self.temp = tempfile.mkdtemp(prefix="rh-", dir="/tmp")
        env |= {"RAY": str(BIN / "ray"), "RAYSVC_RAY_PORT": str(port), "RAYSVC_DASHBOARD_PORT": str(dash)}
        env["RAYSVC_RAY_TEMP"] = self.temp
        self.env, self.gcs, self.dashboard = env, f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}"
        ports = _node_ports(port) | {"--ray-client-server-port": free_port()}
        cmd = [str(REPO / "cluster" / "local" / "start-head.sh"), "--block", f"--num-cpus={self.head_cpus}"]
        try:
            self._start(cmd + [f"{k}={v}" for k, v in ports.items()], "ray-head.log")
            self._wait(1)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def add_node(self, cpus: int) -> None:
        cmd = [str(BIN / "ray"), "start", f"--address={self.gcs}", "--block", "--node-ip-address=127.0.0.1"]
        cmd += [f"--num-cpus={cpus}", *[f"{k}={v}" for k, v in _node_ports(free_port()).items()]]
        self._start(cmd, f"ray-node-{len(self.procs)}.log")
        self._wait(len(self.procs))

    def _start(self, cmd: list[str], log_name: str) -> None:
        log = open(self.tmp_path / log_name, "w")
        proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append((proc, log))

    def _wait(self, nodes: int) -> None:
        """Until the cluster has `nodes` alive nodes (asked through the job API's CLI, with the token)."""
        deadline = time.time() + 120
        probe = "import ray; ray.init(); print(sum(n['Alive'] for n in ray.nodes()))"
        while True:
            p = subprocess.run(
                [sys.executable, "-c", probe],
                env=self.env | {"RAY_ADDRESS": self.gcs},
                capture_output=True,
                text=True,
                timeout=120,
            )
            if p.returncode == 0 and p.stdout.strip().splitlines()[-1:] == [str(nodes)]:
                return
            if time.time() > deadline or any(proc.poll() is not None for proc, _ in self.procs):
                logs = "".join((self.tmp_path / f.name).read_text()[-2000:] for _, f in self.procs)
                raise RuntimeError(f"Ray cluster did not reach {nodes} node(s):\n{p.stderr[-2000:]}\n{logs}")
            time.sleep(1)

    def __exit__(self, *exc) -> None:
        for proc, log in reversed(self.procs):  # worker nodes first, then the head
            _stop(proc)
            log.close()
        shutil.rmtree(self.temp, ignore_errors=True)
        left = [pid for proc, _ in self.procs for pid in session_processes(proc.pid)]
        assert not left, f"Ray processes left running: {left}"


def _stop(proc: subprocess.Popen) -> None:
    """Stop a `ray start --block` and everything in its session: SIGTERM, then SIGKILL what outlives it."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)  # `ray start --block` often outlives SIGTERM: the rest is killed below
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    for pid in session_processes(proc.pid):  # workers outside the node's process group
        os.kill(pid, signal.SIGTERM)
    deadline = time.time() + 30
    while session_processes(proc.pid) and time.time() < deadline:
        time.sleep(0.5)
    for pid in session_processes(proc.pid):
        os.kill(pid, signal.SIGKILL)
    time.sleep(0.5)
