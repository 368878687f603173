"""Run a grid of trials with Ray Tune, resumably: a sweep whose experiment directory already exists continues it
(`Tuner.restore`: finished and failed trials are kept, unfinished ones run), as long as its grid is the same.

Each trial's parameters are one dict of the grid (`param_space={"trial": grid_search(trials)}`), named by its
`name` key, so that results, failures and directories read as the grid does. A trial that raises is reported
failed with its error; the others run on (FailureConfig.fail_fast stays off).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from ray import tune

from raysvc.console import Progress, own_output_to_log
from raysvc.ray_init import init_ray
from raysvc.storage import Location, ensure_dir, exists, read_bytes, write_bytes_atomic
from raysvc.sweep.spec import TuneSection

GRID_FILE = "sweep-grid.json"


@dataclass
class TrialOutcome:
    trials: list[dict] = field(default_factory=list)  # {"trial": params, "metrics": {...}} of finished trials
    failed: list[dict] = field(default_factory=list)  # {"trial": params, "error": "...", "traceback": "..."}
    resumed: bool = False


class TrialProgress(tune.Callback):
    """The sweep's progress line (trials done / failed / running) in place of Tune's status tables. Its state is made
    in `setup`, at the start of each fit: Tune pickles its callbacks with the experiment and restores them on
    resume."""

    def __init__(self, desc: str):
        self.desc = desc

    def setup(self, total_num_samples: int = 0, **info) -> None:
        self.bar = Progress(self.desc, total_num_samples or None, "trials")
        self.running, self.failed = set(), 0

    def _note(self) -> str:
        return f"{len(self.running)} running" + (f", {self.failed} failed" if self.failed else "")

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.running.add(trial.trial_id)
        self.bar.update(0, self._note())

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.running.discard(trial.trial_id)
        self.bar.update(1, self._note())

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.running.discard(trial.trial_id)
        self.failed += 1
        self.bar.update(1, self._note())

    def on_experiment_end(self, trials, **info) -> None:
        self.bar.close()


def _trial_name(trial) -> str:
    return str(trial.config["trial"]["name"])


def error_text(err: BaseException) -> tuple[str, str]:
    """(the trial's own exception as "ValueError: ...", not Ray's wrapper around it; Ray's traceback, uncoloured)."""
    cause = getattr(err, "cause", None) or err
    return f"{type(cause).__name__}: {cause}", re.sub(r"\x1b\[[0-9;]*m", "", str(err))


def run_grid(fn, trials: list[dict], tune_cfg: TuneSection, exp: Location, log=print, **shared) -> TrialOutcome:
    """Run (or resume) the function trainable `fn(config, **shared)` once per dict of `trials` under the experiment
    directory `exp`; `shared` objects go to every trial through Ray's object store (`tune.with_parameters`)."""
    import ray

    names = [t["name"] for t in trials]
    if len(set(names)) != len(names):
        raise ValueError(f"trial names must be unique: {sorted(n for n in names if names.count(n) > 1)}")
    if not ray.is_initialized():
        init_ray(logging_level="WARNING")
    grid_loc = exp.join(GRID_FILE)
    fs = exp.fs if exp.is_s3 else None
    resources = tune.PlacementGroupFactory([{"CPU": tune_cfg.cpus_per_trial}])
    trainable = tune.with_resources(tune.with_parameters(fn, **shared), resources)
    resumed = exists(grid_loc) and tune.Tuner.can_restore(exp.path, storage_filesystem=fs)
    if resumed:
        before = json.loads(read_bytes(grid_loc))
        if before != trials:
            raise ValueError(
                f"{exp.uri} holds a sweep with another grid; give the sweep a new name (or delete "
                f"the directory) to start over"
            )
        log(f"[raysvc] resuming sweep {exp.uri}: finished and failed trials are kept")
        tuner = tune.Tuner.restore(
            exp.path,
            trainable,
            resume_unfinished=True,
            resume_errored=False,
            restart_errored=False,
            storage_filesystem=fs,
        )
    else:
        ensure_dir(exp)
        write_bytes_atomic(grid_loc, json.dumps(trials, indent=1).encode())
        storage_root, name = exp.path.rstrip("/").rsplit("/", 1)
        tuner = tune.Tuner(
            trainable,
            param_space={"trial": tune.grid_search(trials)},
            tune_config=tune.TuneConfig(
                max_concurrent_trials=tune_cfg.max_concurrent_trials,
                trial_name_creator=_trial_name,
                trial_dirname_creator=_trial_name,
            ),
            run_config=tune.RunConfig(
                name=name,
                storage_path=storage_root,
                storage_filesystem=fs,
                failure_config=tune.FailureConfig(max_failures=tune_cfg.max_failures),
                verbose=0,
                callbacks=[TrialProgress(f"sweep {name}")],
            ),
        )
    with own_output_to_log():  # Tune's tables: TrialProgress says what they say in one line
        grid = tuner.fit()
    out = TrialOutcome(resumed=resumed)
    by_name = {t["name"]: t for t in trials}
    for result in grid:
        # a restored trial that never reported has no config: its directory (named after the trial) says which
        params = by_name[result.path.rstrip("/").rsplit("/", 1)[-1]]
        if result.error is not None:
            message, tb = error_text(result.error)
            out.failed.append({"trial": params, "error": message, "traceback": tb})
        elif result.metrics:
            out.trials.append({"trial": params, "metrics": dict(result.metrics)})
        else:
            out.failed.append({"trial": params, "error": "finished without reporting a result"})
    order = {n: i for i, n in enumerate(names)}
    out.trials.sort(key=lambda r: order.get(r["trial"]["name"], len(order)))
    out.failed.sort(key=lambda r: order.get(r["trial"]["name"], len(order)))
    for f in out.failed:
        log(f"[raysvc] trial {f['trial']['name']} FAILED: {f['error'][:300]}")
    return out
