"""Starting or joining Ray the same way from every driver."""

from __future__ import annotations

import os

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


def _worker_env(kwargs: dict) -> dict:
    """`kwargs` with PRINT_PATCH_ENV=0 in the job's runtime env (for a cluster), unless this process (or the submitted
    job, whose env vars its driver has too) already chose a value: Ray refuses to merge two values of one variable."""
    if PRINT_PATCH_ENV in os.environ:
        return kwargs
    runtime_env = dict(kwargs.get("runtime_env") or {})
    runtime_env["env_vars"] = {PRINT_PATCH_ENV: "0", **(runtime_env.get("env_vars") or {})}
    return {**kwargs, "runtime_env": runtime_env}


def init_ray(**kwargs) -> None:
    """Join the cluster named by RAY_ADDRESS (set by `ray job submit`, or by hand: an address or "auto"), else start
    a private local Ray on 127.0.0.1 only. Never plain `ray.init()`: that joins whatever cluster
    /tmp/ray/ray_current_cluster names, which a crashed or killed `ray start` leaves behind, and then waits on a dead
    GCS."""
    address = os.environ.get("RAY_ADDRESS") or "local"
    import ray

    if address != "local":
        kwargs = {k: v for k, v in kwargs.items() if k not in ("num_cpus", "include_dashboard")}
        ray.init(address=address, **_worker_env(kwargs))
        return
    # A private Ray has no other node to reach it: keep its GCS, raylet and workers off the network. The processes
    # that ray.init spawns inherit the variable (the workers read it when they import ray); this driver imported ray
    # already, so its constant is set too. Both are restored afterwards, so that nothing this process starts later
    # (a `ray start`, say) inherits them; the node keeps 127.0.0.1. PRINT_PATCH_ENV and the address (see
    # ADDRESS_ENV) travel the same way, so a private Ray needs no runtime env; ray.init(address="local") itself
    # never reads RAY_ADDRESS.
    import ray._private.ray_constants as ray_constants

    port = free_port()
    inherit = {LOOPBACK_ENV: "0", GCS_PORT_ENV: str(port), ADDRESS_ENV: f"127.0.0.1:{port}"}
    inherit |= {} if PRINT_PATCH_ENV in os.environ else {PRINT_PATCH_ENV: "0"}
    saved_env, saved_const = {k: os.environ.get(k) for k in inherit}, ray_constants.ENABLE_RAY_CLUSTER
    os.environ.update(inherit)
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init(address="local", **kwargs)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_const
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
