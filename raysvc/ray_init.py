"""Starting or joining Ray the same way from every driver."""

from __future__ import annotations

import os


def init_ray(**kwargs) -> None:
    """Join the cluster named by RAY_ADDRESS (set by `ray job submit`, or by hand: an address or "auto"), else start
    a private local Ray. Never plain `ray.init()`: that joins whatever cluster /tmp/ray/ray_current_cluster names,
    which a crashed or killed `ray start` leaves behind, and then waits on a dead GCS."""
    import ray

    address = os.environ.get("RAY_ADDRESS") or "local"
    if address != "local":
        kwargs = {k: v for k, v in kwargs.items() if k not in ("num_cpus", "include_dashboard")}
    ray.init(address=address, **kwargs)
