"""`raysvc finetune`: the driver of a segmentation run.

Everything that can be checked on the driver is checked before a worker starts: the config (by pydantic, naming
the field), both datasets (manifest + preflight of every shard), the storage (created / writable), and `model.init`.
Then a TorchTrainer runs `seg_train_loop` on `scaling.workers` workers; the run lives at `run.storage/run.name`,
where Ray keeps its checkpoints, so re-running with the same name resumes. At the end the driver writes, beside
them: `summary.json`, `curves.png`, and the exported `model.safetensors` + `config.json`.
"""

from __future__ import annotations

import json
import time

import numpy as np

from raysvc.data.pipeline import Prepared, prepare
from raysvc.data.reader import read_preprocessed
from raysvc.data.schema import CLASS_NAMES
from raysvc.storage import Location, absolute_uri, ensure_dir, resolve, write_bytes_atomic
from raysvc.train.driver import data_report, fit
from raysvc.train.export import load_model, save_model
from raysvc.train.job_config import FinetuneConfig
from raysvc.train.losses import class_weights
from raysvc.train.plots import curves_png


def estimate_class_counts(cfg: FinetuneConfig, prep: Prepared, max_shards: int = 2) -> list[int]:
    """Per-class point counts over the first shards of the training data (after the same preprocessing)."""
    counts = np.zeros(len(CLASS_NAMES), np.int64)
    for rec in prep.manifest.shards[:max_shards]:
        table, _, _ = read_preprocessed(prep.root, rec, cfg.data.preprocess, prep.keep_ids, cfg.data.verify_checksums)
        if table.num_rows:
            sem = table.column("semantic").combine_chunks().flatten().to_numpy()
            counts += np.bincount(sem, minlength=len(CLASS_NAMES))[: len(CLASS_NAMES)]
    return counts.tolist()


def preflight(cfg: FinetuneConfig) -> tuple[Prepared, Prepared, Location, dict | None]:
    """Driver-side checks: (train data, validation data, storage root, init state). The prepared datasets (checked
    manifests, subsets) go to the workers, so that the shards are preflighted once, here."""
    train, val = prepare(cfg.data), prepare(cfg.val_data)
    root = resolve(cfg.run.storage)
    ensure_dir(root)
    init_state = None
    if cfg.model.init and cfg.model.mode != "scratch":
        init_state, init_config = load_model(resolve(cfg.model.init))
        init_model = init_config.get("model", {})
        if init_model.get("center_events") and not cfg.model.center_events:
            cfg.model.center_events = True  # the backbone only knows centred events
        if "grid_voxels" in init_model and abs(init_model["grid_voxels"] - cfg.model.grid_voxels) > 1e-3:
            raise ValueError(f"model.grid_voxels {cfg.model.grid_voxels} differs from the grid of "
                             f"{init_model['grid_voxels']} voxels that {cfg.model.init} was trained on")  # fmt: skip
    return train, val, root, init_state


def run_finetune(cfg: FinetuneConfig, log=print, fault: dict | None = None, callbacks: list | None = None) -> dict:
    """Run (or resume) the job and export its result. `fault` ({"step": n, "marker": path}) makes rank 0 raise
    once at step n: the hook the fault-tolerance tests use. `callbacks` go to the Train run (a sweep passes Tune's
    report callback)."""
    from raysvc.train.seg_loop import seg_train_loop

    t0 = time.time()
    cfg = cfg.model_copy(deep=True)
    cfg.data.uri, cfg.val_data.uri = absolute_uri(cfg.data.uri), absolute_uri(cfg.val_data.uri)
    cfg.run.storage, cfg.model.init = absolute_uri(cfg.run.storage), absolute_uri(cfg.model.init)
    train_prep, val_prep, storage_root, init_state = preflight(cfg)
    run_loc = storage_root.join(cfg.run.name)
    counts = estimate_class_counts(cfg, train_prep)
    weights = class_weights(counts, cfg.train.class_weight_power).tolist() if cfg.train.class_weight_power else [
        1.0] * len(CLASS_NAMES)  # fmt: skip
    log(f"[raysvc] class counts (first shards) {dict(zip(CLASS_NAMES, counts, strict=True))}; "
        f"loss weights {[round(w, 3) for w in weights]}")  # fmt: skip
    state = fit(seg_train_loop, {"job": cfg.model_dump(mode="json"), "class_weights": weights, "init_state": init_state,
                                 "train_data": train_prep, "val_data": val_prep, "fault": fault},
                cfg.scaling, cfg.run, storage_root, callbacks)  # fmt: skip
    history = state["history"]
    val = history["val"][-1]["metrics"] if history["val"] else None
    config_json = {"model": cfg.model.model_dump(mode="json"), "num_classes": len(CLASS_NAMES),
                   "class_names": list(CLASS_NAMES), "preprocess": cfg.data.preprocess.model_dump(mode="json"),
                   "step": state["step"]}  # fmt: skip
    save_model(run_loc, state["model"], config_json)
    write_bytes_atomic(run_loc.join("curves.png"), curves_png(history, f"{cfg.run.name}: {cfg.model.size} "
                                                                       f"{cfg.model.mode}"))  # fmt: skip
    summary = {
        "run": cfg.run.name, "uri": run_loc.uri, "steps": state["step"], "workers": cfg.scaling.workers,
        "val": val, "history": history, "class_counts": dict(zip(CLASS_NAMES, counts, strict=True)),
        "class_weights": weights, "data": data_report(state, train_prep), "wall_s": time.time() - t0,
        "config": cfg.model_dump(mode="json"),
    }  # fmt: skip
    write_bytes_atomic(run_loc.join("summary.json"), json.dumps(summary, indent=2).encode())
    return summary
