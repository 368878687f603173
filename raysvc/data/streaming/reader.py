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

from raysvc.data.contract.detectors import LARTPC, Detector
from raysvc.data.contract.schema import EVENT_SCHEMA, EventDataError, with_optional_columns
from raysvc.data.streaming.shards import ShardRecord, read_shard
from raysvc.data.streaming.transforms import PreprocessConfig, preprocess_table
from raysvc.storage import Location

READ_COLUMNS = [f.name for f in EVENT_SCHEMA]


def make_ledger():
    """A Ray actor class that sums the counts reported by read tasks (created lazily: importing needs no Ray)."""
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


def read_preprocessed(
    root: Location,
    rec: ShardRecord,
    cfg: PreprocessConfig,
    keep_ids: np.ndarray | None,
    verify_checksum: bool = True,
    detector: Detector = LARTPC,
) -> tuple[pa.Table, Counter, Counter]:
    """One shard read (size, sha256 and row count checked against the manifest) and preprocessed; `detector` is the
    manifest's (see `preprocess_table`).

    Returns (table, counts, seconds by stage); both the Ray tasks and the direct path use it. A corrupt shard raises,
    or under on_bad=skip is skipped whole and its events counted as bad:corrupt.
    """
    t0 = time.perf_counter()
    try:
        table = read_shard(root, rec, verify_checksum=verify_checksum, check=False)
    except EventDataError as e:
        if cfg.on_bad == "error":
            raise
        return EVENT_SCHEMA.empty_table(), Counter({"read": rec.events, f"bad:{e.kind}": rec.events}), Counter()
    table = with_optional_columns(table.select([c for c in READ_COLUMNS if c in table.column_names]))
    t1 = time.perf_counter()
    out, counts = preprocess_table(table, cfg, root.join(rec.name).uri, keep_ids, row_base=0, detector=detector)
    return out, counts, Counter(read=t1 - t0, preprocess=time.perf_counter() - t1)


def read_shards_udf(
    batch: pa.Table,
    root: Location,
    cfg: PreprocessConfig,
    keep_ids: np.ndarray | None,
    ledger,
    verify_checksum: bool,
    detector: Detector = LARTPC,
) -> Iterator[pa.Table]:
    """Ray Data UDF: for each shard record in the batch, read + preprocess; counts go to the ledger."""
    import ray

    for rec in batch.to_pylist():
        out, counts, seconds = read_preprocessed(root, ShardRecord(**rec), cfg, keep_ids, verify_checksum, detector)
        counts.update({f"seconds:{k}": v for k, v in seconds.items()})
        ray.get(ledger.add.remote(dict(counts)))  # synchronous: counts are in before the rows are consumed
        if out.num_rows:
            yield out
