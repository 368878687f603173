"""What every per-worker training loop shares: the rank's resumable data stream, RNG state capture, collectives that
degrade to no-ops on one worker, bf16 autocast on CUDA, and reporting a checkpoint to Ray Train."""

from __future__ import annotations

import contextlib
import io
import random
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist

from raysvc.data.streaming.config import DataConfig
from raysvc.data.streaming.prepared import Prepared, rank_shards
from raysvc.data.streaming.rank_feed import pack_pieces, rank_pieces


def worker_setup(seed: int, scaling) -> tuple[int, int, torch.device]:
    """(rank, world size, device) of this Train worker; torch threads from `scaling`; RNGs seeded per rank."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(scaling.torch_threads or max(int(scaling.cpus_per_worker), 1))
    seed_everything(seed * 1000 + rank)
    return rank, world, ray.train.torch.get_device()


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def gather(obj, world: int) -> list:
    if world == 1 or not dist.is_initialized():
        return [obj]
    out: list = [None] * world
    dist.all_gather_object(out, obj)
    return out


def autocast(amp: bool, device: torch.device):
    if device.type == "cuda" and amp:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class RankStream:
    """This rank's endless, resumable stream of batches over its shards (shard i -> rank i mod world), epoch after
    epoch in a seeded order, read with the job's loader
    (`data.loader`: Ray tasks or Ray Data, `data/streaming/rank_feed.py`).

    `transform(epoch)` gives the function (and its kwargs) the read tasks apply to each shard's preprocessed rows
    (e.g. Panda's views), `collate` turns `per_rank` rows into a batch; an epoch's remainder is dropped. The position
    after each batch is (epoch, shard position, row): a resumed stream starts reading at that row, and `counts` sums
    what the reads removed (cuts, bad events), each shard once."""

    def __init__(
        self,
        cfg: DataConfig,
        prep: Prepared,
        rank: int,
        world: int,
        seed: int,
        per_rank: int,
        collate: Callable[[pa.Table], dict],
        transform: Callable[[int], tuple[Callable | None, dict]] | None = None,
        position: tuple[int, int, int] = (0, 0, 0),
    ):
        self.cfg, self.prep, self.rank, self.world, self.seed = cfg, prep, rank, world, seed
        self.per_rank, self.collate, self.transform = per_rank, collate, transform
        self.counts: Counter = Counter()
        self.epoch, self.shard, self.row = position
        if len(prep.manifest.shards) < world:
            raise ValueError(
                f"{prep.root.uri}: {len(prep.manifest.shards)} shards for {world} workers; "
                "each worker needs at least one"
            )

    def __iter__(self):
        while True:
            shards = rank_shards(self.prep, self.rank, self.world, self.epoch, self.seed, shuffle=True)
            fn, kwargs = self.transform(self.epoch) if self.transform is not None else (None, {})
            fresh = (self.shard, self.row) == (0, 0)
            pieces = rank_pieces(
                self.cfg, self.prep, shards, (self.shard, self.row), fn, kwargs, self.cfg.prefetch_shards
            )
            got = 0
            for batch, after in pack_pieces(pieces, self.per_rank, self.collate, self.counts):
                self.shard, self.row = after
                got += 1
                yield batch
            if got == 0 and fresh:
                raise ValueError(f"{self.prep.root.uri}: rank {self.rank} got no full batch from its shards")
            self.epoch, self.shard, self.row = self.epoch + 1, 0, 0

    def position(self) -> tuple[int, int, int]:
        return self.epoch, self.shard, self.row


def _node_id() -> str | None:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


class CheckpointNotSaved(OSError):
    """A checkpoint could not be written; the run's latest checkpoint is still the one before it."""


# Room kept free beyond the checkpoint itself: Ray Train rewrites its checkpoint index (a small JSON file, in place,
# not atomically) after each checkpoint, and a full disk there would leave a run that cannot resume.
SPACE_MARGIN_BYTES = 16 * 2**20


def report_checkpoint(state: dict, metrics: dict, rank: int, local_dir: str | None = None) -> None:
    """Every rank joins the report (a barrier in Train V2); rank 0 attaches `state` as state.pt. With the run on a
    local filesystem (`local_dir`), a checkpoint that would not fit with SPACE_MARGIN_BYTES to spare is refused before
    a byte is written; any write error becomes CheckpointNotSaved naming the step and the place."""
    import ray.train

    if rank != 0:
        ray.train.report(metrics)
        return
    step = metrics.get("step")
    with tempfile.TemporaryDirectory() as d:
        buf = io.BytesIO()
        torch.save(state, buf)
        size = buf.tell()
        if local_dir is not None:
            free = shutil.disk_usage(_existing(local_dir)).free
            if free < size + SPACE_MARGIN_BYTES:
                raise CheckpointNotSaved(
                    f"checkpoint of step {step} not saved: {local_dir} has {free / 2**20:.0f} MiB free, the "
                    f"checkpoint needs {size / 2**20:.0f} MiB + {SPACE_MARGIN_BYTES / 2**20:.0f} MiB to spare; the "
                    "run's latest checkpoint is still the previous one (free space, then re-run the same job)"
                )
        Path(d, "state.pt").write_bytes(buf.getvalue())
        try:
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        except OSError as e:
            raise CheckpointNotSaved(
                f"checkpoint of step {step} not saved to {local_dir or 'the run storage'}: {e}; "
                "the run's latest checkpoint is still the previous one"
            ) from e


def _existing(path: str) -> str:
    """`path`, or its nearest existing parent (the run directory may not exist before its first checkpoint)."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    return str(p)


def load_checkpoint_state() -> dict | None:
    """The state.pt of the run's latest checkpoint (a restarted or re-run job), or None."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        return torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=False)


def restore(
    state: dict | None,
    parts: dict,
    rank: int,
    world: int,
    history: dict,
) -> tuple[int, dict, tuple[int, int, int], dict]:
    """Load `parts` ({state key: module / optimizer / scheduler}) from a checkpoint's state. Returns (step, history,
    this rank's data position (epoch, shard, row), its counts so far); with the same world size also this rank's RNG
    states, so the run continues exactly. A fresh run (state None) gets (0, `history`, (0, 0, 0), {})."""
    if state is None:
        return 0, history, (0, 0, 0), {}
    for key, obj in parts.items():
        obj.load_state_dict(state[key])
    position, counts = (0, 0, 0), {}
    if state["world"] == world:
        position = tuple(state["data"][rank])
        if len(position) == 2:  # (epoch, batches): a checkpoint from before positions were (epoch, shard, row)
            print(f"[raysvc] rank {rank}: old checkpoint format, data restarts at epoch {position[0]}'s start")
            position = (position[0], 0, 0)
        set_rng_state(state["rng"][rank])
        counts = state.get("counts", [{}] * world)[rank]
    elif rank == 0:
        print(f"[raysvc] resuming with {world} workers instead of {state['world']}: data order restarts")
    if rank == 0:
        print(f"[raysvc] resumed from step {state['step']}")
    return state["step"], state["history"], position, counts


def save(
    parts: dict,
    step: int,
    history: dict,
    rank: int,
    world: int,
    stream: RankStream,
    metrics: dict,
    local_dir: str | None = None,
) -> None:
    """Checkpoint `parts` with the step, history, and every rank's data position, counts and RNG states (gathered:
    every rank must call this). `local_dir`: the run's directory when it is on a local filesystem."""
    positions = gather(stream.position(), world)
    counts = gather(dict(stream.counts), world)
    rngs = gather(rng_state(), world)
    nodes = gather(_node_id(), world)
    state = {}
    if rank == 0:
        state = {k: v.state_dict() for k, v in parts.items()} | {
            "step": step,
            "history": history,
            "data": positions,
            "counts": counts,
            "rng": rngs,
            "world": world,
            "nodes": nodes,  # the Ray node of each rank (where the run's workers were placed)
        }
    report_checkpoint(state, metrics, rank, local_dir)
