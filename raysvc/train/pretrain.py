"""`raysvc pretrain`: the driver of a Panda pretraining run.

Checks on the driver first (config, both datasets with every shard preflighted, storage), then a TorchTrainer runs
`pretrain_loop` on `scaling.workers` workers at `run.storage/run.name` (the same name resumes). At the end it writes
beside the checkpoints: the exported student backbone (`backbone.safetensors` + `config.json`, what `raysvc finetune
--set model.init=DIR` loads), `summary.json` (probe: pretrained vs random-init mIoU and the curve; losses; collapse
monitors; data counts) and `probe.png` / `curves.png`.
"""

from __future__ import annotations

import json
import time

from raysvc.data.pipeline import prepare
from raysvc.data.schema import CLASS_NAMES
from raysvc.storage import absolute_uri, ensure_dir, resolve, write_bytes_atomic
from raysvc.train.driver import data_report, fit
from raysvc.train.export import save_model
from raysvc.train.plots import pretrain_png
from raysvc.train.pretrain_config import PretrainConfig


def run_pretrain(cfg: PretrainConfig, log=print, fault: dict | None = None) -> dict:
    """Run (or resume) the job and export the student backbone. `fault` ({"step": n, "marker": path}) makes rank 0
    raise once at step n (the fault-tolerance tests' hook)."""
    from raysvc.train.pretrain_loop import pretrain_loop

    t0 = time.time()
    cfg = cfg.model_copy(deep=True)
    cfg.data.uri, cfg.run.storage = absolute_uri(cfg.data.uri), absolute_uri(cfg.run.storage)
    if cfg.probe_data is not None:
        cfg.probe_data.uri = absolute_uri(cfg.probe_data.uri)
    train_prep = prepare(cfg.data)
    probe_prep = prepare(cfg.probe_data) if cfg.probe_data is not None else None
    storage_root = resolve(cfg.run.storage)
    ensure_dir(storage_root)
    run_loc = storage_root.join(cfg.run.name)
    log(f"[raysvc] pretraining {cfg.model.size} Panda on {cfg.data.uri} ({train_prep.manifest.events} events), "
        f"{cfg.train.steps} steps x {cfg.train.batch_events} events, {cfg.scaling.workers} worker(s)")  # fmt: skip
    state = fit(pretrain_loop, {"job": cfg.model_dump(mode="json"), "train_data": train_prep, "probe_data": probe_prep,
                                "fault": fault}, cfg.scaling, cfg.run, storage_root)  # fmt: skip
    history = state["history"]
    backbone = {k.removeprefix("backbone."): v for k, v in state["student"].items() if k.startswith("backbone.")}
    config_json = {"kind": "panda-backbone", "model": {**cfg.model.model_dump(mode="json"),
                                                       "grid_voxels": cfg.grid_voxels, "center_events": True},
                   "preprocess": cfg.data.preprocess.model_dump(mode="json"), "step": state["step"]}  # fmt: skip
    save_model(run_loc, backbone, config_json, weights_name="backbone.safetensors")
    probes = history["probe"]
    probe = None
    if probes:
        last = probes[-1]
        base = probes[0] if probes[0]["step"] == 0 else None  # the random initialisation, when probed
        keys = ("iou", "f1", "mf1", "accuracy")
        probe = {"pretrained_miou": last["miou"], "pretrained": {k: last[k] for k in keys},
                 "random_miou": None, "gain": None, "random": None,
                 "curve": [[p["step"], p["miou"]] for p in probes], "classes": list(CLASS_NAMES)}
        if base is not None:
            probe.update(random_miou=base["miou"], gain=last["miou"] - base["miou"], random={k: base[k] for k in keys})
        write_bytes_atomic(run_loc.join("probe.png"), pretrain_png(history, f"{cfg.run.name}: linear probe",
                                                                   probe_only=True))  # fmt: skip
    write_bytes_atomic(run_loc.join("curves.png"), pretrain_png(history, f"{cfg.run.name}: {cfg.model.size} Panda"))
    summary = {"run": cfg.run.name, "uri": run_loc.uri, "steps": state["step"], "workers": cfg.scaling.workers,
               "probe": probe, "last_monitor": history["monitor"][-1] if history["monitor"] else None,
               "history": history, "data": data_report(state, train_prep), "wall_s": time.time() - t0,
               "config": cfg.model_dump(mode="json")}  # fmt: skip
    write_bytes_atomic(run_loc.join("summary.json"), json.dumps(summary, indent=2).encode())
    return summary
