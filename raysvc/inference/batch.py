"""Batch inference over a dataset: `raysvc predict` and `raysvc evaluate`.

The work per chunk of events is one function each (`predict_chunk`, `score_chunk`), run either in this process
(`actors=0`, the baseline) or as a Ray Data job: map tasks read each shard (size, sha256 and row count checked) and
cut it into chunks of at most `batch_events` events and `max_points` points; a pool of `actors` model replicas
(`map_batches` with a callable class; one GPU each with a CUDA device) runs the chunks, one block each so that the
chunks of one shard spread over the pool; this process gathers the results. Both ways cut the same chunks and run
the same function on them, so they give the same predictions and the same confusion matrix.

Predictions: one Parquet file per input shard (`preds-NNNNN.parquet`: `event_id`, `num_points`, `pred`, a class per
input point, -1 at or below the energy threshold) and `manifest.json` (files with sizes and sha256, counts, model,
data), each written atomically, the manifest last. What a model predicts beyond a class per point comes from its
output adapters (inference/outputs): each adds its predict columns, its manifest keys and its `evaluate` figures.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raysvc.data.streaming.shards import ShardRecord, load_manifest, read_shard
from raysvc.data.streaming.transforms import report
from raysvc.hub import read_model
from raysvc.inference.metrics import ConfusionMatrix, compute
from raysvc.inference.outputs import get_output
from raysvc.inference.outputs.base import points_list
from raysvc.inference.record import ExportedModel, output_names
from raysvc.inference.segmenter import Segmenter
from raysvc.storage import Location, write_bytes_atomic

_SHARD, _ROW = "_shard", "_row"  # which shard and which of its rows a chunk starts at
_CHUNK = "_chunk"  # a whole chunk as Arrow IPC bytes: one row per chunk between the read tasks and the actors
_RESULT = "_result"  # a chunk's result as Arrow IPC bytes: one row per chunk between the actors and this process
_NODE = "_node"  # the Ray node of the actor that ran a chunk
_ACTOR = "_actor"  # the Ray actor that ran a chunk
ACTOR_START_S = 600  # seconds for the pool's actors to start (model load included)
READ_CPUS = 0.25  # per read task: reading and cutting a shard is light beside the model


def chunks(table: pa.Table, batch_events: int, max_points: int) -> Iterator[tuple[int, pa.Table]]:
    """(first row, chunk) over consecutive events: at most `batch_events` events and `max_points` points per chunk
    (an event larger than `max_points` goes alone)."""
    points = table.column("num_points").to_numpy().astype(np.int64)
    start = 0
    while start < len(points):
        end, total = start, 0
        while end < len(points) and end - start < batch_events and (end == start or total + points[end] <= max_points):
            total += points[end]
            end += 1
        yield start, table.slice(start, end - start)
        start = end


def preds_schema(record: ExportedModel, outputs: list[str]) -> pa.Schema:
    """The columns of a predictions shard: `event_id`, `num_points`, `pred`, then each output's (a panoptic model's
    instance columns and `instances`; event heads' `rings`, `ring_probs`, `pid`, `pid_probs`). Every shard of one
    output has it, empty shards included."""
    fields = [("event_id", pa.int64()), ("num_points", pa.int32()), ("pred", pa.list_(pa.int8()))]
    for name in outputs:
        fields += get_output(name).fields(record)
    return pa.schema(fields)


def predict_chunk(seg: Segmenter, chunk: pa.Table, source: str) -> pa.Table:
    """`event_id`, `num_points`, `pred` (list<int8>, aligned with the input points) of one chunk, and each output's
    columns after them."""
    events = seg.predict(chunk, source)
    cols = {
        "event_id": chunk.column("event_id"),
        "num_points": pa.array(np.array([len(e["pred"]) for e in events], np.int32)),
        "pred": points_list([e["pred"] for e in events], np.int8),
    }
    for o in seg.outputs:
        cols |= o.columns([e[o.name] for e in events])
    return pa.table(cols).cast(preds_schema(seg.record, [o.name for o in seg.outputs]))


def score_chunk(seg: Segmenter, chunk: pa.Table, source: str) -> tuple[np.ndarray, Counter, dict]:
    """(confusion matrix, what the model's training cuts removed, each output's evaluation state) of one labelled
    chunk."""
    import torch

    from raysvc.data.streaming.collate import collate_packed
    from raysvc.data.streaming.transforms import preprocess_table

    cm = ConfusionMatrix(len(seg.class_names))
    pre, counts = preprocess_table(chunk, seg.record.preprocess, source, detector=seg.detector)
    states = {}
    if pre.num_rows:
        batch = collate_packed(pre, particles=any(o.needs_particles for o in seg.outputs))
        with torch.no_grad():
            logits, x = seg.point_logits(batch)
        cm.update(logits.argmax(1), x["labels"])
        states = {o.name: o.score(x["outputs"].get(o.name), x, batch, pre) for o in seg.outputs}
    return cm.matrix, counts, states


class _Replica:
    """One model replica of the Ray Data actor pool: loads the export once, then predicts or scores chunks."""

    def __init__(self, model_uri: str, device: str, mode: str, sources: list[str], threads: int):
        import torch

        from raysvc.storage import resolve

        torch.set_num_threads(threads)
        self.seg = Segmenter(resolve(model_uri), device)
        self.mode, self.sources = mode, sources

    def __call__(self, batch: pa.Table) -> pa.Table:
        # one row per chunk in, one row per chunk out: the model sees exactly the chunks the in-process path cuts,
        # and a result is never split over blocks
        import ray

        chunk_rows = zip(batch.column(_SHARD), batch.column(_ROW), batch.column(_CHUNK), strict=True)
        results = [
            _to_ipc(_run_chunk(self.seg, self.mode, _from_ipc(c), self.sources[i.as_py()])) for i, _, c in chunk_rows
        ]
        ctx, n = ray.get_runtime_context(), batch.num_rows
        return pa.table(
            {
                _SHARD: batch.column(_SHARD),
                _ROW: batch.column(_ROW),
                _RESULT: pa.array(results, pa.large_binary()),
                _NODE: pa.array([ctx.get_node_id()] * n),
                _ACTOR: pa.array([ctx.get_actor_id()] * n),
            }
        )


def _to_ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def _from_ipc(value: pa.Scalar) -> pa.Table:
    return pa.ipc.open_stream(value.as_buffer()).read_all()


def _run_chunk(seg: Segmenter, mode: str, chunk: pa.Table, source: str) -> pa.Table:
    if mode == "predict":
        return predict_chunk(seg, chunk, source)
    cm, counts, states = score_chunk(seg, chunk, source)
    return pa.table(
        {"cm": [cm.reshape(-1).tolist()], "counts": [json.dumps(dict(counts))], "outputs": [json.dumps(states)]}
    )


def tag_chunk(table: pa.Table, shard: int, row: int) -> pa.Table:
    """`table` with every row tagged (shard, row): the chunk it belongs to, for `split_chunks`."""
    n = table.num_rows
    table = table.append_column(_SHARD, pa.array(np.full(n, shard, np.int32)))
    return table.append_column(_ROW, pa.array(np.full(n, row, np.int64)))


def _read_chunks(batch: pa.Table, data: Location, batch_events: int, max_points: int, limits: list) -> Iterator:
    """Ray Data map task: shard records -> one row per chunk: its shard index, first row and the chunk itself."""
    for item in batch.to_pylist():
        i = item.pop(_SHARD)
        for start, chunk in _shard_chunks(data, ShardRecord(**item), limits[i], batch_events, max_points):
            yield pa.table(
                {
                    _SHARD: pa.array([i], pa.int32()),
                    _ROW: pa.array([start], pa.int64()),
                    _CHUNK: pa.array([_to_ipc(chunk)], pa.large_binary()),
                }
            )


def _shard_chunks(data: Location, rec: ShardRecord, limit: int | None, batch_events: int, max_points: int):
    """`chunks` of one shard (checked as it is read), its first `limit` events only if given: both paths cut these."""
    table = read_shard(data, rec)
    return chunks(table if limit is None else table.slice(0, limit), batch_events, max_points)


def check_room(actors: int, cpus_per_actor: float | None) -> float:
    """The CPUs of each of `actors` pool actors on the connected Ray cluster: `cpus_per_actor` if given (refused when
    it leaves no CPU for the read tasks), else an equal share of what the read tasks leave (to 0.01 CPU), at most a
    node's CPUs (an actor runs on one node)."""
    import ray

    cpus = ray.cluster_resources().get("CPU", 0)
    if cpus_per_actor is None:
        node_cpus = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=cpus)
        share = math.floor(100 * min((cpus - READ_CPUS) / actors, node_cpus)) / 100
        if share < 0.01:
            raise ValueError(
                f"{actors} model actor(s) do not fit beside the read tasks ({READ_CPUS} CPU) on this Ray cluster of "
                f"{cpus:g} CPUs: fewer --actors"
            )
        return share
    if actors * cpus_per_actor + READ_CPUS > cpus:
        raise ValueError(
            f"{actors} model actor(s) x {cpus_per_actor} CPU leave no room for the read tasks ({READ_CPUS} CPU) on "
            f"this Ray cluster of {cpus:g} CPUs: fewer --actors, or less --cpus-per-actor (or leave it out: an "
            "equal share of what the read tasks leave)"
        )
    return cpus_per_actor


def actor_pool(ds, cls, actors: int, cpus_per_actor: float, device: str, kwargs: dict, batch_size: int | None = None):
    """`ds` mapped through a pool of `actors` replicas of `cls(**kwargs, threads=...)`, `batch_size` rows per call
    (None: whole blocks; Ray Data needs a number for GPU actors), one GPU each unless `device` is cpu; every replica is
    up before the first call. (Ray Data spreads its tasks and actors over the nodes by default.)"""
    import ray.data

    ds = ds.map_batches(
        cls,
        batch_format="pyarrow",
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cpus_per_actor,
        num_gpus=0 if device == "cpu" else 1,
        fn_constructor_kwargs={**kwargs, "threads": max(1, int(cpus_per_actor))},
    )
    ds.context.enable_progress_bars = False
    ds.context.print_on_execution_start = False
    # all N actors up before the first chunk: Ray's default starts work on the first one ready, which on a small
    # input leaves the others idle; a pool the cluster cannot place fails here instead of waiting forever
    ds.context.wait_for_min_actors_s = ACTOR_START_S
    with warnings.catch_warnings():  # deprecated for Ray Data's own choice, which sends all to the reading node
        warnings.simplefilter("ignore")
        ds.context.execution_options.actor_locality_enabled = False  # blocks to the least busy replica
    return ds


def _ray_results(
    model: Location,
    data: Location,
    shards: list[ShardRecord],
    mode: str,
    actors: int,
    device: str,
    batch_events: int,
    max_points: int,
    limits: list,
    cpus_per_actor: float,
) -> Iterator[pa.Table]:
    """Result tables of every chunk, as the actor pool finishes them (any order)."""
    import ray.data

    from raysvc.inference.featurize import usable_device

    device = str(usable_device(device))  # a missing CUDA device is an error here, before any actor starts
    ds = ray.data.from_items(
        [{_SHARD: i, **asdict(r)} for i, r in enumerate(shards)], override_num_blocks=max(len(shards), 1)
    )
    # One row, one block: Ray Data hands a whole block to one actor, and by default a read task's chunks leave it
    # merged into one block (up to 128 MiB), so the chunks of a shard would all go to one actor and a pool larger
    # than the number of shards would stay partly idle. (A streaming `repartition` after the read does the same but
    # runs as a 1-CPU task that a pool with less than a CPU to spare waits for forever.) Rows are whole chunks both
    # ways, so no chunk is ever split.
    ds.context.target_max_block_size = 1
    ds = ds.map_batches(
        _read_chunks,
        batch_format="pyarrow",
        batch_size=1,
        num_cpus=READ_CPUS,
        fn_kwargs={"data": data, "batch_events": batch_events, "max_points": max_points, "limits": limits},
    )
    kwargs = {
        "model_uri": model.uri,
        "device": device,
        "mode": mode,
        "sources": [data.join(r.name).uri for r in shards],
    }
    ds = actor_pool(ds, _Replica, actors, cpus_per_actor, device, kwargs, batch_size=1)  # a row is a chunk
    yield from ds.iter_batches(batch_size=None, batch_format="pyarrow")


def _local_results(seg: Segmenter, data: Location, shards, mode, batch_events, max_points, limits) -> Iterator:
    for i, rec in enumerate(shards):
        source = data.join(rec.name).uri
        for start, chunk in _shard_chunks(data, rec, limits[i], batch_events, max_points):
            yield i, start, _run_chunk(seg, mode, chunk, source)


def _results(
    model, data, shards, mode, actors, device, batch_events, max_points, limits, log, cpus_per_actor, ran: Counter
) -> Iterator[tuple[int, int, pa.Table]]:
    """(shard, first row, result) of every chunk, from the actor pool (`actors` >= 1, Ray started by the caller) or
    this process (0); `ran` counts the chunks each (Ray node, actor) ran. A progress line counts the events done."""
    from raysvc.console import Progress

    total = sum(r.events if n is None else n for r, n in zip(shards, limits, strict=True))
    if actors == 0:
        results = _local_results(Segmenter(model, device), data, shards, mode, batch_events, max_points, limits)
    else:
        cpus_per_actor = check_room(actors, cpus_per_actor)
        log(
            f"[raysvc] {mode}: {len(shards)} shards through Ray Data, {actors} model actor(s) on {device}, "
            f"{cpus_per_actor:g} CPU each"
        )
        args = (actors, device, batch_events, max_points, limits, cpus_per_actor)
        results = _pool_results(_ray_results(model, data, shards, mode, *args), ran)
    with Progress(mode, total, "events") as bar:
        for shard, row, result in results:
            yield shard, row, result
            bar.update(_events_in(mode, result))


def _pool_results(batches: Iterator[pa.Table], ran: Counter) -> Iterator[tuple[int, int, pa.Table]]:
    for res in batches:
        cols = [res.column(c).to_pylist() for c in (_SHARD, _ROW, _NODE, _ACTOR)]
        for (shard, row, node, actor), result in zip(zip(*cols, strict=True), res.column(_RESULT), strict=True):
            ran[(node, actor)] += 1
            yield shard, row, _from_ipc(result)


def _events_in(mode: str, result: pa.Table) -> int:
    """The input events a chunk's result covers: a prediction per event, or the events a score read."""
    if mode == "predict":
        return result.num_rows
    return sum(json.loads(c).get("read", 0) for c in result.column("counts").to_pylist())


def _checked(model: Location, data: Location):
    """(the dataset's manifest, the model's record); refused before any read when the detectors differ."""
    manifest = load_manifest(data)
    _, record = read_model(model)
    if manifest.detector != record.detector:
        raise ValueError(
            f"{data.uri} holds {manifest.detector} events; the model {model.uri} was trained on "
            f"{record.detector} events"
        )
    return manifest, record


def predict_dataset(
    model: Location,
    data: Location,
    out: Location,
    batch_events: int = 8,
    device: str = "cpu",
    actors: int = 0,
    max_points: int = 400_000,
    cpus_per_actor: float | None = None,
    log=print,
) -> dict:
    """Predict every event of `data` into `out` (see the module doc); returns the manifest written."""
    t0 = time.perf_counter()
    manifest, record = _checked(model, data)
    outputs = output_names(record, model)
    shards = manifest.shards
    limits = [None] * len(shards)
    pending: dict[int, list[tuple[int, pa.Table]]] = {i: [] for i in range(len(shards))}
    got = Counter()
    files: list[dict] = [{}] * len(shards)
    ran: Counter = Counter()
    args = (actors, device, batch_events, max_points, limits, log, cpus_per_actor, ran)
    for i, row, part in _results(model, data, shards, "predict", *args):
        pending[i].append((row, part))
        got[i] += part.num_rows
        if got[i] == shards[i].events:  # the shard is complete: its file, rows in input order
            table = pa.concat_tables([t for _, t in sorted(pending.pop(i), key=lambda p: p[0])])
            files[i] = _write_preds(out, i, table)
    missing = [shards[i].name for i in pending if shards[i].events]
    if missing:
        raise RuntimeError(f"predict: no complete predictions for {missing} (got {dict(got)} rows)")
    for i in pending:  # empty shards: an empty file each, so that the output mirrors the input
        files[i] = _write_preds(out, i, preds_schema(record, outputs).empty_table())
    info = {
        "model": model.uri,
        "data": data.uri,
        "files": [f["name"] for f in files],
        "shards": files,
        "events": sum(f["events"] for f in files),
        "points": sum(f["points"] for f in files),
        "actors": actors,
        "actor_nodes": len({node for node, _ in ran}),  # Ray nodes the model actors ran on
        "chunks_per_actor": sorted(ran.values(), reverse=True),  # how evenly the pool shared the work
        "device": device,
        "seconds": time.perf_counter() - t0,
    }
    for name in outputs:  # what an output's columns mean (event heads: `event_classes`)
        info |= get_output(name).manifest(record)
    write_bytes_atomic(out.join("manifest.json"), json.dumps(info, indent=2).encode())
    return info


def split_chunks(res: pa.Table) -> Iterator[tuple[int, int, pa.Table]]:
    """(shard, first row, rows) of each chunk in a result batch (Ray Data may have merged several)."""
    tags = np.stack([res.column(_SHARD).to_numpy(), res.column(_ROW).to_numpy()], 1)
    cuts = np.flatnonzero(np.any(np.diff(tags, axis=0) != 0, axis=1)) + 1
    for a, b in zip(np.concatenate([[0], cuts]), np.concatenate([cuts, [len(tags)]]), strict=True):
        yield int(tags[a, 0]), int(tags[a, 1]), res.slice(a, b - a).drop_columns([_SHARD, _ROW])


def _write_preds(out: Location, i: int, table: pa.Table) -> dict:
    name = f"preds-{i:05d}.parquet"
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    data = sink.getvalue().to_pybytes()
    write_bytes_atomic(out.join(name), data)
    points = int(pa.compute.sum(table.column("num_points")).as_py() or 0)
    return {
        "name": name,
        "events": table.num_rows,
        "points": points,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }


def evaluate_dataset(
    model: Location,
    data: Location,
    batch_events: int = 4,
    device: str = "cpu",
    max_events: int | None = None,
    actors: int = 0,
    max_points: int = 400_000,
    cpus_per_actor: float | None = None,
    log=print,
) -> dict:
    """Score an exported model on a labelled dataset as its training run's validation does: the events that pass the
    model's own preprocessing cuts, every point above the energy threshold. Metrics (IoU / precision / recall / F1,
    mIoU, accuracy, confusion) plus what the cuts removed, counted. `max_events`: the first N events in shard
    order."""
    manifest, record = _checked(model, data)
    shards, limits, before = manifest.shards, [], 0
    for rec in shards:
        limits.append(None if max_events is None else max(0, min(rec.events, max_events - before)))
        before += rec.events
    if max_events is not None:
        keep = [i for i, n in enumerate(limits) if n]
        shards, limits = [shards[i] for i in keep], [limits[i] for i in keep]
    names = list(record.class_names)
    matrix = np.zeros((len(names), len(names)), np.int64)
    removed: Counter = Counter()
    args = (actors, device, batch_events, max_points, limits, log, cpus_per_actor, Counter())
    outputs = output_names(record, model)
    states: dict[str, list] = {name: [] for name in outputs}  # each output's evaluation state per chunk
    for _, _, res in _results(model, data, shards, "score", *args):
        cols = [res.column(c).to_pylist() for c in ("cm", "counts", "outputs")]
        for cm, counts, chunk_states in zip(*cols, strict=True):
            matrix += np.asarray(cm, np.int64).reshape(matrix.shape)
            removed.update(json.loads(counts))
            for name, state in json.loads(chunk_states).items():
                states[name].append(state)
    counts = {k: v for k, v in report(removed).items() if k != "task_seconds"}
    log(f"[raysvc] evaluated {counts.get('events_read', 0)} events ({counts.get('events_out', 0)} scored)")
    out = {"model": model.uri, "data": data.uri, "events": counts, **compute(matrix, names)}
    for name in outputs:  # each output's figures, as its training run's validation reports them
        out |= get_output(name).merge(record, states[name])
    return out
