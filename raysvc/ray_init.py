"""Starting or joining Ray the same way from every driver."""

from __future__ import annotations

import contextlib
import os
import sys

from raysvc.seaweed import free_port

# Ray resolves a local node's address to the host's outward IP (so that other nodes could join) unless this is 0; its
# name comes from the macOS / Windows case, where Ray keeps single-node clusters on loopback for that reason.
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"

# Ray Train (2.60) routes a worker's print() to its logger and, because Ray core itself replaces a worker's
# sys.stdout, also to the original print: every progress line reached the driver twice. Off, a print goes to the
# worker's stdout only, which Ray streams to the driver once. A private Ray's workers inherit it from this process;
# a cluster's get it through the job's runtime env.
PRINT_PATCH_ENV = "RAY_TRAIN_ENABLE_PRINT_PATCH"

# Parts of Ray that run inside a cluster's own processes find "their" cluster by the address in RAY_ADDRESS, and
# without it scan the host for GCS processes: Ray Train's PlacementGroupCleaner asks the State API whether its
# controller lives, and with two private Rays on one host it got "Found multiple active Ray instances" or the other
# Ray's answer ("no such actor"), took the controller for dead and removed the healthy run's placement group. So a
# private Ray's GCS gets a port chosen here, and every process of that Ray inherits RAY_ADDRESS naming it.
GCS_PORT_ENV = "RAY_GCS_SERVER_PORT"
ADDRESS_ENV = "RAY_ADDRESS"

# Ray Data draws its progress bars with cursor-control sequences (in the driver and in the actors that run a
# streaming split, whose lines Ray forwards); raysvc shows its own progress instead. Set before ray.data is imported
# it is the default of every DataContext, the workers' included (inherited, or through a cluster job's runtime env);
# a user who sets it keeps their value.
DATA_BARS_ENV = "RAY_DATA_DISABLE_PROGRESS_BARS"

# How long a starting driver waits for its new GCS to answer (about one try a second; Ray's default is about 20).
# On a loaded machine the GCS can take longer, so a private Ray that fails to start is started once more with
# START_RETRY_WAIT_S.
GCS_WAIT_ENV = "RAY_gcs_server_port_wait_time_s"
START_RETRY_WAIT_S = 120


class RayStartError(RuntimeError):
    """A private local Ray did not start, retry included."""


def _worker_env(kwargs: dict, defaults: dict | None = None) -> dict:
    """`kwargs` with `defaults` (PRINT_PATCH_ENV=0 unless given) in the job's runtime env (for a cluster), each unless
    this process (or the submitted job, whose env vars its driver has too) already chose a value: Ray refuses to merge
    two values of one variable."""
    ours = {k: v for k, v in (defaults or {PRINT_PATCH_ENV: "0"}).items() if k not in os.environ}
    if not ours:
        return kwargs
    runtime_env = dict(kwargs.get("runtime_env") or {})
    runtime_env["env_vars"] = {**ours, **(runtime_env.get("env_vars") or {})}
    return {**kwargs, "runtime_env": runtime_env}


def init_ray(**kwargs) -> None:
    """Join the cluster named by RAY_ADDRESS (set by `ray job submit`, or by hand: an address or "auto"), else start
    a private local Ray on 127.0.0.1 only. Never plain `ray.init()`: that joins whatever cluster
    /tmp/ray/ray_current_cluster names, which a crashed or killed `ray start` leaves behind, and then waits on a dead
    GCS."""
    address = os.environ.get("RAY_ADDRESS") or "local"
    cluster_kwargs = {k: v for k, v in kwargs.items() if k not in ("num_cpus", "include_dashboard")}
    cluster_kwargs = _worker_env(cluster_kwargs, {PRINT_PATCH_ENV: "0", DATA_BARS_ENV: "1"})  # before the next line
    os.environ.setdefault(DATA_BARS_ENV, "1")
    import ray

    if "ray.data" in sys.modules:  # imported before the variable was set: its current context has bars on
        sys.modules["ray.data"].DataContext.get_current().enable_progress_bars = os.environ[DATA_BARS_ENV] == "0"
    if address != "local":
        ray.init(address=address, **cluster_kwargs)
        return
    # A private Ray has no other node to reach it: keep its GCS, raylet and workers off the network. The processes
    # that ray.init spawns inherit the variable (the workers read it when they import ray); this driver imported ray
    # already, so its constant is set too. Both are restored afterwards, so that nothing this process starts later
    # (a `ray start`, say) inherits them; the node keeps 127.0.0.1. PRINT_PATCH_ENV and the address (see
    # ADDRESS_ENV) travel the same way, so a private Ray needs no runtime env; ray.init(address="local") itself
    # never reads RAY_ADDRESS.
    wait = os.environ.get(GCS_WAIT_ENV)
    try:
        _start_local(ray, kwargs, {})
        return
    except (TypeError, ValueError):
        raise  # the arguments, not the machine
    except Exception as e:
        ray.shutdown()  # whatever the failed start left running
        first = _first_line(e)
    longer = str(max(START_RETRY_WAIT_S, 4 * int(wait or 0)))
    print(
        f"[raysvc] the local Ray did not start ({first}); trying once more, waiting up to {longer} s for it",
        file=sys.stderr,
        flush=True,
    )
    try:
        _start_local(ray, kwargs, {GCS_WAIT_ENV: longer})
    except Exception as e:
        ray.shutdown()
        raise RayStartError(
            f"could not start a local Ray on 127.0.0.1, tried twice (first: {first}; then, waiting up to {longer} s: "
            f"{_first_line(e)}). The machine may be overloaded or short of memory: see Ray's logs under "
            "/tmp/ray/session_latest/logs, or join a running cluster with RAY_ADDRESS"
        ) from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def _start_local(ray, kwargs: dict, env: dict) -> None:
    """One `ray.init(address="local")` on a fresh GCS port, `env` added to what its processes inherit."""
    import ray._private.ray_constants as ray_constants

    port = free_port()
    inherit = {LOOPBACK_ENV: "0", GCS_PORT_ENV: str(port), ADDRESS_ENV: f"127.0.0.1:{port}", **env}
    inherit |= {} if PRINT_PATCH_ENV in os.environ else {PRINT_PATCH_ENV: "0"}
    saved_const = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        with environ(inherit):
            ray.init(address="local", **kwargs)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_const


@contextlib.contextmanager
def environ(values: dict):
    """`values` in os.environ for the duration, the previous values (or their absence) restored afterwards."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
