"""Cross-experiment Panda pretraining (`task: panda-cross`): the per-detector stems against plain single-detector
PTv3s, the mixture's split and draw, config errors before any worker starts, and (slow) a two-worker run on
LArTPC + water Cherenkov events whose per-detector exports fine-tuning loads; (long) resumption after a killed worker
ending with the weights of an uninterrupted run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from raysvc.config import load_config
from raysvc.models.panda import PandaConfig, PandaStudent, make_teacher
from raysvc.models.ptv3 import PTv3, preset
from raysvc.models.stems import split_stem, use_stem
from raysvc.storage import resolve
from raysvc.train.tasks.panda_cross import CrossPretrainConfig, split_events, step_detector

JOB = str(Path(__file__).parents[1] / "jobs" / "pretrain-panda-cross-tiny.yaml")
quiet = lambda m: None  # noqa: E731


def _points(n: int, channels: int, seed: int) -> tuple:
    g = torch.Generator().manual_seed(seed)
    grid = torch.randint(0, 12, (n, 3), generator=g)
    grid = torch.unique(grid, dim=0)
    feat = torch.randn(len(grid), channels, generator=g)
    return feat, grid.float() / 12, grid, torch.tensor([len(grid)])


def test_each_stem_with_the_shared_trunk_is_the_plain_backbone_its_export_loads_into():
    torch.manual_seed(0)
    student = PandaStudent(
        preset("tiny"), PandaConfig(head_hidden=16, head_embed=8, prototypes=8), {"lartpc": 4, "wch": 5}
    )
    student.eval()
    weights = {k.removeprefix("backbone."): v for k, v in student.state_dict().items() if k.startswith("backbone.")}
    for name, channels in (("lartpc", 4), ("wch", 5)):
        use_stem(name, student)
        feat, coord, grid, offset = _points(300, channels, seed=channels)
        got = student.backbone(feat, coord, grid, offset)
        plain = PTv3(preset("tiny", in_channels=channels)).eval()
        plain.load_state_dict(split_stem(weights, name))  # strict: exactly the plain model's keys
        want = plain(feat, coord, grid, offset)
        assert all(torch.allclose(a.feat, b.feat, atol=1e-6) for a, b in zip(got, want, strict=True)), name
    # the two stems are different modules: the LArTPC stem on a 5-channel event is refused by name
    use_stem("lartpc", student)
    with pytest.raises(ValueError, match="'lartpc' stem takes 4 input channels"):
        student.backbone(*_points(50, 5, seed=1))
    with pytest.raises(ValueError, match="no stem for detector 'tpc'"):
        use_stem("tpc", student)
    # the teacher is built with the same stems and starts equal to the student
    teacher = make_teacher(student, preset("tiny"))
    assert teacher.stems == {"lartpc": 4, "wch": 5}
    assert all(
        torch.equal(a, b) for a, b in zip(teacher.state_dict().values(), student.state_dict().values(), strict=True)
    )


def test_mixed_split_and_by_detector_draws_follow_the_weights():
    for n, weights in ((2, {"a": 0.5, "b": 0.5}), (3, {"a": 0.7, "b": 0.3}), (10, {"a": 0.55, "b": 0.3, "c": 0.15})):
        got = split_events(n, weights)
        assert sum(got.values()) == n
        assert all(abs(got[k] - w * n) < 1 for k, w in weights.items())  # the exact share, rounded up or down
    # every detector is in every step: the rare ones get one event, taken from the largest
    assert split_events(8, {"a": 0.9, "b": 0.05, "c": 0.05}) == {"a": 6, "b": 1, "c": 1}
    weights = {"lartpc": 0.25, "wch": 0.75}
    draws = [step_detector(5, n, weights) for n in range(4000)]
    assert draws == [step_detector(5, n, weights) for n in range(4000)]  # every rank, every resume: the same
    share = draws.count("wch") / len(draws)
    assert abs(share - 0.75) < 4 * np.sqrt(0.75 * 0.25 / 4000)  # binomial: 4 sigma
    assert draws != [step_detector(6, n, weights) for n in range(4000)]


def _sets(data: Path, tmp_path: Path, name: str, *extra: str) -> list[str]:
    sets = [
        f"sources.lartpc.data.uri={data / 'lar'}",
        f"sources.lartpc.probe_data.uri={data / 'lar-val'}",
        f"sources.wch.data.uri={data / 'wch'}",
        f"sources.wch.probe_data.uri={data / 'wch-val'}",
        f"run.storage={tmp_path}",
        f"run.name={name}",
        "train.steps=4",
        "train.checkpoint_every=2",
        "train.log_every=2",
        "train.monitor_every=2",
        "train.batch_events=4",
        "probe.every=4",
        "probe.train_events=4",
        "probe.val_events=4",
        "probe.points_per_class=300",
        "sources.lartpc.views.local_views=2",
        "sources.lartpc.views.max_points=1500",
        "sources.wch.views.local_views=2",
        "panda.head_hidden=64",
        "panda.head_embed=32",
        "panda.prototypes=64",
        "run.max_failures=0",
        "run.wandb_mode=offline",
        *(f"sources.{s}.{d}.read_cpus=0.25" for s in ("lartpc", "wch") for d in ("data", "probe_data")),
        *extra,
    ]
    return sets


def test_bad_cross_configs_fail_by_name(tmp_path):
    def fails(*sets) -> str:
        with pytest.raises(Exception) as e:
            load_config(CrossPretrainConfig, JOB, list(sets))
        return str(e.value)

    assert "shared by every detector" in fails("sources.wch.panda.prototypes=8")
    assert "sources: Value error, unknown detector 'tpc'" in fails("sources.tpc={weight: 1, data: {uri: x}}")
    assert "at least the number of sources" in fails("batching=mixed", "train.batch_events=2")
    assert "sources.wch.weight" in fails("sources.wch.weight=0")
    with pytest.raises(ValidationError):
        CrossPretrainConfig.model_validate({"task": "panda-cross", "sources": {}})


@pytest.fixture(scope="module")
def cross_data(tmp_path_factory):
    from raysvc.data.sources.synthetic import generate_dataset
    from raysvc.data.sources.wch_generator import WChGeneratorConfig

    root = tmp_path_factory.mktemp("crossdata")
    generate_dataset(resolve(str(root / "lar")), 16, seed=7, shard_events=4, show_progress=False)
    generate_dataset(resolve(str(root / "lar-val")), 16, seed=8, shard_events=8, show_progress=False)
    small = WChGeneratorConfig(particles={1: 1.0, 2: 1.0})
    for name, n, seed in (("wch", 16, 21), ("wch-val", 8, 22)):
        generate_dataset(resolve(str(root / name)), n, seed, 4, small, show_progress=False, detector="wch")
    return root


@pytest.mark.slow
def test_mixed_cross_run_exports_one_backbone_per_detector_that_finetuning_loads(ray_local, cross_data, tmp_path):
    from raysvc.inference.record import load_export
    from raysvc.train.driver import run_job
    from raysvc.train.tasks.rings import RingsConfig

    cfg = load_config(CrossPretrainConfig, JOB, _sets(cross_data, tmp_path, "cross", "batching=mixed"))
    summary = run_job(cfg, log=quiet)
    run = tmp_path / "cross"
    on_disk = json.loads((run / "summary.json").read_text())
    assert on_disk["batching"] == "mixed" and on_disk["weights"] == {"lartpc": 0.5, "wch": 0.5}
    # every step held both detectors: both parts' losses in every logged window, both stems trained
    train = on_disk["history"]["train"]
    assert [r["step"] for r in train] == [2, 4]
    assert all(r["lartpc/steps"] == 1.0 and r["wch/steps"] == 1.0 for r in train)
    assert all(m["detectors"] == ["lartpc", "wch"] for m in on_disk["history"]["monitor"])
    # a probe per detector, at step 0 (random init) and at the end, with that detector's classes
    for name, classes in (("lartpc", "shower"), ("wch", "muon")):
        probe = on_disk["probe"][name]
        assert [s for s, _ in probe["curve"]] == [0, 4] and classes in probe["classes"]
        assert (run / f"probe-{name}.png").read_bytes()[:4] == b"\x89PNG"
    # 4 steps x 2 ranks x 2 detectors x 1 event (a rank's 2 events split 1 + 1): both datasets fed the run
    assert on_disk["data"]["events_out"] >= 4 * 2 * 2 * 1
    assert summary["steps"] == 4

    state = torch.load(_last_state(run), weights_only=False)["student"]
    trunk = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    for name, channels in (("lartpc", 4), ("wch", 5)):
        weights, record = load_export(resolve(str(run / name)))
        assert record.kind == "backbone" and record.detector == name
        assert record.model.overrides["in_channels"] == channels
        want = split_stem(trunk, name)
        assert weights.keys() == want.keys() and all(torch.equal(weights[k], want[k]) for k in want)
    # the shared trunk is shared: the same tensors in both exports
    lar, _ = load_export(resolve(str(run / "lartpc")))
    wch, _ = load_export(resolve(str(run / "wch")))
    assert all(torch.equal(lar[k], wch[k]) for k in lar if not k.startswith("embedding."))
    assert not torch.equal(lar["embedding.norm.weight"], wch["embedding.norm.weight"])

    # the WCh export starts a `rings` fine-tune (and the LArTPC one would refuse WCh data by name)
    rings = str(Path(JOB).parent / "rings-wch-tiny.yaml")
    common = [
        f"data.uri={cross_data / 'wch'}",
        f"val_data.uri={cross_data / 'wch-val'}",
        f"run.storage={tmp_path}",
        "train.steps=1",
        "train.batch_events=2",
        "train.val_every=1",
        "train.checkpoint_every=1",
        "run.wandb_mode=offline",
        "scaling.cpus_per_worker=0.5",
        "data.read_cpus=0.25",
        "val_data.read_cpus=0.25",
        "model.mode=lin",
        "model.head=lin",
    ]
    run_job(load_config(RingsConfig, rings, [*common, "run.name=ft", f"model.init={run / 'wch'}"]), log=quiet)
    tuned, _ = load_export(resolve(str(tmp_path / "ft")))
    assert all(torch.equal(tuned["backbone." + k], v) for k, v in wch.items())  # frozen: exactly the export
    with pytest.raises(Exception, match="lartpc"):
        run_job(load_config(RingsConfig, rings, [*common, "run.name=ft2", f"model.init={run / 'lartpc'}"]), log=quiet)


@pytest.mark.slow
@pytest.mark.long
def test_cross_run_resumes_to_the_weights_of_an_uninterrupted_run(ray_local, cross_data, tmp_path):
    from raysvc.train.driver import run_job

    no_probe = ("probe.every=100", "sources.lartpc.weight=0.3", "sources.wch.weight=0.7")
    run_job(load_config(CrossPretrainConfig, JOB, _sets(cross_data, tmp_path, "straight", *no_probe)), log=quiet)
    run = tmp_path / "straight"
    want = torch.load(_last_state(run), weights_only=False)

    cfg = load_config(CrossPretrainConfig, JOB, _sets(cross_data, tmp_path, "retried", *no_probe))
    cfg.run.max_failures = 1
    run_job(cfg, log=quiet, fault={"step": 3, "marker": str(tmp_path / "fault"), "kind": "sigkill"})
    assert (tmp_path / "fault").exists()
    got = torch.load(_last_state(tmp_path / "retried"), weights_only=False)
    for part in ("student", "teacher"):
        assert all(torch.equal(got[part][k], want[part][k]) for k in want[part]), part
    assert got["data"] == want["data"] and len(got["data"][0]) == 7  # steps drawn + two sources' positions


def _last_state(run: Path) -> Path:
    return max((p for p in run.glob("checkpoint_*") if p.is_dir()), key=lambda p: p.name) / "state.pt"
