"""`raysvc bench launches`: device ops and host syncs per training step, counted op by op on the CPU.

A GPU step of the tiny models is launch-bound: its time is the number of kernels it launches and the number of
times the host waits for the device, not the arithmetic. Both are counted here without a GPU, by replaying the
device code path (`ops.paths.device_path`: no numba kernels, the gather-GEMM convolution) on CPU tensors under a
TorchDispatchMode, which sees every aten op after autograd, backward included, once per backend call (composite ops
arrive decomposed).

- A tensor is a *device tensor* if it is on a non-CPU device, or (in the CPU replay) if it is a parameter, buffer or
  optimizer state of the step's models, was moved with `.to(device)` in the step, or is the output of a device op.
- A *device op* is an aten op with a device tensor among its inputs (or, with no tensor inputs, a factory op after
  the step's first module forward) that computes something: views and metadata-only ops (outputs that alias an
  input, empty, resize) launch nothing and are left out. A host-to-device copy (`.to(device)`) counts as one.
- A *sync* is a device op or host read that makes the host wait for the device: ops whose output size or value
  depends on the data (torch tags them `dynamic_output_shape` / `data_dependent_output`: nonzero, masked_select,
  unique, repeat_interleave without output_size, item / int() / float() / bool(), indexing or index_put_ with a
  boolean mask) and reading a device tensor on the host (`.tolist()`, `.numpy()`, `.cpu()`).
- Phases: *inputs* (device ops before the first module forward: moving and preparing the batch), *forward*,
  *backward* (ops run by the autograd engine), *optimizer* (after the backward pass: clipping, the optimizer step,
  LR schedule, EMA, reading the loss). Ops on host tensors (the data pipeline's numba tokenizer, grid sampling) are
  counted apart as *host* ops and are not device ops.

The replay is an upper bound on a few counts: host-side scalars that a CUDA step keeps on the CPU (the optimizer's
step counters, unless fused) look like device tensors here.
"""

from __future__ import annotations

import contextlib
import random
import tempfile
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakTensorKeyDictionary

from raysvc.ops.paths import device_path

PHASES = ("inputs", "forward", "backward", "optimizer")
_FREE = {"empty", "empty_like", "empty_strided", "resize_", "lift_fresh", "set_", "_unsafe_view"}  # no kernel
_SYNC_TAGS = (torch.Tag.dynamic_output_shape, torch.Tag.data_dependent_output)
_MASK_INDEXED = {"index", "index_put_", "index_put", "_index_put_impl_"}  # sync only with a boolean mask


def _launches_nothing(func) -> bool:
    if func._schema.name.split("::")[-1] in _FREE:
        return True
    returns = func._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


def _is_sync(func, args, kwargs) -> bool:
    name = func._schema.name.split("::")[-1]
    if name in _MASK_INDEXED:
        return any(isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8) for t in tree_leaves(args[1]))
    if name == "repeat_interleave" and kwargs.get("output_size") is not None:
        return False
    if name == "nonzero_static":
        return False
    return any(t in func.tags for t in _SYNC_TAGS)


class LaunchCounter(TorchDispatchMode):
    """Counts the device ops and syncs of what runs inside it, by phase; see the module's docstring."""

    def __init__(self, device_objects=()):
        super().__init__()
        self.device_tensors = WeakTensorKeyDictionary()
        for obj in device_objects:
            self.mark(obj)
        self.ops: Counter = Counter()  # (phase, op name)
        self.syncs: Counter = Counter()
        self.host_ops = 0
        self.state = "inputs"
        self.after_backward = False
        self._stack = contextlib.ExitStack()

    def mark(self, obj) -> None:
        """Treat obj's tensors (a module's parameters and buffers, an optimizer's state, a tensor) as on the device."""
        if isinstance(obj, torch.nn.Module):
            tensors = [*obj.parameters(), *obj.buffers()]
        elif isinstance(obj, torch.optim.Optimizer):
            tensors = [t for s in obj.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
            tensors += [p for g in obj.param_groups for p in g["params"]]
        else:
            tensors = [t for t in tree_leaves(obj) if isinstance(t, torch.Tensor)]
        for t in tensors:
            self.device_tensors[t] = True

    def on_device(self, t: torch.Tensor) -> bool:
        return t.device.type != "cpu" or t in self.device_tensors

    def phase(self) -> str:
        if torch._C._current_autograd_node() is not None:
            self.after_backward = True
            return "backward"
        return "optimizer" if self.after_backward else self.state

    def _record(self, name: str, sync: bool) -> None:
        phase = self.phase()
        self.ops[phase, name] += 1
        if sync:
            self.syncs[phase, name] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        device = any(self.on_device(t) for t in tensors) if tensors else self.phase() != "inputs"
        if not device:
            self.host_ops += 1
            return out
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.device_tensors[t] = True
        if not _launches_nothing(func):
            self._record(func._schema.name.split("::")[-1], _is_sync(func, args, kwargs))
        return out

    # -- hooks: phases from module forwards; host reads and host-to-device copies from Tensor methods --

    def _forward_started(self, module, args) -> None:
        self.state, self.after_backward = "forward", False

    def _wrap_tensor_methods(self) -> None:
        counter = self
        to, tolist, numpy, cpu = torch.Tensor.to, torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu

        def to_(t, *args, **kwargs):
            target = torch._C._nn._parse_to(*args, **kwargs)[0]
            out = to(t, *args, **kwargs)
            if target is not None and target.type == "cpu" and counter.on_device(t) and target == t.device:
                return out  # already there (the replay's "device" is the CPU)
            if target is not None and not counter.on_device(t):
                counter._record("h2d_copy", False)
                counter.device_tensors[out] = True
            elif target is not None and target.type == "cpu" and t.device.type != "cpu":
                counter._record("d2h_copy", True)
            return out

        def reader(method, name):
            def read(t, *args, **kwargs):
                if counter.on_device(t):
                    counter._record(name, True)
                return method(t, *args, **kwargs)

            return read

        patches = {"to": to_, "tolist": reader(tolist, "tolist"), "numpy": reader(numpy, "numpy")}
        patches["cpu"] = reader(cpu, "cpu")
        for name, fn in patches.items():
            saved = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, fn)
            self._stack.callback(setattr, torch.Tensor, name, saved)

    def __enter__(self):
        self._stack.enter_context(device_path())
        handle = torch.nn.modules.module.register_module_forward_pre_hook(self._forward_started)
        self._stack.callback(handle.remove)
        self._wrap_tensor_methods()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._stack.close()

    def summary(self, top: int = 8) -> dict:
        by_phase = {p: sum(n for (ph, _), n in self.ops.items() if ph == p) for p in PHASES}
        syncs = {p: sum(n for (ph, _), n in self.syncs.items() if ph == p) for p in PHASES}
        names: Counter = Counter()
        for (_, name), n in self.ops.items():
            names[name] += n
        sync_names: Counter = Counter()
        for (_, name), n in self.syncs.items():
            sync_names[name] += n
        return {
            "device_ops": sum(by_phase.values()),
            "syncs": sum(syncs.values()),
            "device_ops_by_phase": by_phase,
            "syncs_by_phase": syncs,
            "host_ops": self.host_ops,
            "top_ops": dict(names.most_common(top)),
            "top_syncs": dict(sync_names.most_common(top)),
        }


def count_step(step, device_objects, warmup: int = 1, repeats: int = 3) -> dict:
    """`step(i)` run `warmup` times uncounted (the optimizer builds its state), then counted `repeats` times, each
    after `random.seed(i)` (the serialization orders are shuffled with Python's RNG, and a Hilbert order costs more
    ops than a z order); `device_objects` (modules, optimizers) hold what lives on the device. The figures are the
    step with the most device ops; `device_ops_min` is the fewest."""
    with device_path():
        for i in range(warmup):
            random.seed(i)
            step(i)
    got = []
    for i in range(warmup, warmup + repeats):
        random.seed(i)
        counter = LaunchCounter(device_objects)
        with counter:
            step(i)
        got.append(counter.summary())
    worst = max(got, key=lambda r: r["device_ops"])
    return {**worst, "device_ops_min": min(r["device_ops"] for r in got), "syncs_min": min(r["syncs"] for r in got)}


# ---- the tasks ------------------------------------------------------------------------------------------------


def _seg(data: Path, size: str, batch: int, threads: int) -> tuple:
    from raysvc.bench.train import _job, first_batches, plain_training
    from raysvc.train.tasks.segmentation import train_step

    cfg = _job(data, data / "runs", size, 4, batch, threads)
    batches = first_batches(cfg, 2)
    torch.manual_seed(0)
    model, params, opt, loss_fn = plain_training(cfg)
    cpu = torch.device("cpu")

    def step(i: int) -> None:
        train_step(model, params, opt, loss_fn, batches[i % len(batches)], cfg, cpu)

    return step, (model, opt)


def _panda(data: Path, size: str, batch: int, threads: int) -> tuple:
    from raysvc.bench.gpu import PRETRAIN_JOB, _panda_stepper, _view_batches
    from raysvc.config import load_config
    from raysvc.train.tasks.panda import PretrainConfig

    sets = [f"data.uri={data / 'train'}", "probe_data=null", "train.steps=4", f"model.size={size}"]
    cfg = load_config(PretrainConfig, str(PRETRAIN_JOB), sets)
    batches = _view_batches(data / "train", cfg.views, cfg.data.preprocess, batch, 2)
    step, _, objects = _panda_stepper(cfg, batches, torch.device("cpu"))
    return step, objects


def _polarmae(data: Path, size: str, batch: int, threads: int) -> tuple:
    from raysvc.bench.gpu import _polarmae_stepper, polarmae_job
    from raysvc.bench.train import _job, first_batches

    batches = first_batches(_job(data, data / "runs", "tiny", 4, batch, threads), 2)
    step, _, objects = _polarmae_stepper(polarmae_job(data, 4, size), batches, torch.device("cpu"))
    return step, objects


TASKS = {"seg": _seg, "panda": _panda, "polarmae": _polarmae}


def _sizes(task: str) -> set[str]:
    """The model sizes a task can build (PoLAr-MAE has no small preset)."""
    if task == "polarmae":
        from raysvc.models.polarmae import PRESETS
    else:
        from raysvc.models.ptv3 import PRESETS
    return set(PRESETS)


def run_launches_bench(
    tasks: tuple[str, ...], sizes: tuple[str, ...], batches: tuple[int, ...], events: int, log=print
) -> dict:
    """`<task>_<size>_device_ops` and `_syncs` at the first of `batches` (events per step), the phase split, and the
    growth of both at each larger batch (`..._b<B>_vs_b<first>`); sizes a task has no preset for are left out."""
    from raysvc.bench.train import generate_bench_data

    torch.set_num_threads(1)
    out: dict = {"settings": {"events": events, "batch_events": list(batches), "torch": torch.__version__}}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        generate_bench_data(data, events, log)
        for task in tasks:
            for size in [s for s in sizes if s in _sizes(task)]:
                for b in batches:
                    log(f"{task} {size}, {b} events per step")
                    step, objects = TASKS[task](data, size, b, 1)
                    got = count_step(step, objects)
                    key = f"{task}_{size}"
                    out[f"{key}_b{b}"] = got
                    if b == batches[0]:
                        out[f"{key}_device_ops"], out[f"{key}_syncs"] = got["device_ops"], got["syncs"]
                    else:
                        first = out[f"{key}_b{batches[0]}"]
                        out[f"{key}_device_ops_b{b}_vs_b{batches[0]}"] = got["device_ops"] / first["device_ops"]
                        out[f"{key}_syncs_b{b}_vs_b{batches[0]}"] = got["syncs"] / max(first["syncs"], 1)
    return out
