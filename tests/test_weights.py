"""Models in and out (raysvc.hub, `raysvc weights`): a raysvc export, a Sonata-style checkpoint and pimm's export
layout read into the same weights and record; pimm's layout written so that pimm's loader can read it; foreign
sources state what they know and are asked the rest; bad sources are one clear error and leave nothing behind."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

import raysvc.hub as hub
from raysvc.cli import main
from raysvc.data.streaming.transforms import PreprocessConfig
from raysvc.hub.reference import config_to_reference, state_to_reference
from raysvc.inference.record import ExportedModel, ModelSpec, load_export, save_export
from raysvc.models.ptv3 import PTv3, preset
from raysvc.storage import resolve

# a tiny PTv3 in the reference's layout (linear stem): what every format here can hold
REF_TINY = {"stem": "linear", "in_channels": 4}
ANSWERS = ["--detector", "lartpc", "--grid-voxels", "0.665", "--center-events", "--licence", "MIT"]


def tiny_encoder(seed: int = 0) -> dict[str, torch.Tensor]:
    """Weights of a tiny reference-layout encoder, every LayerNorm and bias moved off its init (so that a norm or
    bias that went missing or swapped places shows)."""
    torch.manual_seed(seed)
    state = PTv3(preset("tiny", **REF_TINY)).state_dict()
    return {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in state.items()}


def backbone_export(path, seed: int = 0, licence: str | None = "MIT") -> dict[str, torch.Tensor]:
    state = tiny_encoder(seed)
    record = ExportedModel(
        kind="backbone",
        method="panda",
        detector="lartpc",
        model=ModelSpec(
            size="tiny", overrides=REF_TINY, grid_voxels=0.665, center_events=True, init=str(path) + "-parent"
        ),
        preprocess=PreprocessConfig(),
        licence=licence,
    )
    save_export(resolve(str(path)), state, record)
    return state


def sonata_checkpoint(path, seed: int = 0, **extra) -> dict[str, torch.Tensor]:
    """torch.save({"config": kwargs, "state_dict": bare reference keys}), as Sonata publishes its weights."""
    state = tiny_encoder(seed)
    cfg = preset("tiny", **REF_TINY)
    kwargs = {k: v for k, v in config_to_reference(cfg).items() if k != "type"}  # Sonata's kwargs carry no type
    torch.save({"config": kwargs, "state_dict": state_to_reference(state, cfg), **extra}, path)
    return state


@pytest.fixture(autouse=True)
def _keep_s3(monkeypatch):
    """The command line finalises the process's S3 client as it exits; run in this process, it must not (later
    tests use S3)."""
    import raysvc.cli

    monkeypatch.setattr(raysvc.cli, "release_s3", lambda: None)


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `raysvc ...` in this process."""
    code = 0
    try:
        main(list(argv))
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def stage_outputs(model: torch.nn.Module, seed: int = 3) -> list[torch.Tensor]:
    """Every encoder stage's features for two small random events (eval mode, fixed orders)."""
    with torch.no_grad():
        levels = model(*stage_inputs(seed))
    return [lv.feat for lv in levels]


def test_raysvc_to_pimm_layout_and_back_is_exact(tmp_path, capsys):
    """raysvc export -> `weights export --format pimm` -> `weights import`: bit-equal tensors, the same record, equal
    stage outputs; the pimm directory is pimm's layout (manifest, registry config of type PT-v3m2, safetensors in
    the reference's names) with no machine path inside."""
    state = backbone_export(tmp_path / "ours")
    code, out, err = run_cli(
        capsys, "weights", "export", str(tmp_path / "ours"), "--format", "pimm", "--out", str(tmp_path / "pimm")
    )
    assert code == 0, err
    assert "licence of these weights: MIT" in err
    pimm = tmp_path / "pimm"
    manifest = json.loads((pimm / "config.json").read_text())
    assert manifest == {
        "library_name": "pimm",
        "format_version": 1,
        "model_type": "PT-v3m2",
        "weights": "model.safetensors",
        "model_config": "model_config.json",
    }
    model_config = json.loads((pimm / "model_config.json").read_text())
    assert model_config["type"] == "PT-v3m2" and model_config["enc_mode"] is True
    from safetensors.torch import load_file

    ref_keys = set(load_file(str(pimm / "model.safetensors")))
    assert "embedding.stem.linear.weight" in ref_keys and "enc.enc0.block0.cpe.0.weight" in ref_keys
    for f in pimm.iterdir():
        assert str(tmp_path) not in f.read_bytes().decode(errors="replace"), f.name
    assert "license: MIT" in (pimm / "README.md").read_text()

    code, out, err = run_cli(capsys, "weights", "import", str(pimm), "--out", str(tmp_path / "back"))
    assert code == 0, err
    assert json.loads(out)["from"] == "pimm" and "licence of these weights: MIT" in err
    back, record = load_export(resolve(str(tmp_path / "back")))
    assert_same(back, state)
    assert record.licence == "MIT" and record.source["format"] == "pimm" and record.format_version == 2
    original = load_export(resolve(str(tmp_path / "ours")))[1]
    assert record.model.model_dump() == {**original.model.model_dump(), "init": "ours-parent"}
    assert record.preprocess == original.preprocess and record.detector == original.detector
    # the same network, stage by stage, loaded from all three places
    outs = [stage_outputs(hub.load(str(p))) for p in (tmp_path / "ours", pimm, tmp_path / "back")]
    for other in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outs[0], other, strict=True))


def test_sonata_checkpoint_loads_and_imports_when_told_what_it_does_not_state(tmp_path, capsys):
    """A Sonata-style .pth: hub.load reads it (what it does not state listed in record.unstated); `weights import`
    refuses until the detector, grid, centring and licence are given, then writes a backbone export with the same
    weights, printing the licence."""
    state = sonata_checkpoint(tmp_path / "sonata.pth")
    model = hub.load(str(tmp_path / "sonata.pth"))
    assert isinstance(model, PTv3) and not model.training
    assert_same(model.state_dict(), state)
    assert model.record.unstated == ["detector", "grid_voxels", "center_events", "licence"]
    assert model.record.source["format"] == "sonata" and len(model.record.source["sha256"]) == 64

    out_dir = tmp_path / "imported"
    code, _, err = run_cli(
        capsys, "weights", "import", str(tmp_path / "sonata.pth"), "--out", str(out_dir), "--detector", "lartpc"
    )
    assert code == 2 and err.count("\n") == 1
    assert "sonata.pth does not state grid_voxels, center_events, licence" in err
    assert "--grid-voxels X, --center-events or --no-center-events, --licence TEXT" in err
    assert not out_dir.exists() and os.listdir(tmp_path) == ["sonata.pth"]

    code, out, err = run_cli(
        capsys, "weights", "import", str(tmp_path / "sonata.pth"), "--out", str(out_dir), *ANSWERS[:-1], "CC-BY-NC-4.0"
    )
    assert code == 0, err
    assert "licence of these weights: CC-BY-NC-4.0" in err
    weights, record = load_export(resolve(str(out_dir)))
    assert_same(weights, state)
    assert (record.kind, record.detector, record.model.grid_voxels, record.model.center_events) == (
        "backbone",
        "lartpc",
        0.665,
        True,
    )
    # the reference's behaviour where it differs from raysvc's default: one serialization depth per batch
    reference_mode = preset("tiny", **REF_TINY, serialization_depth="batch")
    assert record.licence == "CC-BY-NC-4.0" and record.model.backbone_config() == reference_mode
    assert sorted(os.listdir(out_dir)) == ["backbone.safetensors", "config.json"]


def test_prefixed_checkpoints(tmp_path, capsys):
    """`module.` and `backbone.` on every key are taken off; a pretraining checkpoint with the encoder under
    `student.backbone.` beside other keys is an error asking for --prefix, and with it the others are listed."""
    state = tiny_encoder()
    cfg = preset("tiny", **REF_TINY)
    ref = state_to_reference(state, cfg)
    kwargs = config_to_reference(cfg)
    torch.save(
        {"config": kwargs, "state_dict": {f"module.backbone.{k}": v for k, v in ref.items()}}, tmp_path / "ddp.pth"
    )
    assert_same(hub.load(str(tmp_path / "ddp.pth")).state_dict(), state)

    teacher = {f"teacher.backbone.{k}": v for k, v in ref.items()}
    torch.save(
        {"config": kwargs, "state_dict": {**{f"student.backbone.{k}": v for k, v in ref.items()}, **teacher}},
        tmp_path / "pretrain.pth",
    )
    code, _, err = run_cli(
        capsys, "weights", "import", str(tmp_path / "pretrain.pth"), "--out", str(tmp_path / "a"), *ANSWERS
    )
    assert code == 2 and "give --prefix student.backbone." in err and "teacher.backbone.embedding" in err
    code, out, err = run_cli(
        capsys,
        "weights",
        "import",
        str(tmp_path / "pretrain.pth"),
        "--out",
        str(tmp_path / "a"),
        *ANSWERS,
        "--prefix",
        "student.backbone.",
    )
    assert code == 0, err
    assert json.loads(out)["skipped"] == len(teacher) and "not imported (outside --prefix" in err
    assert_same(load_export(resolve(str(tmp_path / "a")))[0], state)


def _bad_sources(tmp_path) -> dict[str, tuple[str, str]]:
    """name -> (path, what the error must say)."""
    cfg = preset("tiny", **REF_TINY)
    kwargs = config_to_reference(cfg)
    ref = state_to_reference(tiny_encoder(), cfg)
    cases = {}

    def save(name, obj):
        torch.save(obj, tmp_path / name)
        return str(tmp_path / name)

    (tmp_path / "somedir").mkdir()
    (tmp_path / "somedir" / "weights.txt").write_text("hello")
    cases["unknown directory"] = (str(tmp_path / "somedir"), r"somedir: unknown model format.*weights\.txt")
    (tmp_path / "notes.txt").write_text("not a model")
    cases["text file"] = (str(tmp_path / "notes.txt"), r"notes\.txt: not a readable torch checkpoint")
    wrong = dict(ref)
    wrong["enc.enc1.block0.attn.qkv.weight"] = torch.zeros(3, 3)
    cases["wrong shape"] = (
        save("shape.pth", {"config": kwargs, "state_dict": wrong}),
        r"shape\.pth.*enc\.enc1\.block0\.attn\.qkv\.weight.*\(3, 3\)",
    )
    missing = {k: v for k, v in ref.items() if k != "enc.enc2.block0.norm1.0.weight"}
    cases["missing key"] = (
        save("missing.pth", {"config": kwargs, "state_dict": missing}),
        r"missing\.pth.*the file lacks \[enc\.enc2\.block0\.norm1\.0\.weight\]",
    )
    cases["extra key"] = (
        save("extra.pth", {"config": kwargs, "state_dict": {**ref, "enc.enc0.extra": torch.ones(1)}}),
        r"extra\.pth.*map to nothing \[enc\.enc0\.extra\]",
    )
    good = save("good.pth", {"config": kwargs, "state_dict": ref})
    (tmp_path / "truncated.pth").write_bytes(open(good, "rb").read()[:5000])
    cases["truncated"] = (str(tmp_path / "truncated.pth"), r"truncated\.pth: not a readable torch checkpoint")
    (tmp_path / "list.pkl").write_bytes(pickle.dumps([1, 2, 3]))
    cases["plain pickle"] = (str(tmp_path / "list.pkl"), r"list\.pkl: not a readable torch checkpoint")
    cases["a saved list"] = (save("list.pth", [torch.ones(2)]), r"list\.pth: not a checkpoint: it holds a list")
    cases["code to unpickle"] = (
        save("code.pth", {"state_dict": PreprocessConfig()}),
        r"code\.pth: not a checkpoint: it needs arbitrary code to unpickle",
    )
    cases["no config"] = (save("noconfig.pth", ref), r"noconfig\.pth: holds no model config; give .*--config")
    cases["not tensors"] = (
        save("strings.pth", {"a": "b"}),
        r"strings\.pth: not a checkpoint: expected a dict of "
        r"tensors, found 'a' \(str\)",
    )
    return cases


def test_bad_sources_are_one_clear_error_and_leave_nothing(tmp_path, capsys):
    """Every bad source: exit 2, one `raysvc: error:` line naming the file (and the keys), nothing at --out and no
    staging folder beside it."""
    import re

    src = tmp_path / "src"
    src.mkdir()
    outs = tmp_path / "outs"
    outs.mkdir()
    for name, (path, expected) in _bad_sources(src).items():
        code, out, err = run_cli(capsys, "weights", "import", path, "--out", str(outs / "m"), *ANSWERS)
        assert code == 2, (name, err)
        assert err.startswith("raysvc: error: ") and err.count("\n") == 1, (name, err)
        assert re.search(expected, err), (name, err)
        assert os.listdir(outs) == [], name


def test_an_existing_output_is_never_written_over(tmp_path, capsys):
    backbone_export(tmp_path / "ours")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    code, _, err = run_cli(
        capsys, "weights", "export", str(tmp_path / "ours"), "--format", "pimm", "--out", str(tmp_path / "taken")
    )
    assert code == 2 and "taken: already exists" in err
    assert os.listdir(tmp_path / "taken") == ["keep.txt"]


def test_a_dec_segmenter_goes_to_pimm_as_a_segmentor_and_back(tmp_path, capsys):
    """A "dec" segmenter -> pimm's DefaultSegmentorV2 (PT-v3m2 with its decoder under backbone., a linear seg_head)
    -> raysvc: bit-equal weights and equal logits; a "lin" segmenter has no pimm counterpart without
    --encoder-only; a segmentor from elsewhere must be told its class names."""
    torch.manual_seed(1)
    record = ExportedModel(
        kind="segmenter",
        method="segmentation",
        model=ModelSpec(size="tiny", overrides=REF_TINY, head="dec"),
        class_names=["shower", "track", "michel", "delta", "led"],
        preprocess=PreprocessConfig(),
        licence="MIT",
    )
    state = record.build().state_dict()
    save_export(resolve(str(tmp_path / "seg")), state, record)
    code, _, err = run_cli(
        capsys, "weights", "export", str(tmp_path / "seg"), "--format", "pimm", "--out", str(tmp_path / "pimm")
    )
    assert code == 0, err
    config = json.loads((tmp_path / "pimm" / "model_config.json").read_text())
    assert config["type"] == "DefaultSegmentorV2" and config["num_classes"] == 5
    assert config["backbone"]["type"] == "PT-v3m2" and config["backbone"]["enc_mode"] is False
    assert config["backbone_out_channels"] == preset("tiny").dec_channels[0]
    from safetensors.torch import load_file

    keys = set(load_file(str(tmp_path / "pimm" / "model.safetensors")))
    assert {"seg_head.weight", "seg_head.bias", "backbone.dec.dec0.up.proj.0.weight"} <= keys
    code, _, err = run_cli(capsys, "weights", "import", str(tmp_path / "pimm"), "--out", str(tmp_path / "back"))
    assert code == 0, err
    back, again = load_export(resolve(str(tmp_path / "back")))
    assert_same(back, state)
    assert again.class_names == record.class_names and again.model.head == "dec"
    a, b = hub.load(str(tmp_path / "seg")), hub.load(str(tmp_path / "back"))
    x = stage_inputs()
    with torch.no_grad():
        assert torch.equal(a(*x), b(*x))

    # without raysvc's record beside it (as pimm itself writes one), the class names are asked for
    (tmp_path / "pimm" / "raysvc_record.json").unlink()
    code, _, err = run_cli(capsys, "weights", "import", str(tmp_path / "pimm"), "--out", str(tmp_path / "b2"), *ANSWERS)
    assert code == 2 and "does not state class_names: give --class-names A,B,..." in err
    code, _, err = run_cli(
        capsys,
        "weights",
        "import",
        str(tmp_path / "pimm"),
        "--out",
        str(tmp_path / "b2"),
        *ANSWERS,
        "--class-names",
        "a,b,c,d,e",
    )
    assert code == 0, err
    assert_same(load_export(resolve(str(tmp_path / "b2")))[0], state)

    lin = record.model_copy(update={"model": record.model.model_copy(update={"head": "lin"})})
    lin_state = lin.build().state_dict()
    save_export(resolve(str(tmp_path / "lin")), lin_state, lin)
    code, _, err = run_cli(
        capsys, "weights", "export", str(tmp_path / "lin"), "--format", "pimm", "--out", str(tmp_path / "p2")
    )
    assert code == 2 and "give --encoder-only" in err and not (tmp_path / "p2").exists()
    code, _, err = run_cli(
        capsys,
        "weights",
        "export",
        str(tmp_path / "lin"),
        "--format",
        "pimm",
        "--out",
        str(tmp_path / "p2"),
        "--encoder-only",
    )
    assert code == 0, err
    enc = hub.load(str(tmp_path / "p2"))
    assert isinstance(enc, PTv3) and enc.record.kind == "backbone"
    encoder = {k.removeprefix("backbone."): v for k, v in lin_state.items() if k.startswith("backbone.")}
    assert_same(enc.state_dict(), encoder)


FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "reference")


def test_a_sonata_checkpoint_three_ways_equals_the_reference(tmp_path, capsys):
    """The reference's tiny checkpoint read as the .pth itself, as its `weights import` directory and as the same
    weights in pimm's layout: every encoder stage equals the reference implementation's within 1e-4 (golden.npz,
    made once with Sonata's code)."""
    import numpy as np

    golden = dict(np.load(os.path.join(FIXTURES, "golden.npz")))
    pth = os.path.join(FIXTURES, "sonata_tiny.pth")
    code, _, err = run_cli(capsys, "weights", "import", pth, "--out", str(tmp_path / "ours"), *ANSWERS)
    assert code == 0, err
    code, _, err = run_cli(
        capsys, "weights", "export", str(tmp_path / "ours"), "--format", "pimm", "--out", str(tmp_path / "pimm")
    )
    assert code == 0, err
    for source in (pth, tmp_path / "ours", tmp_path / "pimm"):
        model = hub.load(str(source))
        for b in range(3):
            stages = hub.encode(model, {k: golden[f"b{b}_{k}"] for k in ("coord", "grid_coord", "feat", "offset")})
            assert len(stages) == 5
            for s, st in enumerate(stages):
                ref = golden[f"b{b}_s{s}_feat"]
                np.testing.assert_array_equal(st["grid_coord"], golden[f"b{b}_s{s}_grid_coord"])
                assert np.abs(st["feat"] - ref).max() / np.abs(ref).max() < 1e-4, (source, b, s)


def stage_inputs(seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    grid = torch.cat([torch.randint(0, 40, (300, 3), generator=g), torch.randint(0, 40, (200, 3), generator=g)])
    coord = grid.float() / 40
    feat = torch.cat([coord, torch.rand(len(grid), 1, generator=g)], 1)
    return feat, coord, grid, torch.tensor([300, 500])


IMPORT_IN_A_CHILD = """
import json, sys, time
from raysvc.hub import Answers
from raysvc.hub.convert import import_model
from raysvc.storage import resolve


def peak_kib():  # this process's peak resident set (getrusage's maxrss would carry the parent's over the fork)
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])


before = peak_kib()  # the interpreter, torch and raysvc loaded
t0 = time.perf_counter()
answers = Answers(detector="lartpc", grid_voxels=0.665, center_events=True, licence="MIT")
import_model(resolve(sys.argv[1]), resolve(sys.argv[2]), answers)
print(json.dumps({"seconds": time.perf_counter() - t0, "before_kib": before, "peak_kib": peak_kib()}))
"""


def test_a_base_size_checkpoint_imports_in_under_a_minute_and_three_times_its_size(tmp_path):
    """A Panda-Base-size checkpoint (the `base` preset, ~90.8 M parameters, random weights, in Sonata's file
    layout) imports in a fresh process in under 60 s, its peak resident memory growing by less than 3x the file's
    size over the process's footprint before the import; the weights arrive unchanged."""
    import subprocess
    import sys

    from safetensors import safe_open

    cfg = preset("base")
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in PTv3(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    assert sum(v.numel() for v in state.values()) > 90_000_000
    pth = tmp_path / "base.pth"
    torch.save({"config": config_to_reference(cfg), "state_dict": state_to_reference(state, cfg)}, pth)
    size_kib = pth.stat().st_size / 1024
    out = subprocess.run(
        [sys.executable, "-c", IMPORT_IN_A_CHILD, str(pth), str(tmp_path / "imported")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"base import: {got['seconds']:.1f} s, +{(got['peak_kib'] - got['before_kib']) / size_kib:.2f}x the file")
    assert got["seconds"] < 60
    assert got["peak_kib"] - got["before_kib"] < 3 * size_kib
    with safe_open(str(tmp_path / "imported" / "backbone.safetensors"), "pt") as f:
        for key in ("embedding.stem.linear.weight", "enc.3.blocks.8.attn.qkv.weight", "enc.4.blocks.2.ls2.gamma"):
            assert torch.equal(f.get_tensor(key), state[key]), key


def test_object_storage_in_and_out(s3_env, tmp_path):
    """A checkpoint imported to s3://, exported from there to pimm's layout on s3://, and loaded back from it: the
    same weights; an existing output is refused and a failed import leaves no object behind. (In process: the
    command line's exit finalises the process's S3 client.)"""
    from raysvc.hub.convert import export_pimm, import_model
    from raysvc.storage import list_files

    answers = hub.Answers(detector="lartpc", grid_voxels=0.665, center_events=True, licence="MIT")
    state = sonata_checkpoint(tmp_path / "sonata.pth")
    src, ours, pimm = (
        resolve(str(tmp_path / "sonata.pth")),
        resolve("s3://weights-test/ours"),
        resolve("s3://weights-test/pimm"),
    )
    import_model(src, ours, answers)
    assert list_files(ours) == ["backbone.safetensors", "config.json"]
    export_pimm(ours, pimm)
    assert "raysvc_record.json" in list_files(pimm)
    assert_same(hub.load("s3://weights-test/pimm").state_dict(), state)
    with pytest.raises(ValueError, match="s3://weights-test/ours: already exists"):
        import_model(src, ours, answers)
    (tmp_path / "bad.pth").write_bytes((tmp_path / "sonata.pth").read_bytes()[:3000])
    with pytest.raises(ValueError, match="bad.pth: not a readable torch checkpoint"):
        import_model(resolve(str(tmp_path / "bad.pth")), resolve("s3://weights-test/bad"), answers)
    assert list_files(resolve("s3://weights-test/bad")) == []


def test_a_version_1_base_record_keeps_its_conv_stem(tmp_path):
    """Exports written before `base` took the reference's linear stem (format_version 1) still load: their record
    reads as the conv-stem network they hold; a version-2 record of `base` is the linear-stem one."""
    from raysvc.inference.record import load_record_json

    old = {"format_version": 1, "kind": "backbone", "method": "panda", "model": {"size": "base"}, "preprocess": {}}
    record = load_record_json(json.dumps(old).encode(), "old/config.json")
    assert record.model.backbone_config().stem == "conv" and record.model.overrides == {"stem": "conv"}
    new = load_record_json(json.dumps({**old, "format_version": 2}).encode(), "new/config.json")
    assert new.model.backbone_config().stem == "linear"
    tiny = load_record_json(json.dumps({**old, "model": {"size": "tiny"}}).encode(), "tiny/config.json")
    assert tiny.model.overrides == {}
    with torch.device("meta"):
        assert "embedding.stem.weight" in record.model.build_backbone().state_dict()
