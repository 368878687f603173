"""One command per experiment: `raysvc results run results/<name>` reads its `experiment.yaml` and runs every run of
it (docs/results.md), writing one run record per fine-tune to `results/<name>/runs/NAME.json`.

The spec names the datasets (generated when missing, each from its own generator seed), the backbones to pretrain
(once per pretraining seed), the fine-tuning job, the arms (each a set of overrides, with or without a backbone), the
factors every arm runs at (e.g. labelled events) and the fine-tune seeds. A run: fine-tune on train, validated on
validation, then `evaluate` on test; the split guard runs before the fine-tune starts. Runs whose record exists are
skipped, so re-running the command resumes the experiment. `--dry-run` lists the runs and writes nothing.

Overrides are templates: {seed}, {pretrain_seed}, {backbone} (the arm's backbone export for the pretraining seed),
{data.NAME} (a dataset's uri) and {FACTOR} (the factor's value, e.g. {labels}).
"""

from __future__ import annotations

import itertools
import json
import shlex
import time
from pathlib import Path
from types import SimpleNamespace

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from raysvc.config import ConfigError
from raysvc.data.streaming.config import DataConfig
from raysvc.data.streaming.shards import MANIFEST, load_manifest
from raysvc.storage import exists, read_bytes, resolve
from raysvc.train.run_record import (
    guarded_split,
    job_seeds,
    job_split,
    load_avg,
    record,
    run_seed,
    write_record,
)

SPEC = "experiment.yaml"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DatasetSpec(_Strict):
    uri: str
    detector: str = "lartpc"
    events: int = Field(gt=0)
    seed: int
    shard_events: int = Field(500, gt=0)
    set: list[str] = Field(default_factory=list, description="generator settings (`raysvc data generate --set`)")


class JobSpec(_Strict):
    job: str = Field(description="job YAML, relative to the working directory")
    set: list[str] = Field(default_factory=list)


class PretrainSpec(JobSpec):
    run_name: str = Field(
        "{experiment}-pretrain-{backbone}-p{pretrain_seed}",
        description="the pretraining run's name: experiments that name the same run share the backbone",
    )


class ArmSpec(_Strict):
    backbone: str | None = Field(None, description="a key of `pretrain`: fine-tune from its export")
    set: list[str] = Field(default_factory=list)


class FactorSpec(_Strict):
    values: list
    set: list[str]


class SeedSpec(_Strict):
    finetune: list[int] = Field(min_length=1)
    pretrain: list[int] = Field(default_factory=lambda: [0])


class TestSpec(_Strict):
    data: str = Field(description="a key of `data`: the test set")
    batch_events: int = Field(4, gt=0)


class ProbeSpec(_Strict):
    """Both probes (per-point linear, token SVM) of each backbone x pretraining seed: the first `train_events`
    events of `fit_data` fit them and the first `val_events` of `data` are scored; without `fit_data`, the first and
    next events of `data` (nothing is chosen on the scored events either way)."""

    data: str = Field(description="a key of `data`: the scored events (the test split)")
    fit_data: str | None = Field(None, description="a key of `data`: the fitting events (the validation split)")
    backbones: list[str] | None = Field(None, description="keys of `pretrain` (default: all)")
    train_events: int = Field(100, gt=0)
    val_events: int = Field(100, gt=0)
    points_per_class: int = Field(4000, gt=0)


class ExperimentSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    storage: str = Field("runs", description="where the training runs live (not committed)")
    data: dict[str, DatasetSpec]
    split: dict[str, str] = Field(description="train / validation / test -> a key of `data`")
    pretrain: dict[str, PretrainSpec] = Field(default_factory=dict)
    finetune: JobSpec
    arms: dict[str, ArmSpec] = Field(min_length=1)
    factors: dict[str, FactorSpec] = Field(default_factory=dict)
    seeds: SeedSpec
    test: TestSpec
    probes: ProbeSpec | None = None
    tables: list = Field(default_factory=list, description="read by `raysvc results table` (raysvc.reports)")
    plots: list = Field(default_factory=list, description="read by `raysvc results table` (raysvc.reports)")

    @model_validator(mode="after")
    def _refs(self) -> ExperimentSpec:
        if set(self.split) != {"train", "validation", "test"}:
            raise ValueError(f"split must name train, validation and test, got {sorted(self.split)}")
        for role, key in self.split.items():
            if key not in self.data:
                raise ValueError(f"split.{role}: {key!r} is not a key of data ({sorted(self.data)})")
        if self.test.data != self.split["test"]:
            raise ValueError(f"test.data is {self.test.data!r} but split.test is {self.split['test']!r}")
        for name, arm in self.arms.items():
            if arm.backbone is not None and arm.backbone not in self.pretrain:
                raise ValueError(f"arms.{name}.backbone: {arm.backbone!r} is not a key of pretrain")
        if self.probes is not None:
            for key in ("data", "fit_data"):
                value = getattr(self.probes, key)
                if value is not None and value not in self.data:
                    raise ValueError(f"probes.{key}: {value!r} is not a key of data ({sorted(self.data)})")
            unknown = [b for b in self.probes.backbones or [] if b not in self.pretrain]
            if unknown:
                raise ValueError(f"probes.backbones: {unknown} are not keys of pretrain")
        return self


def load_spec(folder: str | Path) -> ExperimentSpec:
    path = Path(folder) / SPEC
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read the experiment spec ({e})") from e
    try:
        return ExperimentSpec.model_validate(raw)
    except ValueError as e:
        raise ConfigError(f"{path}: {e}") from e


def _fill(templates: list[str], values: dict) -> list[str]:
    try:
        return [t.format(**values) for t in templates]
    except (KeyError, IndexError) as e:
        raise ConfigError(f"override template {templates}: no value for {e} (known: {sorted(values)})") from e


def plan(spec: ExperimentSpec) -> list[dict]:
    """Every run of the experiment, in order: pretraining runs first, then one fine-tune + test per arm x factor
    values x pretraining seed (arms with a backbone) x fine-tune seed. Each: {"name", "kind", "job", "set", ...}."""
    base = {"data": SimpleNamespace(**{k: d.uri for k, d in spec.data.items()})}  # {data.NAME} in templates
    runs: list[dict] = []
    backbones: dict[tuple[str, int], str] = {}
    for bb, job in spec.pretrain.items():
        for ps in spec.seeds.pretrain:
            name = job.run_name.format(experiment=spec.name, backbone=bb, pretrain_seed=ps)
            sets = _fill(job.set, base | {"pretrain_seed": ps})
            sets += [f"train.seed={ps}", f"run.name={name}", f"run.storage={spec.storage}"]
            runs.append({"name": name, "kind": "pretrain", "job": job.job, "set": sets})
            backbones[(bb, ps)] = f"{spec.storage}/{name}"
    grid = list(itertools.product(*(f.values for f in spec.factors.values())))
    for arm_name, arm in spec.arms.items():
        for combo in grid:
            factors = dict(zip(spec.factors, combo, strict=True))
            for ps in spec.seeds.pretrain if arm.backbone else [None]:
                for seed in spec.seeds.finetune:
                    parts = [arm_name, *(f"{k}{v}" for k, v in factors.items())]
                    parts += [f"p{ps}"] if ps is not None else []
                    name = "-".join([*parts, f"s{seed}"])
                    values = base | factors | {"seed": seed, "pretrain_seed": ps}
                    if arm.backbone:
                        values["backbone"] = backbones[(arm.backbone, ps)]
                    sets = _fill(spec.finetune.set, values) + _fill(arm.set, values)
                    for f in spec.factors.values():
                        sets += _fill(f.set, values)
                    if arm.backbone:
                        sets.append(f"model.init={values['backbone']}")
                    sets += [f"train.seed={seed}", f"run.name={spec.name}-{name}", f"run.storage={spec.storage}"]
                    about = {"arm": arm_name, "factors": factors, "seed": seed, "pretrain_seed": ps}
                    runs.append({"name": name, "kind": "finetune", "job": spec.finetune.job, "set": sets, **about})
    runs += _probe_runs(spec, backbones)
    names = [r["name"] for r in runs]
    if len(set(names)) != len(names):
        raise ConfigError(f"experiment {spec.name}: two runs share a name; make arm names distinct")
    return runs


def _probe_runs(spec: ExperimentSpec, backbones: dict[tuple[str, int], str]) -> list[dict]:
    """One probe run per probed backbone x pretraining seed; its `job` is the backbone's export."""
    p, runs = spec.probes, []
    if p is None:
        return runs
    for bb in p.backbones or list(spec.pretrain):
        for ps in spec.seeds.pretrain:
            init = backbones[(bb, ps)]
            fit = f" --fit-data {spec.data[p.fit_data].uri}" if p.fit_data else ""
            command = (
                f"raysvc probe {init} --data {spec.data[p.data].uri}{fit} --train-events {p.train_events} "
                f"--val-events {p.val_events} --seed {ps}"
            )
            about = {"arm": f"probe-{bb}", "factors": {}, "seed": ps, "pretrain_seed": ps}
            runs.append({"name": f"probe-{bb}-p{ps}", "kind": "probe", "job": init, "command": command, **about})
    return runs


def _generate(spec: ExperimentSpec, log) -> None:
    from raysvc.config import load_config
    from raysvc.data.sources.synthetic import generate_dataset, generator_for

    for key, d in spec.data.items():
        loc = resolve(d.uri)
        if exists(loc.join(MANIFEST)):  # made before: it must be what the spec says, or the split would lie
            made = load_manifest(loc).created_by
            want = {"tool": "raysvc data generate", "seed": d.seed, "events": d.events, "detector": d.detector}
            got = {k: made.get(k) for k in want}
            if got != want:
                raise ConfigError(
                    f"data.{key}: {d.uri} exists but was not generated as the spec says (manifest {got}, spec "
                    f"{want}); move it away or point data.{key}.uri elsewhere"
                )
            continue
        log(f"[raysvc] generating data.{key}: {d.events} {d.detector} events, seed {d.seed} -> {d.uri}")
        cfg = load_config(generator_for(d.detector)[0], None, d.set)
        generate_dataset(loc, d.events, d.seed, d.shard_events, cfg, detector=d.detector)


def _materialise_subset(job, storage: str, log) -> dict:
    """A job that picks a label subset of its training data reads it as a dataset of its own (`raysvc data subset`,
    under `storage`/data/): a 10-event subset then reads 10 events an epoch, not the whole set. The same events (the
    subset keeps its source's identity for the split guard); returns the subset seed for the record."""
    from raysvc.data.streaming.subset import write_subsets

    data = job.data
    if data.subset_events is None:
        return {}
    name = f"{Path(data.uri.rstrip('/')).name}-{data.subset_events}-s{data.subset_seed}"
    target = f"{storage}/data/{name}"
    write_subsets(
        data.location(), {data.subset_events: resolve(target)}, data.subset_seed, job.scaling.workers, log=log
    )
    seeds = {"subset": data.subset_seed}
    job.data = data.model_copy(update={"uri": target, "subset_events": None})
    return seeds


def finetune_with_record(
    job,
    path: str | Path,
    test: DataConfig | None = None,
    about: dict | None = None,
    batch_events: int = 4,
    log=print,
    seeds: dict | None = None,
) -> dict:
    """Run a fine-tuning job (its split checked first), then score its export on `test` when given; write the run
    record to `path` (`about`: the run's place in its experiment; `seeds`: seeds the job config no longer shows).
    Returns the job's summary."""
    from raysvc.inference.batch import evaluate_dataset
    from raysvc.train.driver import run_job

    t0, load_start = time.time(), load_avg()
    config = job.model_dump(mode="json")
    split = guarded_split(job_split(config, test))  # refuses before any training
    summary = run_job(job, log=log)
    losses = [[h["step"], h["loss"]] for h in summary["history"].get("train", []) if "loss" in h]
    metrics = {"validation": summary.get("val"), "train_loss": losses}
    if test is not None:
        metrics["test"] = evaluate_dataset(resolve(summary["uri"]), test.location(), batch_events, actors=0, log=log)
    cfg = {"job": summary["config"], "run": summary["uri"], "steps": summary["steps"]}
    if about:
        cfg = {"experiment": about} | cfg
    if test is not None:
        cfg["test"] = {"data": test.uri, "batch_events": batch_events}
    seeds = job_seeds(summary["config"]) | (seeds or {})
    write_record(path, record(cfg, seeds, split, metrics, time.time() - t0, load_start))
    return summary


def evaluate_with_record(model: str, test: DataConfig, path: str | Path, evaluate) -> dict:
    """`evaluate()` (the scoring of the export `model` on `test`) with its run record written to `path`: the split is
    the fine-tuning run's training and validation sets (from its summary.json) plus `test`, refused on any overlap
    before scoring. Returns what `evaluate` returned."""
    try:
        summary = json.loads(read_bytes(resolve(model).join("summary.json")))
    except Exception as e:
        raise FileNotFoundError(
            f"{model}: no readable summary.json ({e}); a run record needs the fine-tuning run's split"
        ) from e
    t0, load_start = time.time(), load_avg()
    split = guarded_split(job_split(summary["config"], test))
    result = evaluate()
    cfg = {"job": summary["config"], "run": model, "steps": summary["steps"], "test": {"data": test.uri}}
    metrics = {"validation": summary.get("val"), "test": result}
    write_record(path, record(cfg, job_seeds(summary["config"]), split, metrics, time.time() - t0, load_start))
    return result


def probe_record(
    args: dict, result: dict, split_ids: dict, path: str | Path, wall_s: float, load_start: list[float]
) -> None:
    """The run record of a `raysvc probe` (its options `args`, its `result`): the first events of its data (or of
    its fit data) fit the probes (train), the next (or first) ones of its data score them (test; nothing is chosen
    on them: C is fixed)."""
    data = DataConfig(uri=args["data"])
    fit = DataConfig(uri=args["fit_data"]) if args.get("fit_data") else data
    split = guarded_split({"train": fit, "test": data}, split_ids)
    config = {k: v for k, v in args.items() if k not in ("fn", "run_record", "out", "verbose")}
    config.pop("command", None)
    seeds = {"probe": args["seed"]} | ({"pretrain": run_seed(args["init"])} if args.get("init") else {})
    metrics = {"test": {"point": result["point"], "token": result["token"]}}
    write_record(path, record(config, seeds, split, metrics, wall_s, load_start))


def _probe(spec: ExperimentSpec, r: dict, path: Path, log) -> None:
    """Both probes of one pretraining run's backbone (`r["job"]`), in this process, and their record."""
    from raysvc.train.backbone_probe import probe_backbone
    from raysvc.train.probe import ProbeConfig
    from raysvc.train.token_probe import TokenProbeConfig

    p = spec.probes
    events = {"train_events": p.train_events, "val_events": p.val_events}
    t0, load_start, ids = time.time(), load_avg(), {}
    data = spec.data[p.data].uri
    fit = spec.data[p.fit_data].uri if p.fit_data else None
    result = probe_backbone(
        r["job"],
        DataConfig(uri=data),
        point=ProbeConfig(**events, points_per_class=p.points_per_class),
        token=TokenProbeConfig(**events),
        seed=r["seed"],
        log=log,
        split_ids=ids,
        fit_data=DataConfig(uri=fit) if fit else None,
    )
    about = {"name": spec.name, "run": r["name"], **{k: r[k] for k in ("arm", "factors", "seed", "pretrain_seed")}}
    args = {"experiment": about, "init": r["job"], "data": data, "fit_data": fit, "seed": r["seed"], **events}
    probe_record(args, result, ids, path, time.time() - t0, load_start)


def run_experiment(folder: str | Path, dry_run: bool = False, log=print) -> list[dict]:
    """Run (or resume) every run of the experiment in `folder`; returns the plan. Dry run: only list it."""
    from raysvc.train.driver import load_job, run_job

    folder = Path(folder)
    spec = load_spec(folder)
    runs = plan(spec)
    out = folder / "runs"
    for r in runs:  # a fine-tune is done when its record exists, a pretraining run when its summary does
        if r["kind"] in ("finetune", "probe"):
            r["done"] = (out / f"{r['name']}.json").is_file()
        else:
            r["done"] = exists(resolve(spec.storage).join(r["name"]).join("summary.json"))
    for r in runs:  # every job validates (names, types, values) before anything runs, dry or not
        if r["kind"] != "probe":
            load_job(r["job"], r["set"], "panda" if r["kind"] == "pretrain" else "segmentation")
    if dry_run:
        return runs
    _generate(spec, log)
    test = DataConfig(uri=spec.data[spec.split["test"]].uri)
    for r in runs:
        if r["done"]:
            log(f"[raysvc] {r['name']}: done, skipped")
            continue
        log(f"[raysvc] {r['name']}: {_command(r)}")
        if r["kind"] == "pretrain":
            run_job(load_job(r["job"], r["set"], "panda"), log=log)
            continue
        if r["kind"] == "probe":
            _probe(spec, r, out / f"{r['name']}.json", log)
            continue
        job = load_job(r["job"], r["set"], "segmentation")
        seeds = _materialise_subset(job, spec.storage, log)
        about = {"name": spec.name, "run": r["name"], **{k: r[k] for k in ("arm", "factors", "seed", "pretrain_seed")}}
        finetune_with_record(job, out / f"{r['name']}.json", test, about, spec.test.batch_events, log, seeds)
    return runs


def describe_plan(runs: list[dict]) -> str:
    return "\n".join(f"{'done ' if r['done'] else 'to-do'}  {r['kind']:8s} {r['name']}: {_command(r)}" for r in runs)


def _command(r: dict) -> str:
    """The command line a planned run amounts to."""
    if "command" in r:
        return r["command"]
    sets = " ".join(f"--set {shlex.quote(s)}" for s in r["set"])
    then = " (then raysvc evaluate on the test set)" if r["kind"] == "finetune" else ""
    return f"raysvc {r['kind']} {r['job']} {sets}{then}"
