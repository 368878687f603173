"""Water Cherenkov event heads: the ring-count and PID metrics against sklearn and brute force, the event pooling
against a loop, event labels from generated events, and (long) a short fine-tune of the `rings` task end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from sklearn.metrics import confusion_matrix, roc_curve

from raysvc.config import load_config
from raysvc.data.contract.schema import table_from_events
from raysvc.data.sources.wch_generator import CATEGORIES, WChGeneratorConfig, generate_wch_record
from raysvc.data.streaming.shards import load_manifest, read_shard
from raysvc.inference.event_metrics import (
    efficiency_at_rejection,
    event_labels,
    pid_figures,
    ring_class,
    ring_confusion,
)
from raysvc.models.event_heads import pool_events
from raysvc.storage import resolve
from raysvc.train.tasks.rings import RingsConfig
from tests.conftest import with_heads


def quiet(*_a, **_k) -> None:
    pass


def test_ring_classes_and_confusion_match_sklearn():
    rng = np.random.default_rng(0)
    rings = rng.integers(0, 6, 400)
    true = ring_class(rings)
    assert true[rings == 0].tolist() == [-1] * int((rings == 0).sum())
    assert (true[rings >= 3] == 2).all() and (true[rings == 1] == 0).all() and (true[rings == 2] == 1).all()
    pred = rng.integers(0, 3, 400)
    keep = true >= 0
    assert ring_confusion(true, pred) == confusion_matrix(true[keep], pred[keep], labels=[0, 1, 2]).tolist()


def test_efficiency_at_rejection_matches_the_roc_curve():
    rng = np.random.default_rng(1)
    sig, bkg = rng.normal(1.0, 1.0, 3000), rng.normal(-1.0, 1.0, 20000)
    y = np.r_[np.ones(len(sig)), np.zeros(len(bkg))]
    fpr, tpr, thr = roc_curve(y, np.r_[sig, bkg])
    for rejection in (0.95, 0.999):
        got = efficiency_at_rejection(sig, bkg, rejection)
        # the best signal efficiency with a false-positive rate within 1 - rejection (sklearn passes score >= thr)
        best = tpr[fpr <= 1 - rejection + 1e-12].max()
        assert got["achievable"] and abs(got["efficiency"] - best) <= 1.0 / len(sig)
        assert np.mean(bkg > got["threshold"]) <= 1 - rejection
    small = efficiency_at_rejection(sig, bkg[:50], 0.999)  # 50 muons cannot show 99.9 % rejection
    assert small["achievable"] is False and small["threshold"] == bkg[:50].max()
    assert efficiency_at_rejection(sig, [], 0.95)["efficiency"] is None


def test_pid_figures_select_each_background():
    t = np.array([0, 0, 0, 0, 1, 1, 2, 2, -1])
    s = np.array([0.9, 0.8, 0.3, 0.2, 0.5, 0.1, 0.85, 0.25, 0.99])
    f = pid_figures(t, s)
    # 2 muons: at 99.9 % the threshold is the highest muon score, 0.5 -> electrons 0.9, 0.8 pass
    assert f["e_eff_at_mu_rej_999"] == 0.5
    # 2 pi0s: 5 % of 2 is 0 events -> threshold 0.85 -> only 0.9 passes
    assert f["e_eff_at_pi0_rej_95"] == 0.25
    assert f["events"] == {"electron": 4, "muon": 2, "pi0": 2}


def test_pool_events_matches_a_loop():
    torch.manual_seed(0)
    cells = torch.randn(23, 5)
    offset = torch.tensor([4, 4, 15, 23])  # the second event is empty
    got = pool_events(cells, offset)
    start = 0
    for b, end in enumerate(offset.tolist()):
        part = cells[start:end]
        want = torch.cat([part.mean(0), part.max(0).values]) if len(part) else torch.zeros(10)
        torch.testing.assert_close(got[b], want)
        start = end


def test_event_labels_from_generated_events():
    cfg = WChGeneratorConfig(particles={1: 1.0, 2: 1.0}, kinetic_mev=(200.0, 800.0))
    recs = [generate_wch_record(cfg, 3, i) for i in range(6)]
    table = table_from_events(recs, source="t", detector="wch")
    ring, pid = event_labels(table, CATEGORIES)
    for r, rec, rc, pc in zip(range(6), recs, ring, pid, strict=True):
        assert rc == min(rec["rings"], 3) - 1, r
        prim = [CATEGORIES[p] for p, k in zip(rec["particles"]["pid"], rec["particles"]["primary"], strict=True) if k]
        want = (
            ("electron", "muon", "pi0").index(prim[0])
            if len(prim) == 1 and prim[0] in ("electron", "muon", "pi0")
            else -1
        )
        assert pc == want, (r, prim)
    assert (pid >= 0).any() and (pid == -1).any()  # both kinds in this sample
    with pytest.raises(ValueError, match="need the `rings` column"):
        event_labels(table.drop_columns(["rings"]), CATEGORIES)


def test_an_export_with_event_heads_predicts_rings_and_pid_with_its_point_classes(tmp_path):
    """The Segmenter of a `rings` export runs one forward for both outputs: its point classes equal the plain
    segmenter's and its event probabilities equal the heads built straight from the weight files."""
    from raysvc.data.streaming.collate import collate_packed
    from raysvc.data.streaming.transforms import preprocess_table
    from raysvc.inference.featurize import model_inputs
    from raysvc.inference.record import export_seeded_segmenter, load_event_heads, load_export
    from raysvc.inference.segmenter import Segmenter
    from raysvc.models.event_heads import EventHeads

    loc = resolve(str(tmp_path / "rings"))
    export_seeded_segmenter(loc, 4, detector="wch", event_heads=True)
    recs = [generate_wch_record(WChGeneratorConfig(), 9, i) for i in range(3)]
    events = [(r["coord"], r["energy"], r["time"]) for r in recs]
    seg = Segmenter(loc)
    got = with_heads(seg, events)

    state, record = load_export(loc)
    model = record.build()
    model.load_state_dict(state)
    heads = EventHeads.from_weights(model, load_event_heads(loc)).eval()
    model.eval()
    table = table_from_events([{**r, "event_id": i} for i, r in enumerate(recs)], "t", "wch")
    pre, _ = preprocess_table(table, seg.preprocess, "t", detector=seg.detector)
    batch = collate_packed(pre)
    p = seg.preprocess
    x = model_inputs(batch, p.center, p.scale, record.model.grid_voxels, torch.device("cpu"), False)
    with torch.no_grad():
        logits = model(x["feat"], x["coord"], x["grid_coord"], x["offset"])[x["inverse"]]
        _, rings, pid = heads(x)
    bounds = [0, *batch["offset"].tolist()]
    for j, (classes, probs, ev) in enumerate(got):
        assert probs is None
        assert np.array_equal(classes, logits[bounds[j] : bounds[j + 1]].argmax(1).numpy())  # threshold 0: all kept
        assert ev["rings"]["classes"] == ["1R", "2R", ">=3R"] and ev["pid"]["classes"] == ["electron", "muon", "pi0"]
        np.testing.assert_allclose(ev["rings"]["probabilities"], torch.softmax(rings[j], 0).numpy(), rtol=1e-5)
        np.testing.assert_allclose(ev["pid"]["probabilities"], torch.softmax(pid[j], 0).numpy(), rtol=1e-5)
        assert ev["pid"]["predicted"] == ev["pid"]["classes"][int(torch.argmax(pid[j]))]
    # without the heads it is a plain segmenter; a record naming heads whose file is gone is an error naming it
    plain = resolve(str(tmp_path / "plain"))
    export_seeded_segmenter(plain, 4, detector="wch")
    assert Segmenter(plain).outputs == [] and set(Segmenter(plain).predict_events_full(events)[0]) == {"pred"}
    (tmp_path / "rings" / "event_heads.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="event_heads.safetensors is missing"):
        Segmenter(loc)


def test_predict_and_evaluate_give_a_rings_exports_event_outputs(tmp_path):
    """`raysvc predict` on a `rings` export writes each event's ring count and PID beside its hit classes, equal to
    the Segmenter's (what the endpoint answers); `raysvc evaluate` reports the ring-count confusion and PID figures,
    equal to sklearn's confusion matrix and `pid_figures` recomputed from those predictions and the shards' labels
    over the events that pass the model's cuts."""
    from sklearn.metrics import confusion_matrix

    from raysvc.data.sources.synthetic import generate_dataset
    from raysvc.data.streaming.transforms import preprocess_table
    from raysvc.inference.batch import evaluate_dataset, predict_dataset, preds_schema
    from raysvc.inference.record import export_seeded_segmenter, load_record
    from raysvc.inference.segmenter import Segmenter

    model, data, out = (resolve(str(tmp_path / n)) for n in ("rings", "data", "preds"))
    export_seeded_segmenter(model, 5, detector="wch", event_heads=True)
    cfg = WChGeneratorConfig(particles={1: 2.0, 2: 1.0}, kinetic_mev=(100.0, 600.0))
    generate_dataset(data, 10, 41, 4, cfg, show_progress=False, detector="wch")
    info = predict_dataset(model, data, out, batch_events=3, log=quiet)
    assert info["event_classes"] == {"rings": ["1R", "2R", ">=3R"], "pid": ["electron", "muon", "pi0"]}
    preds = pa.concat_tables([pq.read_table(tmp_path / "preds" / f) for f in info["files"]])
    assert preds.schema == preds_schema(load_record(model), ["event_heads"])
    table = pa.concat_tables([read_shard(data, r) for r in load_manifest(data).shards])
    assert preds.column("event_id").to_pylist() == table.column("event_id").to_pylist()

    seg = Segmenter(model)
    rows = table.to_pylist()
    want = with_heads(seg, [(r["coord"], r["energy"], r["time"]) for r in rows])
    for p, (classes, _, ev) in zip(preds.to_pylist(), want, strict=True):
        assert np.array_equal(p["pred"], classes)
        np.testing.assert_allclose(p["ring_probs"], ev["rings"]["probabilities"], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(p["pid_probs"], ev["pid"]["probabilities"], rtol=1e-4, atol=1e-6)
        assert ["1R", "2R", ">=3R"][p["rings"]] == ev["rings"]["predicted"]
        assert ["electron", "muon", "pi0"][p["pid"]] == ev["pid"]["predicted"]

    got = evaluate_dataset(model, data, batch_events=3, log=quiet)
    kept = set(preprocess_table(table, seg.record.preprocess, "t", detector=seg.detector)[0]["event_id"].to_pylist())
    scored = np.isin(table.column("event_id").to_numpy(), list(kept))
    ring, pid = event_labels(table, CATEGORIES)
    ring_pred = preds.column("rings").to_numpy()
    sel = scored & (ring >= 0)
    cm = confusion_matrix(ring[sel], ring_pred[sel], labels=[0, 1, 2])
    assert got["ring_count_confusion"] == cm.tolist() and cm.sum() > 0
    assert got["ring_accuracy"] == pytest.approx(np.trace(cm) / cm.sum())
    e_score = np.array([p[0] for p in preds.column("pid_probs").to_pylist()])
    ref = pid_figures(np.where(scored, pid, -1), e_score)
    assert got["pid"]["events"] == ref["events"] and sum(ref["events"].values()) > 0
    for k in ("e_eff_at_mu_rej_999", "e_eff_at_pi0_rej_95"):
        assert got["pid"][k] == pytest.approx(ref[k])


JOB = str(Path(__file__).parents[1] / "jobs" / "rings-wch-tiny.yaml")


def _tank_run(tmp_path: Path, cfg_gen, train: tuple[int, int], val: tuple[int, int], name: str, steps: int) -> list:
    """Generates tank events (events, seed) into tmp_path/train and /val; the --set list of a short 1-worker run on
    them, validated and checkpointed at its last step."""
    from raysvc.data.sources.synthetic import generate_dataset

    for part, (n, seed) in (("train", train), ("val", val)):
        generate_dataset(resolve(str(tmp_path / part)), n, seed, 4, cfg_gen, show_progress=False, detector="wch")
    return [
        f"data.uri={tmp_path / 'train'}",
        f"val_data.uri={tmp_path / 'val'}",
        f"run.storage={tmp_path}",
        f"run.name={name}",
        f"train.steps={steps}",
        f"train.val_every={steps}",
        f"train.checkpoint_every={steps}",
        "train.batch_events=2",
        "run.max_failures=0",
        "run.wandb_mode=offline",
        "scaling.cpus_per_worker=0.5",
        "data.read_cpus=0.25",
        "val_data.read_cpus=0.25",
    ]


@pytest.mark.slow
@pytest.mark.long
def test_rings_finetune_reports_ring_and_pid_figures_and_exports_a_servable_segmenter(ray_local, tmp_path):
    """A short `rings` run on generated tank events: summary.json has the talk's keys with counts that add up, and
    the export predicts like any segmenter."""
    from raysvc.inference.batch import predict_dataset
    from raysvc.train.driver import run_job

    cfg_gen = WChGeneratorConfig(particles={1: 3.0, 2: 1.0}, species={"electron": 1.0, "muon": 1.0, "pi0": 1.0})
    sets = _tank_run(tmp_path, cfg_gen, (8, 21), (8, 22), "rings", 4) + ["train.log_every=2"]
    run_job(load_config(RingsConfig, JOB, sets), log=quiet)
    val = json.loads((tmp_path / "rings" / "summary.json").read_text())["val"]
    table = pa.concat_tables(
        [read_shard(resolve(str(tmp_path / "val")), r) for r in load_manifest(resolve(str(tmp_path / "val"))).shards]
    )
    ring, pid = event_labels(table, CATEGORIES)
    confusion = np.array(val["ring_count_confusion"])
    assert confusion.shape == (3, 3) and confusion.sum(1).tolist() == np.bincount(ring[ring >= 0], minlength=3).tolist()
    assert set(val["pid"]) >= {"e_eff_at_mu_rej_999", "e_eff_at_pi0_rej_95"}
    assert val["pid"]["events"] == {n: int((pid == i).sum()) for i, n in enumerate(("electron", "muon", "pi0"))}
    assert val["miou"] is not None and (tmp_path / "rings" / "event_heads.safetensors").stat().st_size > 0
    info = predict_dataset(
        resolve(str(tmp_path / "rings")), resolve(str(tmp_path / "val")), resolve(str(tmp_path / "preds")), log=quiet
    )
    assert info["events"] == table.num_rows


@pytest.mark.slow
def test_rings_as_instances_from_the_panoptic_head_on_tank_events(ray_local, tmp_path):
    """The per-hit ring segmentation as instances (`jobs/rings-instances-wch-tiny.yaml`: the panoptic task's instance
    head on water Cherenkov events): it trains, scores every true ring of the held-out events, and its export
    answers a tank event with an instance per hit through the Segmenter (as the endpoint does)."""
    from raysvc.inference.segmenter import Segmenter
    from raysvc.train.driver import run_job
    from raysvc.train.tasks.panoptic import PanopticConfig

    sets = _tank_run(tmp_path, WChGeneratorConfig(particles={2: 1.0, 3: 1.0}), (8, 31), (6, 32), "ri", 2)
    sets += ["train.val_events=null"]
    job = str(Path(__file__).parents[1] / "jobs" / "rings-instances-wch-tiny.yaml")
    run_job(load_config(PanopticConfig, job, sets), log=quiet)
    val = json.loads((tmp_path / "ri" / "summary.json").read_text())["val"]["particle"]
    assert list(val["per_class"]) == ["gamma", "electron", "muon", "pion", "pi0"]
    # the true rings, counted here from the shards: distinct particles owning a hit that is not dark noise
    loc = resolve(str(tmp_path / "val"))
    table = pa.concat_tables([read_shard(loc, r) for r in load_manifest(loc).shards])
    rings = 0
    for row in table.to_pylist():
        if row["num_points"] >= 16:  # the job's min_points cut
            owner, sem, pid = (np.asarray(row[k]) for k in ("particle", "semantic", "pid"))
            rings += len(np.unique(owner[(owner >= 0) & (sem != 4) & (pid >= 0)]))
    assert val["counts"]["true"] == rings > 0
    seg = Segmenter(resolve(str(tmp_path / "ri")))
    row = table.slice(0, 1).to_pylist()[0]
    points = np.asarray(row["coord"], np.float32).reshape(-1, 3)
    got = seg.predict_events_full([(points, np.asarray(row["energy"]), np.asarray(row["time"]))])[0]
    assert len(got["pred"]) == len(points) and len(got["instances"]["particle"].instance) == len(points)
