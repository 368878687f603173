"""`raysvc bench gpu`: the CUDA path checked against independent references and timed against the same machine's
CPU, in one run short enough for a 15-minute GPU lease. Needs torch, pydantic, pyarrow, numba and scipy; not Ray.

Checks (device against a reference computed another way):
- sparse conv: our submanifold conv (kernel map by sort + searchsorted on the device) against dense `F.conv3d` on
  the same device, forward and both gradients; spconv-cu120 against ours when it is installed.
- neighbours and serialization: kNN indices and z / hilbert codes on the device against the CPU (numba) kernels.
- patch attention: the device (SDPA; flash-attn when installed) against the CPU path in float64.
- the tiny segmentation model: device fp32 logits against CPU fp32 (same weights, same batch), and bf16 autocast
  against device fp32 (argmax agreement).
- PoLAr-MAE (tiny): the masked-modelling loss of one batch and one mask on the device in fp32 against the CPU (same
  weights), and in bf16 autocast against device fp32 (its attention is torch SDPA, which picks a flash or
  memory-efficient kernel on CUDA).
Timings (same batches, medians after a warm-up): a segmentation training step (tiny, small) on the CPU, on the device
in fp32 and in bf16; a Panda pretraining step (tiny) on the CPU and on the device; a PoLAr-MAE pretraining step
(tiny, tokenization included) on the CPU and on the device in fp32 and bf16. TF32 stays off during the checks and
follows torch's defaults during the timings.
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from raysvc.bench.launches import LaunchCounter
from raysvc.bench.train import _job, first_batches, generate_bench_data, plain_training
from raysvc.config import load_config
from raysvc.inference.featurize import model_inputs, usable_device
from raysvc.ops import spconv_backend
from raysvc.ops.attention import make_patches, patch_attention
from raysvc.ops.neighbors import knn
from raysvc.ops.serialization import encode
from raysvc.ops.sparse_conv import SubMConv3d, kernel_map
from raysvc.train.tasks.segmentation import train_step

PRETRAIN_JOB = Path(__file__).parents[2] / "jobs" / "pretrain-panda-tiny.yaml"
BASE_JOB = Path(__file__).parents[2] / "jobs" / "pretrain-panda-base.yaml"
# Panda-Base's pretraining step on one A100 at 12 events, bf16, as the method's authors report it (docs/methods.md).
A100_PANDA_BASE_S_PER_ITER = 0.895
# CUDA runtime / driver calls that launch one kernel each (what `ops_launched` counts)
_LAUNCH_CALLS = {"cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx"}
POLARMAE_JOB = Path(__file__).parents[2] / "jobs" / "pretrain-polarmae-tiny.yaml"
CROSS_JOB = Path(__file__).parents[2] / "jobs" / "pretrain-panda-cross-tiny.yaml"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _exact_fp32():
    """No TF32 in matmuls / convolutions while checking against fp32 references."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: relative to the reference's scale."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def check_sparse_conv(device: torch.device, seed: int = 0, side: int = 20, cin: int = 16, cout: int = 24) -> dict:
    g = torch.Generator().manual_seed(seed)
    active = torch.rand(2, side, side, side, generator=g) < 0.1
    b, x, y, z = active.nonzero(as_tuple=True)
    grid = torch.stack([x, y, z], 1)
    feat = torch.randn(len(b), cin, generator=g)
    conv = SubMConv3d(cin, cout).to(device)
    b_d, grid_d = b.to(device), grid.to(device)
    kmap = kernel_map(grid_d, b_d)
    out: dict = {"sites": len(b), "kernel_map_equals_cpu": bool(torch.equal(kmap.cpu(), kernel_map(grid, b)))}
    with _exact_fp32():
        f = feat.to(device).requires_grad_(True)
        y_ours = conv(f, kmap)
        up = torch.randn_like(y_ours)
        (y_ours * up).sum().backward()
        dense = torch.zeros(2, cin, side, side, side, device=device)
        dense[b_d, :, grid_d[:, 0], grid_d[:, 1], grid_d[:, 2]] = f.detach()
        dense.requires_grad_(True)
        w = conv.weight.detach().clone().requires_grad_(True)
        y_dense = F.conv3d(dense, w.permute(0, 4, 1, 2, 3), conv.bias.detach(), padding=1)
        at = y_dense[b_d, :, grid_d[:, 0], grid_d[:, 1], grid_d[:, 2]]
        (at * up).sum().backward()
        out.update(
            out_err=_err(y_ours, at),
            grad_feat_err=_err(f.grad, dense.grad[b_d, :, grid_d[:, 0], grid_d[:, 1], grid_d[:, 2]]),
            grad_weight_err=_err(conv.weight.grad, w.grad),
        )
        if device.type == "cuda" and spconv_backend.cuda_available():
            y_sp = spconv_backend.subm_conv3d(f.detach(), grid_d, b_d, conv.weight.detach(), conv.bias.detach())
            out["spconv_out_err"] = _err(y_sp, y_ours)
    return out


def check_neighbours_and_codes(device: torch.device, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    counts = torch.tensor([700, 1300])
    pts = torch.rand(int(counts.sum()), 3, generator=g) * 100
    offset = torch.cumsum(counts, 0)
    idx_cpu, _ = knn(pts, offset, pts, offset, 16)
    idx_dev, _ = knn(pts.to(device), offset.to(device), pts.to(device), offset.to(device), 16)
    grid = pts.long()
    batch = torch.repeat_interleave(torch.arange(2), counts)
    codes = {
        order: bool(
            torch.equal(encode(grid.to(device), batch.to(device), 8, order).cpu(), encode(grid, batch, 8, order))
        )
        for order in ("z", "hilbert")
    }
    return {"knn_equals_cpu": bool(torch.equal(idx_dev.cpu(), idx_cpu)), "codes_equal_cpu": codes}


def check_attention(device: torch.device, seed: int = 0, heads: int = 4, dim: int = 16, size: int = 64) -> dict:
    g = torch.Generator().manual_seed(seed)
    offset = torch.tensor([50, 300, 333])  # a short event, a long one, a tail shorter than a patch
    qkv = torch.randn(int(offset[-1]), 3, heads, dim, generator=g, dtype=torch.float64)
    ref = patch_attention(qkv, make_patches(offset, size), use_flash=False)
    patches = make_patches(offset.to(device), size)
    with _exact_fp32():
        out = {"sdpa_fp32_err": _err(patch_attention(qkv.float().to(device), patches, use_flash=False), ref)}
    if device.type == "cuda":
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out["sdpa_bf16_err"] = _err(patch_attention(qkv.bfloat16().to(device), patches, use_flash=False), ref)
        with contextlib.suppress(RuntimeError):  # flash-attn not installed
            out["flash_bf16_err"] = _err(patch_attention(qkv.bfloat16().to(device), patches, use_flash=True), ref)
        out.update(check_sdpa_flash_kernel(device, g, heads, dim, size))
    return out


def check_sdpa_flash_kernel(device: torch.device, g: torch.Generator, heads: int, dim: int, size: int) -> dict:
    """Events longer than a patch give only full patches, which SDPA takes without a mask: with SDPA held to its
    flash kernel they must still run (the kernel refuses any attn_mask) and match the float64 reference."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    offset = torch.tensor([2 * size, 5 * size + size // 3])
    qkv = torch.randn(int(offset[-1]), 3, heads, dim, generator=g, dtype=torch.float64)
    ref = patch_attention(qkv, make_patches(offset, size), use_flash=False)
    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            got = patch_attention(qkv.bfloat16().to(device), make_patches(offset.to(device), size), use_flash=False)
    except RuntimeError as e:
        return {"sdpa_flash_kernel_runs": False, "sdpa_flash_kernel_error": str(e).splitlines()[0][:200]}
    return {"sdpa_flash_kernel_runs": True, "sdpa_flash_kernel_bf16_err": _err(got, ref)}


def time_attention(
    device: torch.device, steps: int, warmup: int, events: int = 16, points: int = 3000, heads: int = 8, dim: int = 32
) -> dict:
    """Patch attention forward + backward in bf16 on `device`, per patch size: today's path (full patches unmasked,
    short ones masked) against the baseline that puts every patch through the length mask, as before."""
    from raysvc.ops.attention import _masked_attention

    if device.type != "cuda":
        return {}
    g = torch.Generator().manual_seed(0)
    sizes = torch.randint(points // 2, 2 * points, (events,), generator=g)
    offset = torch.cumsum(sizes, 0).to(device)
    qkv = torch.randn(int(offset[-1]), 3, heads, dim, generator=g).to(device, torch.bfloat16).requires_grad_()
    out: dict = {"points": int(offset[-1]), "heads": heads, "head_dim": dim}
    for k in (128, 1024):
        patches = make_patches(offset, k)

        def split(i, patches=patches):
            patch_attention(qkv, patches, use_flash=False).float().square().mean().backward()

        def masked(i, patches=patches, k=k):
            rows = qkv[patches.index]
            y = _masked_attention(rows, patches.lengths, k, None)[patches.first]
            y.float().square().mean().backward()

        out[f"k{k}_masked_ms"] = _median_step(masked, steps, warmup, device) * 1e3
        out[f"k{k}_split_ms"] = _median_step(split, steps, warmup, device) * 1e3
        out[f"k{k}_speedup"] = out[f"k{k}_masked_ms"] / out[f"k{k}_split_ms"]
    return out


def profile_segmentation(cfg, batches: list[dict], device: torch.device, top: int = 15) -> dict:
    """The ops that take one bf16 segmentation training step's time on `device` (torch.profiler; after 3 warm-up
    steps): where a step that should be GPU-bound waits; then the device ops and syncs of one more step, counted as
    `raysvc bench launches` counts them."""
    from torch.profiler import ProfilerActivity, profile

    c, (model, params, opt, loss_fn) = _seg_training(cfg, True, device)
    for i in range(3):
        train_step(model, params, opt, loss_fn, batches[i % len(batches)], c, device)
    _sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        train_step(model, params, opt, loss_fn, batches[0], c, device)
        _sync(device)
    rows = []
    for e in prof.key_averages():
        rows.append(
            {
                "op": e.key[:80],
                "calls": e.count,
                "cpu_self_ms": e.self_cpu_time_total / 1e3,
                "device_self_ms": getattr(e, "self_device_time_total", 0.0) / 1e3,
            }
        )
    by_cpu = sorted(rows, key=lambda r: -r["cpu_self_ms"])[:top]
    by_dev = sorted(rows, key=lambda r: -r["device_self_ms"])[:top]
    total = {
        "cpu_self_ms": sum(r["cpu_self_ms"] for r in rows),
        "device_self_ms": sum(r["device_self_ms"] for r in rows),
    }
    counter = LaunchCounter()  # the same counting as `raysvc bench launches`, here on real device tensors
    with counter:
        train_step(model, params, opt, loss_fn, batches[0], c, device)
        _sync(device)
    return {"total": total, "launches": counter.summary(), "top_cpu": by_cpu, "top_device": by_dev}


def check_model(cfg, batch: dict, device: torch.device) -> dict:
    """Tiny segmentation model in eval mode: device against CPU (fp32), bf16 autocast against fp32 on the device."""
    torch.manual_seed(0)
    model, *_ = plain_training(cfg)
    model.eval()
    pre = cfg.data.preprocess

    def logits(m, dev, bf16=False):
        x = model_inputs(batch, pre.center, pre.scale, cfg.model.grid_voxels, dev, cfg.model.center_events)
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with torch.no_grad(), ctx:
            return m(x["feat"], x["coord"], x["grid_coord"], x["offset"]).float()

    ref = logits(model, torch.device("cpu"))
    dev_model = copy.deepcopy(model).to(device)
    with _exact_fp32():
        fp32 = logits(dev_model, device)
    out = {
        "points": len(ref),
        "fp32_logits_err": _err(fp32, ref),
        "fp32_argmax_agree": float((fp32.argmax(1).cpu() == ref.argmax(1)).float().mean()),
    }
    if device.type == "cuda":
        bf16 = logits(dev_model, device, bf16=True)
        out["bf16_argmax_agree_fp32"] = float((bf16.argmax(1) == fp32.argmax(1)).float().mean())
    return out


def _median_step(step, steps: int, warmup: int, device: torch.device) -> float:
    """Median seconds of step(i) after `warmup` calls; the CPU, far slower, times a quarter of `steps` (at least 2)."""
    n = steps if device.type != "cpu" else max(2, steps // 4)
    times = []
    for i in range(n + warmup):
        _sync(device)
        t0 = time.perf_counter()
        step(i)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _precision_runs(device: torch.device) -> list[tuple[str, torch.device, bool]]:
    """(name, device, bf16) of each timed setting: the CPU, then the device in fp32 and in bf16."""
    runs = [("cpu", torch.device("cpu"), False)]
    if device.type != "cpu":
        runs += [("device_fp32", device, False), ("device_bf16", device, True)]
    return runs


def _add_speedups(out: dict) -> None:
    """`<name>_speedup_vs_cpu` for each device setting that was timed."""
    for name in ("device_fp32", "device_bf16"):
        if f"{name}_step_s" in out:
            out[f"{name}_speedup_vs_cpu"] = out["cpu_step_s"] / out[f"{name}_step_s"]


def _seg_training(cfg, amp: bool, device: torch.device) -> tuple:
    """(the job with `train.amp` set, (model on `device`, params, optimizer, loss)), seeded as every timing is."""
    c = cfg.model_copy(update={"train": cfg.train.model_copy(update={"amp": amp})})
    torch.manual_seed(0)
    model, params, opt, loss_fn = plain_training(c)
    return c, (model.to(device), params, opt, loss_fn)


def time_segmentation(cfg, batches: list[dict], device: torch.device, steps: int, warmup: int) -> dict:
    """Seconds per training step (the fine-tuning job's `train_step`) on the CPU, and on `device` in fp32 and bf16."""
    out: dict = {}
    for name, dev, amp in _precision_runs(device):
        c, (model, params, opt, loss_fn) = _seg_training(cfg, amp, dev)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)

        def step(i: int) -> None:
            train_step(model, params, opt, loss_fn, batches[i % len(batches)], c, dev)  # noqa: B023

        out[f"{name}_step_s"] = _median_step(step, steps, warmup, dev)
        if dev.type == "cuda":
            out[f"{name}_peak_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
            out[f"{name}_ops_launched"] = ops_launched(step, steps + warmup, dev)
    _add_speedups(out)
    out["events_per_step"] = cfg.train.batch_events
    return out


def time_panda(data: Path, device: torch.device, steps: int, warmup: int, batch_events: int) -> dict:
    """Seconds per Panda pretraining step (`pretrain_step`, tiny, the tiny job's views) on the CPU and on `device`;
    the losses must stay finite."""
    from raysvc.train.tasks.panda import PretrainConfig

    cfg = load_config(
        PretrainConfig,
        str(PRETRAIN_JOB),
        [f"data.uri={data / 'train'}", "probe_data=null", f"train.steps={steps + warmup}"],
    )
    batches = _view_batches(data / "train", cfg.views, cfg.data.preprocess, batch_events, 4)
    out: dict = {"events_per_step": batch_events}
    for name, dev in [("cpu", torch.device("cpu"))] + ([("device", device)] if device.type != "cpu" else []):
        step, losses, _ = _panda_stepper(cfg, batches, dev)
        out[f"{name}_step_s"] = _median_step(step, steps, warmup, dev)
        if dev.type == "cuda":
            out[f"{name}_ops_launched"] = ops_launched(step, steps + warmup, dev)
        out[f"{name}_losses_finite"] = bool(torch.isfinite(torch.tensor(losses)).all())
    if "device_step_s" in out:
        out["device_speedup_vs_cpu"] = out["cpu_step_s"] / out["device_step_s"]
    return out


def ops_launched(step, i: int, device: torch.device) -> int | None:
    """Kernels `step(i)` really launches on a CUDA `device`: the CUDA launch calls torch.profiler records (the
    launch-bound cost that `bench launches` counts on the CPU); None elsewhere."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    _sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step(i)
        _sync(device)
    return sum(1 for e in prof.events() if e.name in _LAUNCH_CALLS)


def time_panda_base(
    data: Path, device: torch.device, steps: int, warmup: int, batch_events: int = 12, overrides: tuple = ()
) -> dict:
    """Panda-Base's pretraining step (its job's model, views and heads; bf16 where the device runs it) at
    `batch_events` events on `device`: median seconds per step beside the A100 figure, peak memory, the kernels it
    launches. `overrides` (job `--set`s) are for tests on a CPU, which cannot run the base recipe at speed."""
    from raysvc.train.tasks.panda import PretrainConfig

    amp = device.type == "cuda"
    sets = [f"data.uri={data / 'train'}", "probe_data=null", f"train.steps={steps + warmup + 1}", *overrides]
    cfg = load_config(PretrainConfig, str(BASE_JOB), [*sets, f"train.amp={str(amp).lower()}"])
    size = cfg.model.size
    batches = _view_batches(data / "train", cfg.views, cfg.data.preprocess, batch_events, 2)
    step, losses, _ = _panda_stepper(cfg, batches, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    out: dict = {"events_per_step": batch_events, "size": size, "bf16": amp}
    out["step_s"] = _median_step(step, steps, warmup, device)
    out["a100_reference_s"] = A100_PANDA_BASE_S_PER_ITER
    out["step_vs_a100_reference"] = out["step_s"] / A100_PANDA_BASE_S_PER_ITER
    if device.type == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    out["ops_launched"] = ops_launched(step, steps + warmup, device)
    out["losses_finite"] = bool(torch.isfinite(torch.tensor(losses)).all())
    return out


def _panda_stepper(cfg, batches: list[dict], dev: torch.device):
    """(step(i) running `pretrain_step` on batch i mod len, the list its losses land in, (student, teacher,
    optimizer)) for a fresh Panda of the job's size."""
    from raysvc.models.panda import PandaStudent, make_teacher
    from raysvc.models.ptv3 import preset
    from raysvc.train.optim import adamw, param_groups
    from raysvc.train.schedule import one_cycle_scheduler
    from raysvc.train.tasks.panda import pretrain_step

    torch.manual_seed(0)
    bcfg = preset(cfg.model.size, **cfg.model.overrides)
    student = PandaStudent(bcfg, cfg.panda).to(dev)
    teacher = make_teacher(student, bcfg).to(dev)
    groups = param_groups(student, bcfg.depths, cfg.train.lr, cfg.train.layer_decay, cfg.train.weight_decay[0])
    params = [p for g in groups for p in g["params"]]
    opt = adamw(groups, cfg.train.lr)
    sched = one_cycle_scheduler(opt, cfg.train.steps, cfg.train.warmup_frac, cfg.train.final_lr_frac)
    losses: list[float] = []

    def step(i: int) -> None:
        r = pretrain_step(student, student, teacher, opt, sched, params, batches[i % len(batches)], cfg, i, dev)
        losses.append(float(r.losses["loss"].detach()))

    return step, losses, (student, teacher, opt)


def _view_batches(data: Path, view_cfg, preprocess, batch_events: int, count: int) -> list[dict]:
    """`count` packed batches of views of `batch_events` events each from the first shard of `data`."""
    from raysvc.data.streaming.reader import read_preprocessed
    from raysvc.data.streaming.shards import load_manifest
    from raysvc.data.streaming.views import collate_views, table_views
    from raysvc.storage import resolve

    loc = resolve(str(data))
    manifest = load_manifest(loc)
    table, _, _ = read_preprocessed(loc, manifest.shards[0], preprocess, None, True, manifest.detector_spec)
    n = max(1, min(count, table.num_rows // batch_events))
    return [collate_views(table_views(table.slice(i * batch_events, batch_events), view_cfg, 0, 0)) for i in range(n)]


def time_panda_cross(data: Path, device: torch.device, steps: int, warmup: int, batch_events: int, log=print) -> dict:
    """Seconds per cross-experiment Panda step (the cross job's own `step`: LArTPC + water Cherenkov views through
    per-detector stems into one trunk) with `batch_events` events per step, both ways of batching: by detector (steps
    alternate between the detectors) and mixed (each step half of each). On the CPU and on `device`; the losses must
    stay finite."""
    from raysvc.data.sources.synthetic import generate_dataset
    from raysvc.data.sources.wch_generator import WChGeneratorConfig
    from raysvc.storage import resolve
    from raysvc.train.tasks.base import WorkerContext
    from raysvc.train.tasks.panda_cross import CrossPandaTask, CrossPretrainConfig

    wch = data / "wch"
    if not wch.exists():
        log(f"generating {2 * batch_events} water Cherenkov events")
        cfg_gen = WChGeneratorConfig(particles={1: 1.0, 2: 1.0})
        generate_dataset(
            resolve(str(wch)), 2 * batch_events, 3, 2 * batch_events, cfg_gen, show_progress=False, detector="wch"
        )
    sets = [f"sources.lartpc.data.uri={data / 'train'}", f"sources.wch.data.uri={wch}", f"train.steps={steps + warmup}"]
    sets += ["sources.lartpc.probe_data=null", "sources.wch.probe_data=null", f"train.batch_events={batch_events}"]
    cfg = load_config(CrossPretrainConfig, str(CROSS_JOB), [*sets, "scaling.workers=1"])
    half = max(1, batch_events // 2)
    views = {
        (name, n): _view_batches(Path(src.data.uri), src.views, src.data.preprocess, n, 2)
        for name, src in cfg.sources.items()
        for n in (batch_events, half)
    }
    names = list(cfg.sources)

    def by_detector(i: int) -> list:
        name = names[i % len(names)]
        got = views[(name, batch_events)]
        return [(name, got[(i // len(names)) % len(got)])]

    def mixed(i: int) -> list:
        return [(name, views[(name, half)][i % len(views[(name, half)])]) for name in names]

    plans = {"by_detector": by_detector, "mixed": mixed}
    out: dict = {"events_per_step": batch_events}
    for name, dev in [("cpu", torch.device("cpu"))] + ([("device", device)] if device.type != "cpu" else []):
        for batching, plan in plans.items():
            c = cfg.model_copy(update={"batching": batching})
            torch.manual_seed(0)
            task = CrossPandaTask(c, WorkerContext(0, 1, dev, {}, per_rank=batch_events))
            losses: list[float] = []
            step = lambda i, task=task, plan=plan, losses=losses: losses.append(task.step(plan(i), i)["loss"])  # noqa: E731
            out[f"{name}_{batching}_step_s"] = _median_step(step, steps, warmup, dev)
            out[f"{name}_{batching}_losses_finite"] = bool(torch.isfinite(torch.tensor(losses)).all())
        out[f"{name}_mixed_vs_by_detector"] = out[f"{name}_mixed_step_s"] / out[f"{name}_by_detector_step_s"]
    return out


def time_polarmae(data: Path, batches: list[dict], device: torch.device, steps: int, warmup: int) -> dict:
    """The tiny PoLAr-MAE job's network on packed `batches`: its loss (one batch, one seeded mask, eval mode) on
    `device` in fp32 against the CPU and in bf16 against device fp32; then seconds per pretraining step
    (`mae_step`: tokens, forward, backward, AdamW) on the CPU and on the device in fp32 and bf16. The losses must
    stay finite."""
    from raysvc.models.polarmae import PolarMAE
    from raysvc.train.tasks.polarmae import batch_tokens

    cfg = polarmae_job(data, steps + warmup)
    net, cpu = cfg.network, torch.device("cpu")
    torch.manual_seed(0)
    model = PolarMAE(net).eval()

    def loss(m, dev: torch.device, bf16: bool = False) -> torch.Tensor:
        tokens = batch_tokens(batches[0], net, dev)
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with torch.no_grad(), ctx:
            return m(tokens, torch.Generator().manual_seed(0))["loss"].float()

    ref = loss(model, cpu)
    dev_model = copy.deepcopy(model).to(device)
    with _exact_fp32():
        fp32 = loss(dev_model, device)
    out: dict = {"events_per_step": len(batches[0]["offset"]), "cpu_loss": float(ref), "fp32_loss_err": _err(fp32, ref)}
    if device.type == "cuda":
        out["bf16_loss_err_fp32"] = _err(loss(dev_model, device, bf16=True), fp32)
    for name, dev, amp in _precision_runs(device):
        step, losses, _ = _polarmae_stepper(cfg, batches, dev, amp)
        out[f"{name}_step_s"] = _median_step(step, steps, warmup, dev)
        out[f"{name}_losses_finite"] = bool(torch.isfinite(torch.tensor(losses)).all())
    _add_speedups(out)
    return out


def polarmae_job(data: Path, steps: int, size: str = "tiny"):
    """The tiny PoLAr-MAE job (another model size on request) on the bench data, without probes."""
    from raysvc.train.tasks.polarmae import PolarMAEJob

    sets = [f"data.uri={data / 'train'}", "probe_data=null", f"train.steps={steps}", f"model.size={size}"]
    cfg = load_config(PolarMAEJob, str(POLARMAE_JOB), sets)
    cfg.data.resolve_preprocess()  # the network's radius is in the data's normalised units
    return cfg


def _polarmae_stepper(cfg, batches: list[dict], dev: torch.device, amp: bool = False):
    """(step(i) running `mae_step` on batch i mod len, the list its losses land in, (model, optimizer)) for a fresh
    PoLAr-MAE of the job, seeded."""
    from raysvc.models.polarmae import PolarMAE
    from raysvc.train.optim import adamw
    from raysvc.train.schedule import one_cycle_scheduler
    from raysvc.train.tasks.polarmae import mae_step

    c = cfg.model_copy(update={"train": cfg.train.model_copy(update={"amp": amp})})
    torch.manual_seed(0)
    m = PolarMAE(c.network).to(dev)
    params = list(m.parameters())
    opt = adamw(params, c.train.lr, weight_decay=c.train.weight_decay)
    sched = one_cycle_scheduler(opt, c.train.steps, c.train.warmup_frac, c.train.final_lr_frac)
    losses: list[float] = []

    def step(i: int) -> None:
        o, _ = mae_step(m, params, opt, sched, batches[i % len(batches)], c, i, 0, dev)
        losses.append(float(o["loss"].detach()))

    return step, losses, (m, opt)


def run_gpu_bench(
    device: str,
    events: int,
    steps: int,
    batch: int,
    profile: bool,
    warmup: int = 2,
    sizes: tuple[str, ...] = ("tiny", "small"),
    panda_base_events: int | None = None,
    log=print,
) -> dict:
    """Every check and timing of `bench gpu` on `device`. `panda_base_events`: events per Panda-Base step (default
    12 on a GPU; 0 skips it, as it does on the CPU unless asked)."""
    dev = usable_device(device)
    env = {
        "torch": torch.__version__,
        "device": device,
        "cpu_threads": torch.get_num_threads(),
        "spconv_cuda": spconv_backend.cuda_available(),
        "flash_attn": _flash_available(),
    }
    if dev.type == "cuda":
        env.update(name=torch.cuda.get_device_name(dev), cuda=torch.version.cuda)
    if panda_base_events is None:
        panda_base_events = 12 if dev.type == "cuda" else 0
    settings = {"events": events, "steps": steps, "warmup": warmup, "batch_events": batch}
    out: dict = {"env": env, "settings": settings | {"panda_base_events": panda_base_events}}
    log(f"checks on {device}: sparse conv, neighbours and codes, attention")
    out["sparse_conv"] = check_sparse_conv(dev)
    out["neighbours"] = check_neighbours_and_codes(dev)
    out["attention"] = check_attention(dev)
    if dev.type == "cuda":
        log("attention: unmasked full patches against all-masked, bf16 forward + backward")
        out["attention_timing"] = time_attention(dev, steps, warmup)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        generate_bench_data(data, events, log)
        for size in sizes:
            cfg = _job(data, data / "runs", size, steps + warmup, batch, torch.get_num_threads())
            batches = first_batches(cfg, max(1, events // batch))
            if size == sizes[0]:
                log(f"{size} model: {device} against cpu")
                out["model"] = check_model(cfg, batches[0], dev)
                log("tiny: PoLAr-MAE loss against cpu, pretraining step")
                out["polarmae_tiny"] = time_polarmae(data, batches, dev, steps, warmup)
            log(f"{size}: segmentation training step")
            out[f"seg_{size}"] = time_segmentation(cfg, batches, dev, steps, warmup)
            if profile and dev.type == "cuda":
                log(f"{size}: profiling one bf16 segmentation step")
                out[f"profile_seg_{size}"] = profile_segmentation(cfg, batches, dev)
        log("tiny: Panda pretraining step")
        out["panda_tiny"] = time_panda(data, dev, steps, warmup, batch)
        log("tiny: cross-experiment Panda step, by detector and mixed")
        out["panda_cross_tiny"] = time_panda_cross(data, dev, steps, warmup, batch, log)
        if panda_base_events:
            log(f"base: Panda pretraining step at {panda_base_events} events (bf16 on a GPU)")
            out["panda_base"] = time_panda_base(data, dev, steps, warmup, panda_base_events)
    out["checks"] = verdicts(out)
    out["all_passed"] = all(out["checks"].values())
    return out


# What each check must reach. fp32 runs without TF32, so it should agree with its reference to float rounding; bf16
# keeps 8 mantissa bits, so ~1 % error and a few flipped argmaxes at class boundaries are expected.
LIMITS = {
    ("sparse_conv", "out_err"): 1e-4,
    ("sparse_conv", "grad_feat_err"): 1e-4,
    ("sparse_conv", "grad_weight_err"): 1e-4,
    ("sparse_conv", "spconv_out_err"): 1e-4,
    ("attention", "sdpa_fp32_err"): 1e-4,
    ("attention", "sdpa_bf16_err"): 3e-2,
    ("attention", "flash_bf16_err"): 3e-2,
    ("attention", "sdpa_flash_kernel_bf16_err"): 3e-2,
    ("model", "fp32_logits_err"): 1e-3,
    ("polarmae_tiny", "fp32_loss_err"): 1e-3,
    ("polarmae_tiny", "bf16_loss_err_fp32"): 5e-2,
}
AT_LEAST = {("model", "fp32_argmax_agree"): 0.999, ("model", "bf16_argmax_agree_fp32"): 0.95}
MUST_BE_TRUE = [
    ("attention", "sdpa_flash_kernel_runs"),
    ("sparse_conv", "kernel_map_equals_cpu"),
    ("neighbours", "knn_equals_cpu"),
    ("panda_base", "losses_finite"),
    ("panda_tiny", "cpu_losses_finite"),
    ("panda_tiny", "device_losses_finite"),
    ("panda_cross_tiny", "cpu_by_detector_losses_finite"),
    ("panda_cross_tiny", "cpu_mixed_losses_finite"),
    ("panda_cross_tiny", "device_by_detector_losses_finite"),
    ("panda_cross_tiny", "device_mixed_losses_finite"),
    ("polarmae_tiny", "cpu_losses_finite"),
    ("polarmae_tiny", "device_fp32_losses_finite"),
    ("polarmae_tiny", "device_bf16_losses_finite"),
]


def verdicts(result: dict) -> dict[str, bool]:
    """{section.key: passed} for every check present in `result` (a check that did not run is absent)."""
    out = {}
    for (sec, key), limit in LIMITS.items():
        if key in result.get(sec, {}):
            out[f"{sec}.{key}"] = result[sec][key] <= limit
    for (sec, key), least in AT_LEAST.items():
        if key in result.get(sec, {}):
            out[f"{sec}.{key}"] = result[sec][key] >= least
    for sec, key in MUST_BE_TRUE:
        if key in result.get(sec, {}):
            out[f"{sec}.{key}"] = result[sec][key] is True
    for order, same in result.get("neighbours", {}).get("codes_equal_cpu", {}).items():
        out[f"neighbours.codes_equal_cpu.{order}"] = same is True
    return out


def _flash_available() -> bool:
    from raysvc.ops import attention

    return attention.flash_attn_varlen_qkvpacked_func is not None
