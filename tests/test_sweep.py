"""Ray Tune sweeps (`raysvc sweep`): the C-NMS coverage grid and the label-efficiency matrix, run for real on a local
Ray with tiny settings; a crashing trial is reported failed while the others finish; re-running a sweep resumes
it (finished trials are kept, not re-run); the Pareto front and the recommended overlaps against brute force."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from raysvc.storage import resolve
from tests.conftest import generate_train_val

ROOT = Path(__file__).parents[1]
RAYSVC = str(Path(sys.executable).parent / "raysvc")


@pytest.fixture(scope="module")
def sweep_data(tmp_path_factory):
    return generate_train_val(tmp_path_factory.mktemp("sweepdata"), (24, 11, 8), (8, 12, 4))


def _run(args: list[str], tmp_path: Path, timeout: int = 600, **kw) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(tmp_path / "wandb"),
    }
    return subprocess.run([RAYSVC, *args], capture_output=True, text=True, env=env, timeout=timeout, **kw)


# --- pure functions against brute force ------------------------------------------------------------------------
def test_pareto_front_matches_a_sort_and_scan_reference():
    from raysvc.sweep.grouping import pareto_front

    rng = np.random.default_rng(0)
    for trial in range(20):
        pts = [tuple(p) for p in rng.integers(0, 8, size=(int(rng.integers(1, 30)), 2)).astype(float)]
        # reference: sort by (x, y), keep a point when its y is below every y seen so far (duplicates both kept)
        ref, best = [], np.inf
        for i in sorted(range(len(pts)), key=lambda i: pts[i]):
            if pts[i][1] < best or (ref and pts[i] == pts[ref[-1]]):
                ref.append(i)
                best = min(best, pts[i][1])
        assert sorted(pareto_front(pts)) == sorted(ref), (trial, pts)


def test_recommended_overlap_minimises_missed_plus_duplicated_per_radius():
    from raysvc.sweep.grouping import recommend

    rng = np.random.default_rng(1)
    rows = [
        {
            "trial": {"method": "cnms", "radius": r, "overlap": o},
            "metrics": {
                "missed_ratio": float(rng.random()),
                "duplicated_ratio": float(rng.random()),
                "groups_per_event": 1.0,
                "points_per_group": 1.0,
            },
        }
        for r in (2.5, 5.0)
        for o in (0.2, 0.5, 0.8)
    ]
    rows.append({"trial": {"method": "fps_knn", "groups": 8}, "metrics": {"missed_ratio": 0, "duplicated_ratio": 0}})
    rec = recommend(rows)
    for r in (2.5, 5.0):
        mine = [x for x in rows if x["trial"].get("radius") == r and x["trial"]["method"] == "cnms"]
        best = min(mine, key=lambda x: x["metrics"]["missed_ratio"] + x["metrics"]["duplicated_ratio"])
        assert rec[f"{r:g}"]["overlap"] == best["trial"]["overlap"]
    assert set(rec) == {"2.5", "5"}  # baselines never recommended


def test_grouping_trial_metrics_match_a_numpy_recount():
    """Each method's groups stay inside their own event, and the reported coverage equals a recount."""
    from raysvc.sweep.grouping import evaluate, group

    rng = np.random.default_rng(2)
    events = [rng.uniform(0, 40, size=(n, 3)) for n in (300, 180, 240)]
    coord = torch.from_numpy(np.concatenate(events))
    offset = torch.cumsum(torch.tensor([len(e) for e in events]), 0)
    for params in (
        {"method": "cnms", "radius": 5.0, "overlap": 0.7},
        {"method": "fps_knn", "groups": 20},
        {"method": "fps_ball", "groups": 20, "radius": 5.0},
    ):
        groups = group(coord, offset, params, 16).numpy()
        m = evaluate(events, params, 16)
        counts = np.zeros(len(coord), int)
        for g in groups:
            v = g[g >= 0]
            assert len({int(np.searchsorted(offset.numpy(), i, side="right")) for i in v}) == 1, params  # one event
            counts[v] += 1
        assert m["missed_ratio"] == pytest.approx((counts == 0).mean())
        assert m["duplicated_ratio"] == pytest.approx((counts > 1).mean())
        assert m["groups_per_event"] == pytest.approx(len(groups) / 3)
        if params["method"] != "cnms":
            assert len(groups) == 60  # 20 FPS centres per event


# --- the C-NMS sweep through the CLI ---------------------------------------------------------------------------
def _cnms_spec(tmp_path: Path, sweep_data: Path, **over) -> Path:
    spec = {
        "kind": "cnms",
        "name": "cnms-test",
        "storage": str(tmp_path / "sweeps"),
        "data": {"uri": str(sweep_data / "val")},
        "events": 4,
        "max_points": 16,
        "cnms": {"radius": [5, 10], "overlap": [0.0, 0.5, 1.0]},
        "fps_knn": {"groups": [32]},
        "fps_ball": {"groups": [32], "radius": [5]},
        "tune": {"max_concurrent_trials": 2, "cpus_per_trial": 1},
        "wandb_mode": "offline",
    } | over
    path = tmp_path / "cnms.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_cnms_sweep_reports_failures_and_resumes_without_rerunning(tmp_path, sweep_data):
    spec = _cnms_spec(tmp_path, sweep_data)
    p = _run(["sweep", str(spec)], tmp_path)
    # overlap 0 is not a valid C-NMS setting: those two trials fail with the op's error, the other six finish
    assert p.returncode == 1, p.stderr[-3000:]
    assert "2 of 8 trials failed" in p.stderr
    exp = tmp_path / "sweeps" / "cnms-test"
    summary = json.loads((exp / "summary.json").read_text())
    assert sorted(f["trial"]["name"] for f in summary["failed"]) == ["cnms-r10-o0", "cnms-r5-o0"]
    assert all(f["error"].startswith("ValueError: radius and overlap must be positive") for f in summary["failed"])
    assert all("grouping_trial" in f["traceback"] for f in summary["failed"])
    names = [r["trial"]["name"] for r in summary["trials"]]
    assert names == ["cnms-r5-o0.5", "cnms-r5-o1", "cnms-r10-o0.5", "cnms-r10-o1", "fps_knn-g32", "fps_ball-g32-r5"]
    rows = summary["trials"]
    for r in rows:
        m = r["metrics"]
        assert 0 <= m["missed_ratio"] <= 1 and 0 <= m["duplicated_ratio"] <= 1 and m["points_per_group"] <= 16
    knn = next(r for r in rows if r["trial"]["method"] == "fps_knn")["metrics"]
    assert knn["groups_per_event"] == 32 and knn["points_per_group"] == 16  # kNN groups are always full
    # larger overlap factor -> centres further apart -> fewer groups
    for rad in (5, 10):
        g = {
            r["trial"]["overlap"]: r["metrics"]["groups_per_event"]
            for r in rows
            if r["trial"].get("radius") == rad and r["trial"]["method"] == "cnms"
        }
        assert g[1.0] < g[0.5]
    pts = [(r["metrics"]["duplicated_ratio"], r["metrics"]["missed_ratio"]) for r in rows]
    for i in summary["pareto_index"]:  # nothing dominates a front point, and every other point is dominated
        assert not any(a <= pts[i][0] and b <= pts[i][1] and (a, b) != pts[i] for a, b in pts)
    for j in set(range(len(pts))) - set(summary["pareto_index"]):
        assert any(a <= pts[j][0] and b <= pts[j][1] and (a, b) != pts[j] for a, b in pts)
    assert set(summary["recommended"]) == {"5", "10"}
    assert (exp / "grouping.png").read_bytes()[:4] == b"\x89PNG"
    assert "C-NMS + ball (recommended)" in (exp / "table.md").read_text()
    assert list((tmp_path / "wandb").rglob("offline-run-*")), "trials log to wandb (offline)"
    # the console (two pipes here): our lines and one progress line, plain; Tune's tables and tracebacks: log only
    console = p.stdout + p.stderr
    assert "\x1b" not in console and "\r" not in console
    assert "Trial status" not in console and "Traceback" not in console and "+---" not in console
    assert "[raysvc] sweep cnms-test: 8/8 trials (100%)" in p.stderr and "2 failed" in p.stderr
    assert len(p.stderr.splitlines()) <= 12, p.stderr

    # the same spec again: Tuner.restore keeps every finished trial (timings identical: not re-run) and the failed
    # ones stay failed
    again = _run(["sweep", str(spec)], tmp_path)
    assert again.returncode == 1 and "resuming sweep" in again.stdout
    s2 = json.loads((exp / "summary.json").read_text())
    assert s2["resumed"] and s2["trials"] == rows and len(s2["failed"]) == 2

    # another grid under the same name is refused, naming the experiment
    other = _cnms_spec(tmp_path, sweep_data, events=3)
    spec_text = yaml.safe_load(other.read_text())
    spec_text["cnms"]["radius"] = [7]
    other.write_text(yaml.safe_dump(spec_text))
    refused = _run(["sweep", str(other)], tmp_path)
    assert refused.returncode == 2 and "another grid" in refused.stderr


def test_a_sweep_over_a_missing_dataset_fails_in_seconds_naming_it(tmp_path, sweep_data, capsys):
    from raysvc.cli import main

    job = str(ROOT / "jobs" / "pretrain-polarmae-tiny.yaml")
    spec = _cnms_spec(tmp_path, sweep_data, pretrain={"job": job})
    missing = tmp_path / "no-such-data"
    for sets, named in (
        ([f"data.uri={missing}"], f"data.uri={missing}"),  # the first stage's
        ([f"pretrain.data={missing}"], f"pretrain: the pretraining data={missing}"),  # the second's, checked first
        ([f"pretrain.set=[probe_data.uri={missing}]"], f"pretrain: the probe data={missing}"),
    ):
        t0 = time.monotonic()
        with pytest.raises(SystemExit) as e:
            main(["sweep", str(spec), *[a for s in sets for a in ("--set", s)]])
        err = capsys.readouterr().err
        assert e.value.code == 2 and named in err and "no readable dataset" in err, err[-2000:]
        assert time.monotonic() - t0 < 10 and not (tmp_path / "sweeps").exists()  # before Ray, before any trial


def test_a_label_efficiency_sweep_checks_its_jobs_datasets_before_any_subset_or_trial(tmp_path, sweep_data, capsys):
    from raysvc.cli import main

    missing = tmp_path / "no-such-val"
    spec = {
        "kind": "finetune",
        "name": "inputs",
        "storage": str(tmp_path / "sweeps"),
        "job": str(ROOT / "jobs" / "semseg-tiny.yaml"),
        "set": [f"data.uri={sweep_data / 'train'}", f"val_data.uri={missing}"],
        "init": str(tmp_path / "no-backbone"),
        "events": [4],
        "modes": ["fft"],
    }
    path = tmp_path / "ft.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(SystemExit) as e:
        main(["sweep", str(path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"val_data.uri={missing}: no readable dataset" in err, err[-2000:]
    assert not (tmp_path / "sweeps").exists()  # no subset written, no trial


def test_the_token_probe_stage_reads_the_sweeps_data_unless_told_otherwise(tmp_path, sweep_data):
    from raysvc.storage import absolute_uri
    from raysvc.sweep.grouping import probe_job
    from raysvc.sweep.spec import load_spec

    job = str(ROOT / "jobs" / "pretrain-polarmae-tiny.yaml")  # reads runs/data/pretrain and runs/data/val
    spec_path = str(_cnms_spec(tmp_path, sweep_data, pretrain={"job": job}))
    train, val = str(sweep_data / "train"), str(sweep_data / "val")
    base = probe_job(load_spec(spec_path, [f"data.uri={train}"]))
    assert base.data.uri == base.probe_data.uri == absolute_uri(train)  # both follow --set data.uri
    base = probe_job(load_spec(spec_path, [f"pretrain.data={train}"]))
    assert (base.data.uri, base.probe_data.uri) == (absolute_uri(train), absolute_uri(val))
    base = probe_job(load_spec(spec_path, [f"pretrain.set=[data.uri={val}, probe_data.uri={train}]"]))
    assert (base.data.uri, base.probe_data.uri) == (absolute_uri(val), absolute_uri(train))


def test_probe_trials_take_the_recommended_overlaps_or_the_given_pairs(tmp_path, sweep_data):
    from raysvc.sweep.grouping import probe_trials
    from raysvc.sweep.spec import load_spec

    job = str(ROOT / "jobs" / "pretrain-polarmae-tiny.yaml")
    spec = load_spec(str(_cnms_spec(tmp_path, sweep_data, pretrain={"job": job})))
    rec = {"5": {"overlap": 0.6}, "10": {"overlap": 0.9}}
    assert probe_trials(spec, rec) == [
        {"name": "mae-r5-o0.6", "radius": 5.0, "overlap": 0.6},
        {"name": "mae-r10-o0.9", "radius": 10.0, "overlap": 0.9},
    ]
    spec = load_spec(str(_cnms_spec(tmp_path, sweep_data, pretrain={"job": job, "settings": [[7.5, 0.72]]})))
    assert probe_trials(spec, rec) == [{"name": "mae-r7.5-o0.72", "radius": 7.5, "overlap": 0.72}]


@pytest.mark.slow
@pytest.mark.long
def test_cnms_sweep_scores_each_setting_by_a_short_polarmae_pretraining(tmp_path, sweep_data):
    sets = [
        f"data.uri={sweep_data / 'train'}",
        f"probe_data.uri={sweep_data / 'val'}",
        "train.steps=2",
        "train.batch_events=2",
        "train.checkpoint_every=2",
        "train.log_every=1",
        "probe.every=2",
        "probe.train_events=3",  # 7 of the 8 held-out events pass the cuts
        "probe.val_events=3",
        "probe.pca_dims=8",
        "scaling.workers=1",
        "scaling.cpus_per_worker=1",
        "data.read_cpus=0.25",
        "probe_data.read_cpus=0.25",
        "run.wandb_mode=offline",
    ]
    job = str(ROOT / "jobs" / "pretrain-polarmae-tiny.yaml")
    spec = _cnms_spec(
        tmp_path,
        sweep_data,
        cnms={"radius": [5], "overlap": [0.72]},
        fps_knn=None,
        fps_ball=None,
        pretrain={"job": job, "set": sets, "settings": [[5, 0.72], [10, 0.72]]},
        storage="sweeps",  # relative, as in tune/cnms.yaml: the runs must land under it, not in a trial's directory
    )
    p = _run(["sweep", str(spec)], tmp_path, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    exp = tmp_path / "sweeps" / "cnms-test"
    summary = json.loads((exp / "summary.json").read_text())
    rep = summary["representation"]
    assert [r["trial"]["name"] for r in rep["trials"]] == ["mae-r5-o0.72", "mae-r10-o0.72"] and not rep["failed"]
    grid = summary["trials"][0]["metrics"]
    for row in rep["trials"]:
        run_dir = Path(row["metrics"]["run_uri"].removeprefix("file://"))
        assert run_dir.parent == exp / "runs", run_dir
        run = json.loads((run_dir / "summary.json").read_text())
        # each setting's score is its own run's token probe, pretrained with that setting's tokenizer
        assert run["config"]["model"]["radius_voxels"] == row["trial"]["radius"] and run["steps"] == 2
        assert row["metrics"]["token_mean_f1"] == run["probe"]["token_mean_f1"]
        assert row["metrics"]["tokens_per_event"] == run["tokens"]["per_event_mean"]
    r5, r10 = (r["coverage"] for r in rep["trials"])
    assert r5 == {k: grid[k] for k in ("missed_ratio", "duplicated_ratio", "groups_per_event")}
    assert r10["groups_per_event"] < r5["groups_per_event"]  # measured for the setting outside the grid
    assert rep["best"] in ("mae-r5-o0.72", "mae-r10-o0.72")
    assert (exp / "token-probe.png").read_bytes().startswith(b"\x89PNG")
    assert "token probe mean F1" in (exp / "table.md").read_text()


@pytest.mark.slow
@pytest.mark.long
def test_an_interrupted_sweep_resumes_with_its_finished_trials_kept(tmp_path, sweep_data):
    radii = [2.5, 5, 10]  # 9 C-NMS trials + 2 FPS baselines: 3 or more finish before the interruption
    spec = _cnms_spec(
        tmp_path,
        sweep_data,
        events=16,
        data={"uri": str(sweep_data / "train")},
        cnms={"radius": radii, "overlap": [0.3, 0.6, 0.9]},
        tune={"max_concurrent_trials": 1, "cpus_per_trial": 1},
    )
    exp = tmp_path / "sweeps" / "cnms-test"
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wandb")}
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(
        [RAYSVC, "sweep", str(spec)], stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    done = []
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        done = [d for d in exp.glob("*/result.json") if d.stat().st_size > 0]
        if len(done) >= 3:
            break
        time.sleep(0.2)
    assert proc.poll() is None and len(done) >= 3, (tmp_path / "first.log").read_text()[-3000:]
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: Tune saves the experiment state and stops
    proc.wait(timeout=120)
    log.close()
    out = (tmp_path / "first.log").read_text()
    first = {
        d.parent.name: json.loads(d.read_text().splitlines()[-1])
        for d in exp.glob("*/result.json")
        if d.stat().st_size > 0
    }
    assert 3 <= len(first) < len(radii) * 3 + 2, out[-2000:]

    p = _run(["sweep", str(spec)], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resuming sweep" in p.stdout
    summary = json.loads((exp / "summary.json").read_text())
    assert len(summary["trials"]) == len(radii) * 3 + 2 and not summary["failed"]
    by_name = {r["trial"]["name"]: r["metrics"] for r in summary["trials"]}
    for name, res in first.items():  # finished before the interruption: kept, not run again
        assert by_name[name]["ms_per_event"] == res["ms_per_event"], name


# --- the label-efficiency sweep --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def backbone_dir(tmp_path_factory):
    """A Panda-format export (backbone.safetensors + config.json) of a seeded tiny PTv3, as `raysvc pretrain`
    writes it: what the sweep's lin / dec / fft trials start from."""
    from raysvc.data.streaming.transforms import PreprocessConfig
    from raysvc.inference.record import ExportedModel, ModelSpec, save_export
    from raysvc.models.ptv3 import PTv3, preset

    d = tmp_path_factory.mktemp("backbone")
    torch.manual_seed(0)
    record = ExportedModel(
        kind="backbone", method="panda", model=ModelSpec(size="tiny", center_events=True), preprocess=PreprocessConfig()
    )
    save_export(resolve(str(d)), PTv3(preset("tiny")).state_dict(), record)
    return d


def _run_finetune_sweep(tmp_path: Path, sweep_data: Path, name: str, job: str, sets: list[str], **over) -> Path:
    """Run a finetune sweep of `job` for 2 steps per trial on the module's tiny dataset; its experiment directory."""
    spec = {
        "kind": "finetune",
        "name": name,
        "storage": str(tmp_path / "sweeps"),
        "job": str(ROOT / "jobs" / job),
        "wandb_mode": "offline",
        "set": [
            f"data.uri={sweep_data / 'train'}",
            f"val_data.uri={sweep_data / 'val'}",
            "train.steps=2",
            "train.batch_events=2",
            "train.val_every=2",
            "train.checkpoint_every=2",
            "scaling.workers=1",
            "scaling.cpus_per_worker=0.5",
            "scaling.torch_threads=1",
            "data.read_cpus=0.25",
            "val_data.read_cpus=0.25",
            "run.max_failures=0",
            "run.wandb_mode=offline",
            *sets,
        ],
        "tune": {"max_concurrent_trials": 2, "cpus_per_trial": 0.01},
        **over,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    p = _run(["sweep", str(path)], tmp_path, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return tmp_path / "sweeps" / name


@pytest.mark.slow
@pytest.mark.long
def test_label_efficiency_sweep_fills_the_mode_by_events_table(tmp_path, sweep_data, backbone_dir):
    from raysvc.data.streaming.config import DataConfig
    from raysvc.data.streaming.prepared import prepare
    from raysvc.data.streaming.shards import load_manifest

    sets = ["train.log_every=1", "data.preprocess.min_points=64", "val_data.preprocess.min_points=64"]  # all 4 events
    exp = _run_finetune_sweep(
        tmp_path,
        sweep_data,
        "fractions-test",
        "semseg-tiny.yaml",
        sets,
        init=str(backbone_dir),
        events=[4, None],
        modes=["lin", "fft", "scratch"],
        subset_seed=3,
    )
    table = json.loads((exp / "table.json").read_text())
    assert table["modes"] == ["lin", "fft", "scratch"] and table["events"] == ["4", "all"]
    summary = json.loads((exp / "summary.json").read_text())
    assert not summary["failed"] and len(summary["trials"]) == 6
    for r in summary["trials"]:
        cell = table["cells"][r["trial"]["mode"]]["4" if r["trial"]["events"] == 4 else "all"]
        assert cell == r["metrics"]["miou"] and 0 <= cell <= 1
        assert r["metrics"]["steps"] == 2
    # the materialised subset holds exactly the events data.subset_events=4 (same seed) selects
    sub = exp / "subsets" / "events-4"
    chosen = prepare(DataConfig(uri=str(sweep_data / "train"), subset_events=4, subset_seed=3)).keep_ids
    import pyarrow.parquet as pq

    ids = np.sort(
        np.concatenate(
            [pq.read_table(f, columns=["event_id"]).column(0).to_numpy() for f in sorted(sub.glob("*.parquet"))]
        )
    )
    assert ids.tolist() == chosen.tolist() and load_manifest(resolve(str(sub))).events == 4
    # each trial is its own Train run in the sweep's directory, in the mode it names
    for mode, ev in (("lin", "4"), ("fft", "all"), ("scratch", "all")):
        run = exp / "runs" / f"fractions-test-{mode}-{ev}"
        cfg = json.loads((run / "summary.json").read_text())["config"]
        assert cfg["model"]["mode"] == mode and cfg["run"]["wandb_group"] == "fractions-test"
        assert (cfg["model"]["init"] is None) == (mode == "scratch")
    lin = json.loads((exp / "runs" / "fractions-test-lin-4" / "config.json").read_text())
    assert lin["model"]["center_events"] is True  # adopted from the backbone's config
    assert "| lin |" in (exp / "table.md").read_text()
    assert (exp / "label_efficiency.png").read_bytes()[:4] == b"\x89PNG"


def _finetune_spec(**over):
    from raysvc.sweep.spec import FinetuneSweep

    spec = {
        "kind": "finetune",
        "name": "t",
        "job": str(ROOT / "jobs" / "panoptic-tiny.yaml"),
        "init": "unused",
        "events": [4, None],
        "modes": ["fft", "scratch"],
    }
    return FinetuneSweep.model_validate(spec | over)


def test_seeded_trials_are_named_per_seed_and_train_with_that_seed(sweep_data):
    from raysvc.sweep.label_efficiency import grid_trials, trial_config
    from raysvc.train.driver import load_job
    from raysvc.train.tasks.panoptic import PanopticConfig

    uris = {"4": str(sweep_data / "val"), "all": str(sweep_data / "train")}
    plain = grid_trials(_finetune_spec(), uris)
    assert [t["name"] for t in plain] == ["fft-4", "fft-all", "scratch-4", "scratch-all"]
    assert all("seed" not in t for t in plain)  # a sweep without seeds keeps its grid (and so can resume)
    seeded = grid_trials(_finetune_spec(seeds=[0, 7]), uris)
    assert [t["name"] for t in seeded][:5] == ["fft-4-s0", "fft-all-s0", "scratch-4-s0", "scratch-all-s0", "fft-4-s7"]
    assert [t["labelled_events"] for t in seeded[:4]] == [8, 24, 8, 24]
    base = load_job(str(ROOT / "jobs" / "panoptic-tiny.yaml"), [], "segmentation")
    cfg = trial_config(base, seeded[4], "t", "file:///backbone", "file:///runs")
    assert isinstance(cfg, PanopticConfig) and cfg.instances.tasks == ["particle", "interaction"]
    assert (cfg.train.seed, cfg.model.mode, cfg.model.init, cfg.run.name) == (
        7,
        "fft",
        "file:///backbone",
        "t-fft-4-s7",
    )
    lin = trial_config(base, {**seeded[0], "mode": "lin"}, "t", "file:///b", "file:///r")
    assert (lin.model.head, lin.train.seed) == ("lin", 0)
    with pytest.raises(ValueError, match="distinct"):
        _finetune_spec(seeds=[1, 1])


def test_dotted_metrics_are_looked_up_and_a_missing_one_is_named():
    from raysvc.sweep.label_efficiency import metric_value

    val = {"particle": {"pq": 0.25, "pid_accuracy": {"muon": 0.5}}, "semantic": {"miou": 0.4}}
    assert metric_value(val, "particle.pid_accuracy.muon") == 0.5 and metric_value(val, "semantic.miou") == 0.4
    with pytest.raises(KeyError, match=r"'particle.rq'.*particle has \['pid_accuracy', 'pq'\]"):
        metric_value(val, "particle.rq")


def test_cells_are_the_mean_and_sample_std_over_seeds():
    from raysvc.sweep.label_efficiency import columns_table, matrix, table_md

    spec = _finetune_spec(seeds=[0, 1, 2], metric="particle.pq", columns=["particle.pq", "interaction.ari"])
    rng = np.random.default_rng(0)
    rows, ref = [], {}
    for mode in spec.modes:
        for n in spec.events:
            seeds = spec.seeds if (mode, n) != ("scratch", None) else [0]  # a cell with one finished seed
            for s in seeds:
                pq, ari = rng.random(2)
                ref.setdefault((mode, n), []).append((pq, ari))
                trial = {"name": f"{mode}-{n}-s{s}", "mode": mode, "events": n, "seed": s}
                rows.append(
                    {
                        "trial": trial,
                        "metrics": {"particle.pq": pq, "scores": {"particle.pq": pq, "interaction.ari": ari}},
                    }
                )
    table, cols = matrix(spec, rows), columns_table(spec, rows)
    for (mode, n), vals in ref.items():
        label = "all" if n is None else str(n)
        v = np.array(vals)
        assert table["cells"][mode][label] == pytest.approx(v[:, 0].mean())
        assert table["n"][mode][label] == len(vals)
        row = next(r for r in cols["rows"] if (r["mode"], r["events"]) == (mode, label))
        assert row["mean"]["interaction.ari"] == pytest.approx(v[:, 1].mean())
        if len(vals) > 1:
            assert table["std"][mode][label] == pytest.approx(v[:, 0].std(ddof=1))
            assert row["std"]["particle.pq"] == pytest.approx(v[:, 0].std(ddof=1))
        else:
            assert table["std"][mode][label] is None and row["std"]["particle.pq"] is None
    md = table_md(table, [], cols)
    fft4 = np.array(ref[("fft", 4)])
    assert f"{fft4[:, 0].mean():.3f} ± {fft4[:, 0].std(ddof=1):.3f}" in md
    assert "| mode | labelled events | seeds | particle.pq | interaction.ari |" in md


@pytest.mark.slow
@pytest.mark.long
def test_a_seeded_panoptic_sweep_tabulates_its_instance_metrics(tmp_path, sweep_data):
    exp = _run_finetune_sweep(
        tmp_path,
        sweep_data,
        "panoptic-test",
        "panoptic-tiny.yaml",
        [],
        init="unused",
        metric="particle.pq",
        columns=["interaction.ari", "particle.pid_accuracy.muon"],
        events=[None],
        modes=["scratch"],
        seeds=[0, 1],
    )
    summary = json.loads((exp / "summary.json").read_text())
    assert not summary["failed"] and sorted(r["trial"]["name"] for r in summary["trials"]) == [
        "scratch-all-s0",
        "scratch-all-s1",
    ]
    pqs = []
    for r in summary["trials"]:  # each score is the run's own summary value
        run = json.loads((exp / "runs" / f"panoptic-test-{r['trial']['name']}" / "summary.json").read_text())
        assert run["config"]["train"]["seed"] == r["trial"]["seed"] and run["config"]["task"] == "panoptic"
        assert r["metrics"]["scores"]["particle.pq"] == run["val"]["particle"]["pq"]
        assert r["metrics"]["scores"]["interaction.ari"] == run["val"]["interaction"]["ari"]
        assert r["metrics"]["miou"] == run["val"]["semantic"]["miou"]
        pqs.append(run["val"]["particle"]["pq"])
    table = json.loads((exp / "table.json").read_text())
    assert table["cells"]["scratch"]["all"] == pytest.approx(np.mean(pqs)) and table["n"]["scratch"]["all"] == 2
    assert "| scratch | all | 2 |" in (exp / "table.md").read_text()


def test_a_trial_stopped_mid_run_is_unfinished_not_a_cell_value():
    from raysvc.sweep.label_efficiency import finished_rows, matrix

    spec = _finetune_spec(seeds=[0, 1], metric="particle.pq")
    final = {"particle.pq": 0.2, "scores": {"particle.pq": 0.2}, "steps": 300}
    trials = [
        {"trial": {"name": "fft-4-s0", "mode": "fft", "events": 4, "seed": 0}, "metrics": final},
        {"trial": {"name": "fft-4-s1", "mode": "fft", "events": 4, "seed": 1}, "metrics": {"step": 200, "loss": 3.1}},
    ]
    rows, unfinished = finished_rows(spec, trials)
    assert [r["trial"]["name"] for r in rows] == ["fft-4-s0"] and [t["name"] for t in unfinished] == ["fft-4-s1"]
    table = matrix(spec, rows)
    assert table["cells"]["fft"]["4"] == 0.2 and table["n"]["fft"]["4"] == 1 and table["n"]["fft"]["all"] == 0
