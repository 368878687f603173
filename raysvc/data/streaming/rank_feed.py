"""One training rank's epoch of shards as an ordered stream of preprocessed (optionally transformed) Arrow rows,
starting at any (shard, row) position, through either loader (`data.loader`):

- "tasks": one Ray task per shard (read + cuts + transform), `prefetch` of them in flight ahead of the consumer.
- "ray_data": a Ray Dataset over the same shard list whose map tasks do the same read + cuts + transform, order
  preserved, consumed through a one-way `streaming_split`: its executor then runs in a coordinator actor, not in the
  training process (measured: a Ray Data executor inside a Train worker spins its scheduling loop under
  backpressure and takes the worker's GIL).

Both yield `Piece`s: consecutive rows of one shard with the index of their first row. The consumer therefore knows
the exact position of every row, and a resumed run starts reading at the next unread row of its shard instead of
re-reading the epoch from its start. Every shard's read counts (cuts, bad events) come with its first piece, empty
shards included, so nothing removed goes uncounted.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa

from raysvc.data.streaming.config import DataConfig
from raysvc.data.streaming.prepared import Prepared, read_task
from raysvc.data.streaming.shards import ShardRecord

LOADERS = ("tasks", "ray_data")
_POS, _ROW = "_shard_pos", "_shard_row"  # columns the ray_data map tasks add so that rows know where they came from


@dataclass
class Piece:
    pos: int  # the shard's position in the epoch's shard list
    first: int  # index of the table's first row among the shard's rows (after cuts)
    table: pa.Table
    counts: Counter | None  # the shard's read counts, on its first piece of this read only


def rank_pieces(
    cfg: DataConfig,
    prep: Prepared,
    shards: list[ShardRecord],
    start: tuple[int, int] = (0, 0),
    transform: Callable | None = None,
    transform_kwargs: dict | None = None,
    prefetch: int = 2,
) -> Iterator[Piece]:
    """The rows of `shards[start[0]:]`, the first shard from row `start[1]` on, with `cfg.loader`."""
    if cfg.loader == "ray_data":
        return _ray_data_pieces(cfg, prep, shards, start, transform, transform_kwargs or {}, prefetch)
    return task_pieces(cfg, prep, shards, start, transform, transform_kwargs or {}, prefetch)


def task_pieces(cfg, prep, shards, start, transform, kwargs, prefetch) -> Iterator[Piece]:
    """Pieces read by Ray tasks, `prefetch` shards ahead of the consumer."""
    import ray

    # "DEFAULT": never inside the caller's placement group. A Train worker started from a Tune trial inherits
    # Tune's capture_child_tasks, and its reads would then wait forever for CPUs inside the worker's own bundle.
    task = ray.remote(num_cpus=cfg.read_cpus, max_retries=3, scheduling_strategy="DEFAULT")(read_task)
    pos0, row0 = start
    todo = iter(enumerate(shards[pos0:], pos0))
    pending: deque = deque()

    def submit() -> None:
        item = next(todo, None)
        if item is not None:
            pos, rec = item
            skip = row0 if pos == pos0 else 0
            ref = task.remote(
                prep.root,
                rec,
                cfg.preprocess,
                prep.keep_ids,
                cfg.verify_checksums,
                transform,
                kwargs,
                prep.detector,
                skip,
            )
            pending.append((pos, skip, ref))

    for _ in range(max(prefetch, 1)):
        submit()
    while pending:
        pos, skip, ref = pending.popleft()
        table, counts = ray.get(ref)
        submit()
        yield Piece(pos, skip, table, counts)


class _ShardLedger:
    """Read counts by shard position, filled by the ray_data map tasks and taken by the consumer in order."""

    def __init__(self) -> None:
        self.by_pos: dict[int, dict] = {}

    def add(self, pos: int, counts: dict) -> None:
        self.by_pos[pos] = counts

    def take(self, positions: list[int]) -> list[dict]:
        return [self.by_pos.pop(p) for p in positions]


def _read_rows_udf(batch: pa.Table, prep: Prepared, cfg: DataConfig, transform, kwargs, ledger) -> Iterator[pa.Table]:
    """Ray Data map task: read + cut (+ transform) the shard of each record, tag every row with its position."""
    import ray

    for item in batch.to_pylist():
        pos, skip = item.pop("pos"), item.pop("skip")
        rec = ShardRecord(**item)
        args = (cfg.preprocess, prep.keep_ids, cfg.verify_checksums, transform, kwargs, prep.detector, skip)
        table, counts = read_task(prep.root, rec, *args)
        ray.get(ledger.add.remote(pos, dict(counts)))  # before its rows can reach the consumer
        if table.num_rows:
            n = table.num_rows
            table = table.append_column(_POS, pa.array(np.full(n, pos, np.int32)))
            yield table.append_column(_ROW, pa.array(np.arange(skip, skip + n, dtype=np.int64)))


def _ray_data_pieces(cfg, prep, shards, start, transform, kwargs, prefetch) -> Iterator[Piece]:
    import ray
    import ray.data

    pos0, row0 = start
    if pos0 >= len(shards):
        return
    ledger = ray.remote(num_cpus=0)(_ShardLedger).remote()
    items = [{"pos": p, "skip": row0 if p == pos0 else 0, **asdict(r)} for p, r in enumerate(shards[pos0:], pos0)]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(
        _read_rows_udf,
        batch_format="pyarrow",
        batch_size=1,
        num_cpus=cfg.read_cpus,
        fn_kwargs={"prep": prep, "cfg": cfg, "transform": transform, "kwargs": kwargs, "ledger": ledger},
    )
    dctx = ds.context
    dctx.execution_options.preserve_order = True
    dctx.target_max_block_size = int(cfg.block_mib * 2**20)
    dctx.enable_progress_bars = False
    dctx.print_on_execution_start = False
    (split,) = ds.streaming_split(1)
    nxt = pos0  # the next shard position whose counts are still to hand out

    def counted_up_to(pos: int) -> Iterator[Piece]:
        """Empty pieces carrying the counts of shards nxt..pos-1 (shards that gave no rows), then pos's counts."""
        nonlocal nxt
        got = ray.get(ledger.take.remote(list(range(nxt, pos + 1))))
        for p, c in zip(range(nxt, pos), got[:-1], strict=True):
            yield Piece(p, row0 if p == pos0 else 0, pa.table({}), Counter(c))
        nxt = pos + 1
        return Counter(got[-1])

    try:
        for block in split.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=prefetch):
            pos_col = block.column(_POS).to_numpy()
            rows = block.column(_ROW).to_numpy()
            cuts = np.flatnonzero(np.diff(pos_col)) + 1
            for a, b in zip(np.concatenate([[0], cuts]), np.concatenate([cuts, [len(pos_col)]]), strict=True):
                pos = int(pos_col[a])
                if np.any(np.diff(rows[a:b]) != 1):
                    raise RuntimeError(f"ray_data loader: rows of shard {shards[pos].name} arrived out of order")
                counts = None
                if pos >= nxt:
                    counts = yield from counted_up_to(pos)
                table = block.slice(a, b - a).drop_columns([_POS, _ROW])
                yield Piece(pos, int(rows[a]), table, counts)
        if nxt < len(shards):
            last = yield from counted_up_to(len(shards) - 1)
            yield Piece(len(shards) - 1, row0 if len(shards) - 1 == pos0 else 0, pa.table({}), last)
    finally:
        if ray.is_initialized():  # not at interpreter exit, with Ray already gone
            ray.kill(ledger)


def pack_pieces(
    pieces: Iterator[Piece], batch_events: int, collate: Callable[[pa.Table], dict], counts: Counter
) -> Iterator[tuple[dict, tuple[int, int]]]:
    """(batch of exactly `batch_events` rows cut across pieces, the (shard position, row) after its last row). The
    epoch's remainder is dropped (counted by the caller). A shard's counts are added to `counts` when its first piece
    starts at row 0: a piece that starts later belongs to a resumed shard, counted before the checkpoint."""
    pending: list[pa.Table] = []
    n = 0
    for piece in pieces:
        if piece.counts is not None and piece.first == 0:
            counts.update(piece.counts)
        t, start = piece.table, 0
        while start < t.num_rows:
            take = min(batch_events - n, t.num_rows - start)
            pending.append(t.slice(start, take))
            n, start = n + take, start + take
            if n == batch_events:
                yield (
                    collate(pending[0] if len(pending) == 1 else pa.concat_tables(pending)),
                    (piece.pos, piece.first + start),
                )
                pending, n = [], 0
