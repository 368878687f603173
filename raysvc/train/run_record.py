"""The per-run JSON a result is rebuilt from (`results/<experiment>/runs/NAME.json`, docs/results.md).

Top-level keys, exactly: `config` (what ran), `seeds` (fine-tune, label subset, pretraining, data), `split` (per role
the dataset and its event ids by origin: raysvc.data.streaming.splits), `metrics` (per role the metrics with per-class
figures, plus `load_avg`: the machine's 1 / 5 / 15-minute load at the start and the end), `git_commit` and `wall_s`.
Paths in it are relative to the working directory: a record holds no machine's directory layout.

A split is checked before anything runs: `guarded_split` refuses a test set that shares events with training or
validation (and a validation set that shares events with training).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from urllib.parse import urlparse

from raysvc.data.streaming.config import DataConfig
from raysvc.data.streaming.splits import check_disjoint, describe, event_set
from raysvc.storage import read_bytes, resolve, write_bytes_atomic

KEYS = ("config", "seeds", "split", "metrics", "git_commit", "wall_s")


def portable(obj, base: str | None = None):
    """`obj` (JSON-like) with every absolute path or file:// URI string made relative to `base` (default: the working
    directory), so that a committed record names no machine's directories: a path outside it keeps only its last two
    parts, after "<outside>/"; s3:// and relative paths stay."""
    if isinstance(obj, dict):
        return {k: portable(v, base) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [portable(v, base) for v in obj]
    if not isinstance(obj, str):
        return obj
    parsed = urlparse(obj)
    if parsed.scheme == "file":
        local = parsed.path
    elif parsed.scheme == "" and os.path.isabs(obj):
        local = obj
    else:
        return obj
    base, local = os.path.abspath(base or os.getcwd()), os.path.abspath(local)
    if local == base or local.startswith(base.rstrip(os.sep) + os.sep):
        return os.path.relpath(local, base)
    return "<outside>/" + "/".join(local.split(os.sep)[-2:])  # the name without the machine's layout


def git_commit() -> str | None:
    """The checkout's commit (with "-dirty" when tracked files differ from it), or None outside a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if head.returncode:
            return None
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=here, capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return head.stdout.strip() + ("-dirty" if dirty.returncode else "")


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def guarded_split(data: dict[str, DataConfig], ids: dict[str, list[int]] | None = None) -> dict:
    """The split of a run ({role: its data section}; `ids`: {role: only these events of it}) as a record stores it,
    after the overlap guard passed."""
    ids = ids or {}
    sets = {role: event_set(d, portable(d.uri), ids.get(role)) for role, d in data.items()}
    check_disjoint(sets)
    return describe(sets)


def job_split(config: dict, test: DataConfig | None = None) -> dict[str, DataConfig]:
    """{role: data section} of a fine-tuning job's config (as summary.json stores it), plus the `test` data."""
    out = {"train": DataConfig.model_validate(config["data"])}
    if config.get("val_data"):
        out["validation"] = DataConfig.model_validate(config["val_data"])
    return out | ({"test": test} if test is not None else {})


def job_seeds(config: dict) -> dict:
    """The seeds of a fine-tuning job: its own, its label subset's, the pretraining run's of `model.init` (read from
    that run's summary.json when there is one) and the generator seeds of its data."""
    data = config["data"]
    seeds = {"finetune": config["train"]["seed"]}
    if data.get("subset_events") is not None or data.get("subset_fraction") is not None:
        seeds["subset"] = data["subset_seed"]
    init = (config.get("model") or {}).get("init")
    if init and config["model"].get("mode") != "scratch":
        seeds["pretrain"] = run_seed(init)
    return seeds


def run_seed(run_uri: str) -> int | None:
    try:
        summary = json.loads(read_bytes(resolve(run_uri).join("summary.json")))
    except Exception:  # an export without its run's summary (copied, downloaded): the seed is unknown
        return None
    return summary.get("config", {}).get("train", {}).get("seed")


def data_seeds(split: dict) -> dict:
    """{role: the origins of its events} from a described split: which generator seeds (or files) each role used."""
    return {role: [o["origin"] for o in s["origins"]] for role, s in split.items()}


def record(config: dict, seeds: dict, split: dict, metrics: dict, wall_s: float, load_start: list[float]) -> dict:
    """A run record: the six keys, paths made portable, the load at start and end inside `metrics`."""
    return {
        "config": portable(config),
        "seeds": seeds | {"data": data_seeds(split)},
        "split": split,
        "metrics": portable(metrics) | {"load_avg": {"start": load_start, "end": load_avg()}},
        "git_commit": git_commit(),
        "wall_s": round(wall_s, 1),
    }


def write_record(path: str | Path, rec: dict) -> None:
    if tuple(rec) != KEYS:
        raise ValueError(f"a run record has the keys {KEYS}, got {tuple(rec)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(resolve(str(path.resolve())), (json.dumps(rec, indent=1) + "\n").encode())
