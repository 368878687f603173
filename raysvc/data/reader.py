"""Shard reading + preprocessing, shared by the Ray Data tasks and the direct path.

Kept free of torch so that Ray worker processes running these tasks start fast (importing torch costs ~1 s per
process, and Ray starts workers on demand).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raysvc.data.schema import EVENT_SCHEMA, EventDataError
from raysvc.data.shards import ShardRecord
from raysvc.data.transforms import PreprocessConfig, preprocess_table
from raysvc.storage import Location, explained

READ_COLUMNS = [f.name for f in EVENT_SCHEMA]


def _ledger_class():
    import ray

    @ray.remote(num_cpus=0)
    class Ledger:
        def __init__(self) -> None:
            self.counts: Counter = Counter()

        def add(self, counts: dict) -> None:
            self.counts.update(counts)

        def get(self) -> dict:
            return dict(self.counts)

        def reset(self) -> None:
            self.counts.clear()

    return Ledger


def read_preprocessed(root: Location, rec: ShardRecord, cfg: PreprocessConfig, keep_ids: np.ndarray | None,
                      ) -> tuple[pa.Table, Counter, Counter]:  # fmt: skip
    """One shard read with pyarrow and preprocessed: (table, counts, seconds by stage). Both paths use this."""
    loc = root.join(rec.name)
    t0 = time.perf_counter()
    with explained(loc, "reading"):
        try:
            table = pq.read_table(loc.path, filesystem=loc.fs, columns=READ_COLUMNS)
        except pa.ArrowInvalid as e:
            raise EventDataError(loc.uri, f"not a readable Parquet file ({e})", kind="corrupt") from e
    t1 = time.perf_counter()
    out, counts = preprocess_table(table, cfg, loc.uri, keep_ids, row_base=0)
    return out, counts, Counter(read=t1 - t0, preprocess=time.perf_counter() - t1)


def _read_shards_udf(batch: pa.Table, root: Location, cfg: PreprocessConfig, keep_ids: np.ndarray | None, ledger,
                     ) -> Iterator[pa.Table]:  # fmt: skip
    """Ray Data UDF: for each shard record in the batch, read + preprocess; counts go to the ledger."""
    import ray

    for rec in batch.to_pylist():
        out, counts, _ = read_preprocessed(root, ShardRecord(**rec), cfg, keep_ids)
        ray.get(ledger.add.remote(dict(counts)))  # synchronous: counts are in before the rows are consumed
        yield out
