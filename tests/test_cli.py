"""The `raysvc` console script as a user runs it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

RAYSVC = str(Path(sys.executable).parent / "raysvc")


def run(*args, env=None, check=True, timeout=600):
    p = subprocess.run(
        [RAYSVC, *args], capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=timeout
    )
    if check and p.returncode != 0:
        raise AssertionError(f"raysvc {' '.join(args)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def test_generate_inspect_show_verify(tmp_path):
    out = tmp_path.as_uri() + "/gen"
    run(
        "data",
        "generate",
        "--events",
        "30",
        "--seed",
        "2",
        "--out",
        out,
        "--shard-events",
        "10",
        "--workers",
        "2",
        "--set",
        "crossing_muons_mean=1.0",
    )
    stats = json.loads(run("data", "inspect", out, "--json").stdout)
    assert stats["events"] == 30 and stats["shards"] == 3
    for key in ("median", "mean"):
        assert stats["points_per_event"][key] > 0
    assert set(stats["class_fractions"]) == {"shower", "track", "michel", "delta", "led"}
    assert sum(stats["class_fractions"].values()) == pytest.approx(1.0)
    assert stats["interactions_per_event"]["mean"] > 0 and stats["particles_per_event"]["mean"] > 0
    png = tmp_path / "ev.png"
    run("data", "show", out, "--event", "4", "--out", str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    assert json.loads(run("data", "verify", out).stdout)["bad_events"] == 0
    manifest = json.loads((tmp_path / "gen" / "manifest.json").read_text())
    assert manifest["created_by"]["generator"]["crossing_muons_mean"] == 1.0


def test_generate_to_s3_and_inspect(s3_env, tmp_path):
    uri = f"s3://cli-test/{tmp_path.name}"
    run("data", "generate", "--events", "6", "--out", uri, "--shard-events", "3", "--workers", "1")
    assert json.loads(run("data", "inspect", uri, "--json").stdout)["events"] == 6


def test_a_command_run_in_process_leaves_s3_usable(tmp_path):
    """`main([...])` in a process that goes on (a notebook, a test) must not finalize pyarrow's S3 as the `raysvc`
    script does at its end: an S3 filesystem made afterwards in that process would fail to start."""
    run("data", "generate", "--events", "2", "--out", str(tmp_path / "d"), "--shard-events", "2", "--workers", "1")
    code = (
        "import pyarrow.fs as pafs\n"
        "from raysvc.cli import main\n"
        f"main(['data', 'inspect', {str(tmp_path / 'd')!r}, '--json'])\n"
        "pafs.S3FileSystem(region='us-east-1')\n"  # no request is made: only the AWS SDK's start
        "print('s3 usable')\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and p.stdout.strip().endswith("s3 usable"), p.stderr


def test_errors_are_clear(tmp_path, seaweed):
    p = run("data", "inspect", str(tmp_path / "nothing"), check=False)
    assert p.returncode == 2 and "nothing/manifest.json" in p.stderr and "Traceback" not in p.stderr
    p = run("data", "generate", "--events", "3", "--out", str(tmp_path / "x"), "--set", "bogus=1", check=False)
    assert p.returncode == 2 and "bogus" in p.stderr
    env = {**seaweed.env(), "AWS_SECRET_ACCESS_KEY": "wrong"}
    p = run("data", "generate", "--events", "2", "--out", "s3://cli-auth/x", "--workers", "1", env=env, check=False)
    assert p.returncode != 0 and "rejected the credentials" in p.stderr
    p = run("data", "show", str(tmp_path / "x"), "--event", "0", "--out", str(tmp_path / "a.png"), check=False)
    assert p.returncode == 2


@pytest.mark.slow
def test_bench_ingest_json(tmp_path):
    out = tmp_path / "bench.json"
    p = run("bench", "ingest", "--json", "--events", "200", "--shard-events", "50", "--repeats", "1", "--out", str(out))
    result = json.loads(p.stdout[p.stdout.index("{") :])
    assert result == json.loads(out.read_text())
    assert result["ratio"] == pytest.approx(result["ray_data_events_per_s"] / result["direct_events_per_s"])
    assert result["events_per_pass"] == result["ray_ledger"]["events_out"] > 0
    assert result["store"].startswith("seaweedfs")


@pytest.mark.slow
def test_bench_ops_json(tmp_path):
    out = tmp_path / "ops.json"
    p = run("bench", "ops", "--json", "--events", "6", "--repeats", "1", "--out", str(out))
    r = json.loads(p.stdout)
    assert json.loads(out.read_text()) == r
    for key in (
        "cnms_ball_events_per_s",
        "fps_ball_events_per_s",
        "fps_knn_events_per_s",
        "cnms_vs_fps_ball",
        "hilbert_mpts_per_s",
        "z_mpts_per_s",
    ):
        assert r[key] > 0, key
    assert r["cnms_vs_fps_ball"] == pytest.approx(r["cnms_ball_events_per_s"] / r["fps_ball_events_per_s"])
    assert r["settings"]["points_per_event_mean"] >= 1024 and r["settings"]["radius"] == 5.0
    g = r["grouping"]
    assert g["groups_per_event"] > 10
    for method in ("cnms_ball", "fps_ball", "fps_knn"):
        assert 0 <= g["coverage"][method]["missed_ratio"] < 1 and 0 <= g["coverage"][method]["duplicated_ratio"] <= 1
    assert g["coverage"]["fps_knn"]["duplicated_ratio"] > g["coverage"]["cnms_ball"]["duplicated_ratio"]
    t = r["tokenizer"]
    for method in ("cnms_ball", "fps_ball", "fps_knn"):
        assert t[f"{method}_tokens_events_per_s"] > 0, method
    ratio = t["cnms_ball_tokens_events_per_s"] / t["fps_ball_tokens_events_per_s"]
    assert t["cnms_vs_fps_ball"] == pytest.approx(ratio) and "mini-PointNet" in t["embed"]
    conv = r["sparse_conv"]
    assert conv["max_abs_diff_vs_spconv"] < 1e-4  # the baseline computes the same convolution
    assert conv["ours_fwd_bwd_s"] > 0 and conv["spconv_cpu_fwd_bwd_s"] > 0
    assert "serialization" in p.stderr or "grouping" in p.stderr  # progress goes to stderr


@pytest.mark.slow
@pytest.mark.long
def test_bench_train_json(tmp_path):
    out = tmp_path / "train.json"
    p = run("bench", "train", "--json", "--profile", "--events", "24", "--steps", "5", "--out", str(out))
    r = json.loads(p.stdout)
    assert json.loads(out.read_text()) == r
    assert 0 < r["tiny_params"] < r["small_params"]
    assert 0 < r["tiny_fwd_bwd_s_per_event"] < r["small_fwd_bwd_s_per_event"]
    assert r["steps_compared"] == 2 and r["plain_step_s"] > 0 and r["ray_train_step_s"] > 0
    assert r["ray_train_overhead"] > -1
    for task in ("seg", "panda"):
        assert r[f"{task}_tiny_s_per_step"] > 0 and 0 < r[f"{task}_tiny_profile"]["gemm_share"] < 1


@pytest.mark.slow
@pytest.mark.long
def test_bench_heap_allocators_leave_the_training_unchanged(tmp_path):
    out = tmp_path / "heap.json"
    r = json.loads(
        run(
            "bench",
            "heap",
            "--json",
            "--task",
            "segmentation",
            "--events",
            "16",
            "--steps",
            "8",
            "--variants",
            "glibc",
            "trim-1",
            "jemalloc",
            "--out",
            str(out),
        ).stdout
    )
    assert json.loads(out.read_text()) == r and list(r["variants"]) == ["glibc", "trim-1", "jemalloc"]
    base, each = r["variants"]["glibc"], r["variants"]["trim-1"]
    assert all(v["same_losses_as_glibc"] for v in r["variants"].values()) and len(each["losses"]) == 8
    assert each["private_mb_max"] < 0.8 * base["private_mb_max"]  # the freed activations left the process
    assert each["step_time_vs_glibc"] == pytest.approx(each["total_s"] / base["total_s"])
    # what the trim gave back, the next step faults in again; untrimmed glibc reuses its kept pages
    assert each["faulted_mb_per_step"] > 10 * max(base["faulted_mb_per_step"], 1)
    lib = r["settings"]["variants"]["jemalloc"]["env"]["LD_PRELOAD"]
    assert lib.endswith("libjemalloc.so") and not os.path.isabs(lib)  # no machine's path in a result file
    assert len(r["settings"]["load_avg_start"]) == len(r["settings"]["load_avg_end"]) == 3
    assert run("bench", "heap", "--variants", "no-such-allocator", check=False).returncode == 2


@pytest.mark.slow
@pytest.mark.timeout(1200)  # 3-5 min alone on 2 cores, three probes included; more on a loaded machine
def test_demo_end_to_end(tmp_path):
    work = tmp_path / "demo"
    for stale in ("pretrain-2", "finetune-4"):  # an earlier demo's runs: measured anew, not resumed
        (work / stale).mkdir(parents=True)
        (work / stale / "stale").write_text("x")
    p = run(
        "demo",
        "--workdir",
        str(work),
        "--events",
        "300",
        "--pretrain-steps",
        "2",
        "--finetune-steps",
        "4",
        "--probe-events",
        "16",  # the probes prove the same on fewer events: 3 s each instead of 15
        timeout=1100,
    )
    summary = json.loads((work / "summary.json").read_text())
    # the console through pipes: plain lines, a bounded number, naming the interactive page it wrote
    console = p.stdout + p.stderr
    assert "\x1b" not in console and "\r" not in console and len(console.splitlines()) < 120, console
    assert summary["display"] == str(work / "predictions.html") and "predictions.html" in p.stdout
    # fine-tuned from the pretrained backbone, then served: every held-out event answered as in process
    ft, served = summary["finetune"], summary["serve"]
    assert ft["steps"] == 4 and ft["label_events"] == 100 and 0 < ft["val"]["miou"] <= 1
    assert json.loads((work / "finetune-4" / "config.json").read_text())["model"]["init"].endswith("/demo/pretrain-2")
    assert served["events"] == served["identical_to_in_process"] == 20 and 0 < served["miou"] <= 1
    probe = summary["pretrain"]["probe"]  # the tiny Panda run on the S3 events, probed at steps 0, 1, 2
    assert summary["pretrain"]["steps"] == 2 and [s for s, _ in probe["curve"]] == [0, 1, 2]
    assert probe["random_miou"] == probe["curve"][0][1] and (work / "pretrain-2" / "backbone.safetensors").exists()
    assert summary["ok"] and summary["dataset"]["storage"] == "seaweedfs"
    # where the time went, stage by stage, in the order the console announced them (the serve stage draws the page)
    stages = summary["stages_s"]
    order = ["seaweedfs", "generate", "statistics", "ray", "ingest", "pretrain", "finetune", "serve", "shutdown"]
    assert list(stages) == order and all(v >= 0 for v in stages.values())
    assert stages["pretrain"] > 0 and sum(stages.values()) <= summary["total_s"] + 1
    assert all(f"==> {line}" in p.stdout for line in ("starting a private Ray", "stopping Ray and SeaweedFS"))
    assert summary["stream"]["events_delivered"] == summary["stream"]["ledger"]["events_out"] > 200
    for png in ("summary.png", "event0.png"):
        assert (work / png).stat().st_size > 20_000
    assert not (work / "pretrain-2" / "stale").exists() and not (work / "finetune-4" / "stale").exists()


def test_the_demo_draws_its_models_predictions_in_an_interactive_page(tmp_path):
    """The demo's display step on an exported segmenter: a self-contained page of the model's predictions on new
    labelled events, the same classes its predict output holds."""
    import pyarrow.parquet as pq

    from raysvc.demo import _display
    from raysvc.inference.record import export_seeded_segmenter
    from raysvc.storage import resolve

    model = tmp_path / "model"
    export_seeded_segmenter(resolve(str(model)), seed=0)
    page = _display(str(model), tmp_path, seed=0, events=3)
    html = page.read_text()
    assert page == tmp_path / "predictions.html" and "<script" in html and "https://" not in html.split("<body", 1)[1]
    preds = pq.read_table(tmp_path / "display-predictions" / "preds-00000.parquet").to_pylist()
    drawn = json.loads(re.search(r"const EVENTS = (\[.*?\]);\n", html).group(1))
    assert [e["id"] for e in drawn] == [p["event_id"] for p in preds] and len(drawn) == 3
    assert all(e["pred"] == p["pred"] for e, p in zip(drawn, preds, strict=True))  # every point's class, as predicted


def test_data_subset_writes_the_events_subset_events_selects(tmp_path):
    from raysvc.data.streaming.config import DataConfig
    from raysvc.data.streaming.prepared import prepare
    from raysvc.data.streaming.shards import load_manifest, read_shard
    from raysvc.storage import resolve

    src, dst = str(tmp_path / "gen"), str(tmp_path / "sub")
    run("data", "generate", "--events", "40", "--seed", "5", "--out", src, "--shard-events", "10", "--workers", "1")
    out = run("data", "subset", src, "--events", "7", "--seed", "3", "--out", dst, "--shards", "2").stdout
    assert "7 events" in out and "2 shards" in out
    m = load_manifest(resolve(dst))
    got = sorted(i for rec in m.shards for i in read_shard(resolve(dst), rec).column("event_id").to_pylist())
    chosen = prepare(DataConfig(uri=src, subset_events=7, subset_seed=3)).keep_ids
    assert got == sorted(np.asarray(chosen).tolist())
    assert len(m.shards) == 2 and m.created_by == {"subset_of": resolve(src).uri, "events": 7, "subset_seed": 3}
    first = (tmp_path / "sub" / "manifest.json").read_text()
    run("data", "subset", src, "--events", "7", "--seed", "3", "--out", dst, "--shards", "2")  # kept as it is
    assert (tmp_path / "sub" / "manifest.json").read_text() == first
    bad = run("data", "subset", src, "--events", "41", "--out", str(tmp_path / "bad"), check=False)
    assert bad.returncode != 0 and "has 40" in bad.stderr


@pytest.mark.parametrize("name", ["ingest", "ops", "train", "gpu", "launches", "heap", "serve"])
def test_a_bench_row_gives_its_run_function_every_setting(name):
    """A benchmark's defaults stand only in its row of the bench table: `raysvc bench <name>` with no options must
    still bind every argument its run function takes."""
    import inspect

    from raysvc.cli import build_parser
    from raysvc.cli.bench import BENCHES, run_function, run_keywords

    bench = BENCHES[name]
    inspect.signature(run_function(bench)).bind(**run_keywords(bench, build_parser().parse_args(["bench", name])))
