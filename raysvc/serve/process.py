"""`raysvc serve` as a child process on 127.0.0.1: started in its own session, ready when /healthz answers, stopped
by SIGTERM to the CLI alone, then whatever is left of its session is killed. Used by `raysvc bench serve`, the demo
and the tests.

Only the CLI gets the SIGTERM: the local Ray it started (GCS, raylet) shares its process group, and signalling the
group killed the GCS under Serve's graceful shutdown, which then waited 30 s for it in vain (measured: 39 s to stop
an idle server, against 6 s now, idle or after 600 requests at concurrency 16)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path


def session_processes(sid: int) -> list[int]:
    """PIDs of live processes in session `sid` (Ray's processes inherit the session of the CLI that started them,
    whatever process group they move to)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[3]) == sid and fields[0] != "Z":  # fields[3]: session id; skip zombies
                out.append(int(d.name))
    return out


def wait_until_healthy(url: str, timeout_s: float, alive=lambda: True) -> bool:
    """Poll `GET url/healthz` until it answers 200 (True); False once `alive()` is false or `timeout_s` has passed."""
    import requests

    deadline = time.time() + timeout_s
    while True:
        try:
            if requests.get(f"{url}/healthz", timeout=2).status_code == 200:
                return True
        except (requests.ConnectionError, requests.Timeout):
            pass
        if time.time() > deadline or not alive():
            return False
        time.sleep(1)


class ServeProcess:
    """`raysvc serve ARGS --port PORT` with the token in its environment (never on its command line)."""

    def __init__(
        self,
        args: list[str],
        port: int,
        token: str | None,
        log_path: str | Path,
        env: dict | None = None,
        start_timeout_s: float = 180,
    ):
        self.url = f"http://127.0.0.1:{port}"
        self.args, self.port, self.token, self.log_path = args, port, token, Path(log_path)
        self.env = {**os.environ, **(env or {})}
        self.env.pop("RAY_ADDRESS", None)  # a private local Ray, not whatever cluster the caller is in
        if token:
            self.env["RAYSVC_SERVE_TOKEN"] = token
        self.start_timeout_s = start_timeout_s
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> ServeProcess:
        self.start()
        return self.wait_ready()

    def start(self) -> ServeProcess:
        """Launch the server and return at once: a caller with other work does it while the server comes up, then
        calls `wait_ready` (a `with` block does both)."""
        raysvc = str(Path(sys.executable).parent / "raysvc")
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [raysvc, "serve", *self.args, "--port", str(self.port)],
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    @contextlib.contextmanager
    def launched(self) -> Iterator[ServeProcess]:
        """The server started but not yet waited for: work in the block overlaps its start (Ray and Serve coming up,
        mostly idle); call `wait_ready` before the first request. Stopped when the block ends, however it ends."""
        self.start()
        try:
            yield self
        finally:
            self.stop()

    def wait_ready(self) -> ServeProcess:
        """Block until the started server answers /healthz; stop it and raise with its log's tail if it dies or
        `start_timeout_s` passes first."""
        try:
            if not wait_until_healthy(self.url, self.start_timeout_s, lambda: self.proc.poll() is None):
                raise RuntimeError(f"raysvc serve did not come up:\n{self.log_path.read_text()[-4000:]}")
            return self
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> list[int]:
        """Stop the server and everything it started; the PIDs that had to be killed after SIGTERM + 60 s."""
        if self.proc is None:
            return []
        p, self.proc = self.proc, None
        sid = p.pid
        p.terminate()  # the CLI shuts Serve down, then the Ray it started
        deadline = time.time() + 60
        while session_processes(sid) and time.time() < deadline:
            time.sleep(0.5)
        stragglers = session_processes(sid)
        for pid in stragglers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self._log.close()
        return stragglers
