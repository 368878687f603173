"""Shared fixtures: a real SeaweedFS S3 server and a local Ray, both on 127.0.0.1, both stopped at the end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from raysvc.data.contract.schema import table_from_events
from raysvc.seaweed import SeaweedS3
from raysvc.storage import S3Options, resolve

# Ray Train's controller polls its workers every 2 s by default, so each report (checkpoint) waits up to that long;
# every run of the suite, in process or a CLI child, polls faster.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")


@pytest.fixture(scope="session")
def seaweed():
    """A real `weed mini` S3 server on a free loopback port; stopped by PID at the end of the session."""
    server = SeaweedS3().start()
    yield server
    pid = server.proc.pid
    server.stop()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # nothing left running


@pytest.fixture
def s3_env(seaweed, monkeypatch):
    """The standard AWS variables pointing at the test server."""
    for k, v in seaweed.env().items():
        monkeypatch.setenv(k, v)
    return seaweed


@pytest.fixture(scope="session")
def ray_local():
    """A private local Ray on 127.0.0.1 (2 CPUs, no dashboard) for the whole session."""
    import ray

    from raysvc.ray_init import init_ray

    os.environ.pop("RAY_ADDRESS", None)
    init_ray(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


def generate_train_val(root, train: tuple[int, int, int], val: tuple[int, int, int]):
    """Generated LArTPC events in root/train and root/val, each given as (events, seed, events per shard)."""
    from raysvc.data.sources.synthetic import generate_dataset

    for name, (n, seed, per) in (("train", train), ("val", val)):
        generate_dataset(resolve(str(root / name)), n, seed=seed, shard_events=per, show_progress=False)
    return root


def make_event(event_id: int, n: int, rng: np.random.Generator, **override) -> dict:
    """A hand-made event with n points inside the volume and energies above threshold."""
    ev = {
        "event_id": event_id,
        "coord": rng.uniform(0, 767, size=(n, 3)).astype(np.float32),
        "energy": rng.uniform(0.2, 5.0, size=n).astype(np.float32),
        "semantic": rng.integers(0, 5, size=n).astype(np.int8),
        "pid": rng.integers(-1, 5, size=n).astype(np.int8),
        "particle": rng.integers(-1, 10, size=n).astype(np.int32),
        "interaction": rng.integers(-1, 4, size=n).astype(np.int32),
        "fragment": rng.integers(-1, 20, size=n).astype(np.int32),
    }
    ev.update(override)
    return ev


def make_table(n_events: int, points=(1100, 3000), seed: int = 0, first_id: int = 0):
    rng = np.random.default_rng(seed)
    events = [make_event(first_id + i, int(rng.integers(*points)), rng) for i in range(n_events)]
    return table_from_events(events, source="test"), events


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory):
    """120 generated events in 4 shards on the local filesystem (generated once per session)."""
    from raysvc.data.sources.synthetic import generate_dataset

    root = resolve(str(tmp_path_factory.mktemp("synthetic") / "events"))
    generate_dataset(root, 120, seed=3, shard_events=30, workers=1, show_progress=False)
    return root


def s3_location(server: SeaweedS3, uri: str):
    return resolve(
        uri, S3Options(endpoint_url=server.endpoint, access_key=server.access_key, secret_key=server.secret_key)
    )


def with_heads(seg, events: list[tuple]) -> list[tuple]:
    """(classes, probabilities or None, the event heads' answer as the endpoint gives it) per event."""
    (heads,) = [o for o in seg.outputs if o.name == "event_heads"]
    return [(r["pred"], r.get("prob"), heads.to_json(r["event_heads"])) for r in seg.predict_events_full(events)]


def tiny_finetune_sets(train, val, storage, name: str, steps: int) -> list[str]:
    """`--set` options of a few-step, one-worker fine-tune of jobs/semseg-tiny.yaml on 2 cores (CLI tests)."""
    sets = [
        f"data.uri={train}",
        f"val_data.uri={val}",
        f"run.storage={storage}",
        f"run.name={name}",
        f"train.steps={steps}",
        f"train.val_every={steps}",
        f"train.checkpoint_every={steps}",
        "train.batch_events=2",
        "run.wandb_mode=offline",
        "run.max_failures=0",
        "scaling.workers=1",
        "scaling.cpus_per_worker=0.5",
        "data.read_cpus=0.25",
        "val_data.read_cpus=0.25",
    ]
    return [arg for s in sets for arg in ("--set", s)]


class Commands:
    """`raysvc` commands started at once, each writing to its own log file (a pipe could fill and block it). Most of
    a short command is starting Python and its private Ray, so commands that do not need each other's output overlap
    instead of queueing. Leaving the `with` block stops whatever still runs: a failed assertion leaves none behind."""

    def __init__(self, logdir):
        self.logdir, self.procs = logdir, {}

    def start(self, name: str, *args: str, env: dict | None = None) -> None:
        with open(self.logdir / f"{name}.log", "w") as log:
            cmd = [str(Path(sys.executable).parent / "raysvc"), *args]
            self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)

    def finished(self, name: str, ok: bool = True, timeout: float = 600) -> str:
        """Waits for the command; asserts that it succeeded (or, ok=False, that it failed); returns what it printed."""
        proc = self.procs[name]
        proc.wait(timeout=timeout)
        text = (self.logdir / f"{name}.log").read_text()
        assert (proc.returncode == 0) == ok, f"raysvc {name} exited {proc.returncode}:\n{text[-4000:]}"
        return text

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=60)
