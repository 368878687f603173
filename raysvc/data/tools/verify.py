"""`raysvc data verify`: every shard against its manifest record and every event against the data contract, which
includes naming the manifest's detector in its `detector` column."""

from __future__ import annotations

from raysvc.data.contract.schema import EventDataError, check_columns, find_problems
from raysvc.data.streaming.shards import load_manifest, read_shard
from raysvc.storage import Location

MAX_LISTED = 50


def verify_dataset(root: Location) -> dict:
    """Read all shards (size, sha256, Parquet, schema) and list bad events by shard, row, event id and field."""
    manifest = load_manifest(root)
    detector = manifest.detector_spec
    problems: list[dict] = []
    bad_shards: list[dict] = []
    bad_events = 0
    for rec in manifest.shards:
        uri = root.join(rec.name).uri
        try:
            table = check_columns(read_shard(root, rec), uri)
        except EventDataError as e:
            bad_shards.append({"shard": uri, "kind": e.kind, "message": str(e)})
            bad_events += rec.events
            continue
        found = find_problems(table, detector=detector)
        bad_events += len(found)
        problems.extend(
            {"shard": uri, "row": p.row, "event_id": p.event_id, "field": p.field, "kind": p.kind, "message": p.message}
            for p in found[: MAX_LISTED - len(problems)]
        )
    return {
        "uri": root.uri,
        "detector": detector.name,
        "shards": len(manifest.shards),
        "events": manifest.events,
        "bad_shards": bad_shards,
        "bad_events": bad_events,
        "problems": problems,
        "problems_listed": len(problems),
    }
