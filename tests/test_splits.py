"""The split guard on real generated datasets: sets from the same generator seed overlap in their first events
whatever their names, a label subset keeps its source's identity, different seeds never overlap; a run record's
fine-tune and test scoring are refused before anything runs, naming the sets, the seed and the ids."""

from __future__ import annotations

import json

import pytest

from raysvc.data.sources.synthetic import generate_dataset
from raysvc.data.streaming.config import DataConfig
from raysvc.data.streaming.splits import SplitOverlapError, check_disjoint, describe, event_set
from raysvc.data.streaming.subset import write_subsets
from raysvc.storage import resolve
from raysvc.train import experiment
from raysvc.train.driver import load_job
from tests.conftest import make_table


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """train: 30 events of seed 0; val: 12 of seed 1; test-leaky: 10 of seed 0 (= train's first 10); test: 10 of
    seed 2; train-12: a 12-event label subset of train."""
    root = tmp_path_factory.mktemp("splits")
    for name, n, seed in (("train", 30, 0), ("val", 12, 1), ("test-leaky", 10, 0), ("test", 10, 2)):
        generate_dataset(resolve(str(root / name)), n, seed=seed, shard_events=10, show_progress=False)
    write_subsets(resolve(str(root / "train")), {12: resolve(str(root / "train-12"))}, seed=5, log=lambda _: None)
    return root


def _set(root, name, **kw):
    return event_set(DataConfig(uri=str(root / name), **kw), uri=name)


def test_disjoint_seeds_pass_and_are_described_as_seed_ranges(sets):
    split = {r: _set(sets, n) for r, n in (("train", "train"), ("validation", "val"), ("test", "test"))}
    check_disjoint(split)
    got = describe(split)
    assert got["train"] == {
        "data": "train",
        "events": 30,
        "origins": [{"origin": "generated lartpc seed 0", "events": 30, "ids": [[0, 29]]}],
    }
    assert got["test"]["origins"] == [{"origin": "generated lartpc seed 2", "events": 10, "ids": [[0, 9]]}]


def test_same_seed_under_another_name_is_refused_naming_seed_and_ids(sets):
    split = {"train": _set(sets, "train"), "validation": _set(sets, "val"), "test": _set(sets, "test-leaky")}
    with pytest.raises(SplitOverlapError) as e:
        check_disjoint(split)
    msg = str(e.value)
    assert "the test set test-leaky shares 10 events with the train set train" in msg
    assert "generated lartpc seed 0, ids 0-9" in msg
    assert "validation" not in msg.split("(")[0]  # val (seed 1) is not named: it shares nothing


def test_a_label_subset_keeps_its_sources_identity(sets):
    sub = _set(sets, "train-12")
    (origin,) = sub.origins
    assert origin.label == "generated lartpc seed 0"
    ids = sub.origins[origin]
    assert len(ids) == 12 and ids.max() <= 29
    # the same 12 events picked in-process (data.subset_events) are the same set
    inproc = _set(sets, "train", subset_events=12, subset_seed=5)
    assert inproc.origins[origin].tolist() == ids.tolist()
    leaky = _set(sets, "test-leaky")  # seed 0, ids 0-9: overlaps exactly the subset's ids below 10
    expected = sorted(int(i) for i in ids if i < 10)
    if expected:
        with pytest.raises(SplitOverlapError, match=f"shares {len(expected)} events"):
            check_disjoint({"train": sub, "test": leaky})
    # validation drawn from the training set is refused too
    with pytest.raises(SplitOverlapError, match="the validation set train-12 shares 12 events with the train set"):
        check_disjoint({"train": _set(sets, "train"), "validation": sub})


def test_a_dataset_without_provenance_overlaps_only_itself(tmp_path):
    from raysvc.data.streaming.shards import shard_name, write_manifest, write_shard

    for name in ("a", "b"):
        loc = resolve(str(tmp_path / name))
        write_manifest(loc, [write_shard(loc, shard_name(0), make_table(4, points=(50, 60))[0])], {})
    a, b = (event_set(DataConfig(uri=str(tmp_path / n)), uri=n) for n in ("a", "b"))
    check_disjoint({"train": a, "test": b})  # same ids 0-3, but nothing says they are the same events
    with pytest.raises(SplitOverlapError, match="no provenance"):
        check_disjoint({"train": a, "test": event_set(DataConfig(uri=str(tmp_path / "a")), uri="a")})


def test_test_scoring_is_refused_before_it_runs(sets, tmp_path, monkeypatch):
    """`raysvc evaluate --run-record`: the model's run trained on train and validated on val (its summary.json);
    scoring test-leaky is refused and the scoring never starts; a clean test set writes the record."""
    job = load_job(None, [f"data.uri={sets / 'train'}", f"val_data.uri={sets / 'val'}"], "segmentation")
    model = tmp_path / "model"
    model.mkdir()
    summary = {"config": job.model_dump(mode="json"), "steps": 1, "val": {"miou": 0.5}}
    (model / "summary.json").write_text(json.dumps(summary))
    called = []
    monkeypatch.chdir(tmp_path)
    record = tmp_path / "runs" / "r.json"
    with pytest.raises(SplitOverlapError, match="test set .*test-leaky shares 10 events with the train set"):
        experiment.evaluate_with_record(
            str(model), DataConfig(uri=str(sets / "test-leaky")), record, lambda: called.append(1)
        )
    assert not called and not record.exists()
    experiment.evaluate_with_record(str(model), DataConfig(uri=str(sets / "test")), record, lambda: {"miou": 0.4})
    rec = json.loads(record.read_text())
    assert tuple(rec) == ("config", "seeds", "split", "metrics", "git_commit", "wall_s")
    assert rec["metrics"]["test"] == {"miou": 0.4} and rec["metrics"]["validation"] == {"miou": 0.5}
    assert set(rec["metrics"]["load_avg"]) == {"start", "end"}
    assert rec["seeds"]["data"]["test"] == ["generated lartpc seed 2"]
    text = record.read_text()
    assert str(tmp_path) not in text and str(sets) not in text  # no machine path
    assert rec["config"]["run"] == "model" and rec["config"]["test"]["data"] == "<outside>/splits0/test"


def test_a_finetune_with_overlapping_validation_never_starts(sets, tmp_path, monkeypatch):
    import raysvc.train.driver as driver

    monkeypatch.setattr(driver, "run_job", lambda *a, **k: pytest.fail("the run started"))
    job = load_job(None, [f"data.uri={sets / 'train'}", f"val_data.uri={sets / 'train-12'}"], "segmentation")
    with pytest.raises(SplitOverlapError, match="validation set"):
        experiment.finetune_with_record(job, tmp_path / "r.json")


def test_a_probe_record_names_the_events_it_fitted_and_scored(sets, tmp_path, monkeypatch):
    """`raysvc probe --run-record`: the first events fit the probes (train), the next ones score them (test), by id."""
    from raysvc.train.backbone_probe import probe_backbone
    from raysvc.train.probe import ProbeConfig
    from raysvc.train.token_probe import TokenProbeConfig

    monkeypatch.chdir(tmp_path)
    ids: dict = {}
    n = {"train_events": 3, "val_events": 3}
    result = probe_backbone(
        None,
        DataConfig(uri=str(sets / "val")),
        point=ProbeConfig(**n, points_per_class=100),
        token=TokenProbeConfig(**n),
        log=lambda _: None,
        split_ids=ids,
    )
    assert len(ids["train"]) == 3 and len(ids["test"]) == 3 and not set(ids["train"]) & set(ids["test"])
    args = {"data": str(sets / "val"), "init": None, "seed": 0, "train_events": 3, "val_events": 3}
    experiment.probe_record(args, result, ids, tmp_path / "p.json", 1.0, [0.0, 0.0, 0.0])
    rec = json.loads((tmp_path / "p.json").read_text())
    assert tuple(rec) == ("config", "seeds", "split", "metrics", "git_commit", "wall_s")
    got = {r: [i for a, b in rec["split"][r]["origins"][0]["ids"] for i in range(a, b + 1)] for r in ("train", "test")}
    assert got == {"train": sorted(ids["train"]), "test": sorted(ids["test"])}
    assert rec["split"]["test"]["origins"][0]["origin"] == "generated lartpc seed 1"
    assert rec["metrics"]["test"]["point"]["miou"] == result["point"]["miou"]


def test_a_probe_fitted_on_one_split_scores_another(sets, tmp_path, monkeypatch):
    """`raysvc probe --fit-data V --data T`: the probes fit on V's first events and score T's first events; the same
    fitting events from another dataset give the same figures, other ones do not; the record's split says so."""
    from raysvc.data.streaming.pipeline import DirectStream
    from raysvc.train.backbone_probe import probe_backbone
    from raysvc.train.probe import ProbeConfig
    from raysvc.train.token_probe import TokenProbeConfig

    monkeypatch.chdir(tmp_path)
    n = {"train_events": 3, "val_events": 3}

    def probe(fit: str, ids: dict, **preprocess) -> dict:
        return probe_backbone(
            None,
            DataConfig(uri=str(sets / "test")),
            point=ProbeConfig(**n, points_per_class=100),
            token=TokenProbeConfig(**n),
            log=lambda _: None,
            split_ids=ids,
            fit_data=DataConfig(uri=str(sets / fit), **({"preprocess": preprocess} if preprocess else {})),
        )

    ids: dict = {}
    result = probe("train", ids)

    def first(name: str, k: int) -> list[int]:
        tables = DirectStream(DataConfig(uri=str(sets / name))).tables()
        return [i for t in tables for i in t.column("event_id").to_pylist()][:k]

    assert ids == {"train": first("train", 3), "test": first("test", 3)} and result["fit_data"] == str(sets / "train")
    # test-leaky's first events are train's first events: the same fit, the same figures; val's are other events
    assert probe("test-leaky", {})["point"] == result["point"]
    assert probe("val", {})["point"] != result["point"]
    args = {"data": str(sets / "test"), "fit_data": str(sets / "train"), "init": None, "seed": 0, **n}
    experiment.probe_record(args, result, ids, tmp_path / "p.json", 1.0, [0.0, 0.0, 0.0])
    rec = json.loads((tmp_path / "p.json").read_text())
    assert rec["split"]["train"]["origins"][0]["origin"] == "generated lartpc seed 0"
    assert rec["split"]["test"]["origins"][0]["origin"] == "generated lartpc seed 2"
    with pytest.raises(ValueError, match="must share detector and preprocessing"):
        probe("val", {}, remove_led=True)


def test_the_command_line_refuses_overlapping_splits_before_running(sets, tmp_path):
    """`raysvc finetune --run-record` with validation drawn from training, and `raysvc evaluate --run-record` on a test
    set of the training seed: exit 2 with the overlap named, no record written."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}

    def raysvc(*args):
        cmd = [sys.executable, "-m", "raysvc.cli", *args]
        return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)

    ft = raysvc(
        "finetune",
        str(root / "jobs" / "semseg-tiny.yaml"),
        *("--set", f"data.uri={sets / 'train'}", "--set", f"val_data.uri={sets / 'train-12'}"),
        *("--run-record", "r.json"),
    )
    assert ft.returncode == 2 and "split overlap: the validation set" in ft.stderr, ft.stderr
    job = load_job(None, [f"data.uri={sets / 'train'}", f"val_data.uri={sets / 'val'}"], "segmentation")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "summary.json").write_text(json.dumps({"config": job.model_dump(mode="json"), "steps": 1}))
    ev = raysvc(
        *("evaluate", "--model", "model", "--data", str(sets / "test-leaky"), "--actors", "0"),
        *("--run-record", "e.json"),
    )
    assert ev.returncode == 2 and "shares 10 events with the train set" in ev.stderr, ev.stderr
    assert not (tmp_path / "r.json").exists() and not (tmp_path / "e.json").exists()


def test_results_run_refuses_a_dataset_that_is_not_what_its_spec_says(sets, tmp_path):
    """A spec naming an existing dataset with another seed would record a false split: refused, naming both."""
    from pathlib import Path

    import yaml

    from raysvc.config import ConfigError

    root = Path(__file__).resolve().parents[1]
    spec = {
        "name": "x",
        "data": {
            "train": {"uri": str(sets / "train"), "events": 30, "seed": 9, "shard_events": 10},
            "val": {"uri": str(sets / "val"), "events": 12, "seed": 1, "shard_events": 6},
            "test": {"uri": str(sets / "test"), "events": 10, "seed": 2, "shard_events": 10},
        },
        "split": {"train": "train", "validation": "val", "test": "test"},
        "finetune": {"job": str(root / "jobs" / "semseg-tiny.yaml"), "set": ["data.uri={data.train}"]},
        "arms": {"scratch": {}},
        "seeds": {"finetune": [0]},
        "test": {"data": "test"},
    }
    (tmp_path / "experiment.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match="data.train: .* exists but was not generated as the spec says .*'seed': 0"):
        experiment.run_experiment(tmp_path, log=lambda _: None)
    assert not (tmp_path / "runs").exists()
