"""Both probes, offline, on any exported backbone or a random initialisation of an architecture (`raysvc probe`):
the per-point linear probe (train/probe.py) and PoLAr-MAE's token probe (train/token_probe.py), on the same
held-out events and the same C-NMS tokens, so that encoders of different methods are scored alike.

The features are computed in this process (`actors=0`) or, as a Ray Data job, by a pool of backbone replicas over
the same chunks of events (`inference/batch.py`'s actor pool): the same numbers either way, fitted here.

Per-point features are what a "lin" head sees: PTv3's stages up-cast to the points, or PoLAr-MAE's token features
propagated to the points. Token features are PoLAr-MAE's encoder output per token; a PTv3 encoder has no tokens, so
its token feature is the mean of its per-point features over the real points of the token's group.
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import torch

from raysvc.data.streaming.collate import collate_packed
from raysvc.data.streaming.config import DataConfig
from raysvc.data.streaming.pipeline import stream_tables
from raysvc.data.streaming.prepared import prepare
from raysvc.hub import read_model
from raysvc.inference.batch import actor_pool, check_room, split_chunks, tag_chunk
from raysvc.inference.featurize import model_inputs
from raysvc.inference.record import ModelSpec, load_backbone_weights
from raysvc.models.polarmae import PolarMAEConfig, preset, token_targets, tokenize
from raysvc.storage import resolve
from raysvc.train.probe import ProbeConfig
from raysvc.train.probe import fit_and_score as fit_points
from raysvc.train.tasks.panda import probe_tables
from raysvc.train.token_probe import TokenProbeConfig, scored_classes
from raysvc.train.token_probe import fit_and_score as fit_tokens


def group_mean(point_feat: torch.Tensor, groups: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """(T, C): the mean of `point_feat` over the first `sizes[t]` (the real) points of each group (padding repeats a
    group's first point, so a plain mean over the row would weight it more)."""
    real = (torch.arange(groups.shape[1], device=groups.device) < sizes[:, None]).to(point_feat.dtype)
    summed = (point_feat[groups] * real[..., None]).sum(1)
    return summed / sizes.clamp_min(1)[:, None].to(point_feat.dtype)


def load_backbone(
    init: str | None, arch: str, size: str, num_classes: int, seed: int, center_events: bool = False
) -> tuple[torch.nn.Module, dict]:
    """(a "lin" segmenter holding the backbone, what it is). `init`: a model in any format raysvc reads (backbone or
    segmenter); None: the architecture's random initialisation under `seed`, fed centred events when
    `center_events`."""
    torch.manual_seed(seed)
    if init is None:
        spec = ModelSpec(arch=arch, size=size, head="lin", center_events=center_events)
        about = {"init": None, "method": "random"}
        model = spec.build_segmenter(num_classes)
    else:
        # any format; its inputs must be stated (a foreign checkpoint: raysvc weights import first)
        state, record = read_model(resolve(init), needs=("detector", "grid_voxels", "center_events"))
        spec = record.model.model_copy(update={"head": "lin"})
        model = spec.build_segmenter(num_classes)
        load_backbone_weights(model, state, f"{init}: weights do not match its record")
        about = {"init": init, "method": record.method, "step": record.step}
    model.eval()
    return model, {**about, "arch": spec.arch, "size": spec.size, "center_events": spec.center_events, "spec": spec}


@torch.no_grad()
def features(model, spec: ModelSpec, chunks: list[pa.Table], pre, tok_cfg: PolarMAEConfig, num_classes: int):
    """((point features, point labels), (token features, token targets)) of every point and token of the
    preprocessed event `chunks` (each packed as one batch)."""
    points, labels, toks, targets = [], [], [], []
    for chunk in chunks:
        batch = collate_packed(chunk)
        x = model_inputs(batch, pre.center, pre.scale, spec.grid_voxels, torch.device("cpu"), spec.center_events)
        per_point = model.point_features(x["feat"], x["coord"], x["grid_coord"], x["offset"])[x["inverse"]]
        points.append(per_point.float().numpy())
        labels.append(x["labels"].numpy())
        # tokens of the raw points, as PoLAr-MAE's pretraining and its online probe make them
        tokens = tokenize(batch["coord"].float(), batch["energy"].float(), batch["offset"], tok_cfg)
        if spec.arch == "polarmae":
            toks.append(model.backbone.encode(tokens).float().numpy())
        else:
            toks.append(group_mean(per_point.float(), tokens.groups, tokens.sizes).numpy())
        targets.append(token_targets(tokens.groups, tokens.sizes, batch["semantic"], num_classes).numpy())
    return (np.concatenate(points), np.concatenate(labels)), (np.concatenate(toks), np.concatenate(targets))


_ARRAYS = ("points", "labels", "tokens", "targets")  # the arrays `features` returns, in its order


def _to_table(feats) -> pa.Table:
    """`features`' arrays as one Arrow row: each array's bytes, dtype and shape."""
    (p, lab), (t, tgt) = feats
    cols = {}
    for k, a in zip(_ARRAYS, (p, lab, t, tgt), strict=True):
        cols |= {k: [a.tobytes()], f"{k}_dtype": [str(a.dtype)], f"{k}_shape": [list(a.shape)]}
    return pa.table(cols)


def _from_rows(rows: list[dict]) -> tuple:
    """`features`' result from `_to_table`'s rows, concatenated in the given order."""
    arrays = {
        k: np.concatenate([np.frombuffer(r[k], r[f"{k}_dtype"]).reshape(r[f"{k}_shape"]) for r in rows])
        for k in _ARRAYS
    }
    return (arrays["points"], arrays["labels"]), (arrays["tokens"], arrays["targets"])


class _Featurizer:
    """A backbone replica of the Ray Data actor pool: the same `load_backbone` as this process, then `features`
    of each chunk it is given (split back out of merged blocks by its tags)."""

    def __init__(self, backbone: dict, pre, tok_cfg: PolarMAEConfig, num_classes: int, threads: int):
        torch.set_num_threads(threads)
        self.model, about = load_backbone(**backbone)
        self.spec, self.pre, self.tok_cfg, self.num_classes = about["spec"], pre, tok_cfg, num_classes

    def __call__(self, block: pa.Table) -> pa.Table:
        outs = []
        for split, i, chunk in split_chunks(block):
            feats = features(self.model, self.spec, [chunk], self.pre, self.tok_cfg, self.num_classes)
            outs.append(tag_chunk(_to_table(feats), split, i))
        return pa.concat_tables(outs)


def _pool_features(sets, backbone: dict, pre, tok_cfg, num_classes, actors: int, cpus_per_actor: float | None) -> list:
    """`features` of each list of chunks in `sets`, computed by a pool of `actors` backbone replicas."""
    import ray.data

    cpus_per_actor = check_room(actors, cpus_per_actor)
    tagged = [tag_chunk(c, s, i) for s, chunks in enumerate(sets) for i, c in enumerate(chunks)]
    ds = ray.data.from_arrow(tagged)
    kwargs = {"backbone": backbone, "pre": pre, "tok_cfg": tok_cfg, "num_classes": num_classes}
    ds = actor_pool(ds, _Featurizer, actors, cpus_per_actor, "cpu", kwargs)
    rows: dict[tuple[int, int], dict] = {}
    for out in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for s, i, row in split_chunks(out):
            (rows[(s, i)],) = row.to_pylist()
    return [_from_rows([rows[(s, i)] for i in range(len(chunks))]) for s, chunks in enumerate(sets)]


def probe_backbone(
    init: str | None,
    data: DataConfig,
    arch: str = "ptv3",
    size: str = "tiny",
    point: ProbeConfig | None = None,
    token: TokenProbeConfig | None = None,
    radius_voxels: float = 5.0,
    overlap: float = 0.72,
    max_points: int = 32,
    max_tokens: int = 512,
    seed: int = 0,
    center_events: bool = False,
    actors: int = 0,
    cpus_per_actor: float | None = None,
    log=print,
    split_ids: dict | None = None,
    fit_data: DataConfig | None = None,
) -> dict:
    """Both probes of one backbone on the first `train_events` + next `val_events` events of `data` (the online
    probes' split); with `fit_data`, fitted on the first `train_events` events of `fit_data` (a validation set) and
    scored on the first `val_events` of `data` (the test set), which must share its detector and preprocessing.
    The token probe uses the backbone's own tokenizer when it is a PoLAr-MAE one, else these settings; `arch`,
    `size` and `center_events` describe the random initialisation when `init` is None. `actors` >= 1 (Ray started
    by the caller): the events are read with Ray Data and the features computed by that many backbone replicas; 0:
    read with Ray tasks, features in this process.
    `split_ids`, when given, gets the event ids of the fitting ("train") and scored ("test") events.
    Returns {"backbone", "point" (metrics.compute's dict), "token" {f1, mean_f1, tokens}, ...}."""
    point, token = point or ProbeConfig(), token or TokenProbeConfig()
    if token.train_events != point.train_events or token.val_events != point.val_events:
        raise ValueError("the point and token probes must use the same events (train_events, val_events)")
    t0 = time.perf_counter()
    prep = prepare(data)
    names = list(prep.detector.label_classes(data.preprocess.remove_led))
    scored = scored_classes(token, prep.detector)
    backbone = {"init": init, "arch": arch, "size": size, "num_classes": len(names), "seed": seed}
    backbone["center_events"] = center_events
    model, about = load_backbone(**backbone)
    spec = about.pop("spec")
    scale = data.preprocess.scale
    if spec.arch == "polarmae":
        tok_cfg = spec.backbone_config()
    else:
        radius = radius_voxels / scale
        tok_cfg = preset("tiny", radius=radius, overlap=overlap, max_points=max_points, max_tokens=max_tokens)
    if actors:
        data = data.model_copy(update={"loader": "ray_data"})
    if fit_data is None:
        train, val = probe_tables(
            stream_tables(data, prep, prep.manifest.shards), point.train_events, point.val_events, data.uri
        )
    else:
        fit_prep = prepare(fit_data)
        if fit_prep.detector.name != prep.detector.name or fit_data.preprocess != data.preprocess:
            raise ValueError(
                f"probe: --fit-data {fit_data.uri} ({fit_prep.detector.name}, {fit_data.preprocess}) and --data "
                f"{data.uri} ({prep.detector.name}, {data.preprocess}) must share detector and preprocessing"
            )
        if actors:
            fit_data = fit_data.model_copy(update={"loader": "ray_data"})
        fit_stream = stream_tables(fit_data, fit_prep, fit_prep.manifest.shards)
        train = probe_tables(fit_stream, point.train_events, 0, fit_data.uri)[0]
        val = probe_tables(stream_tables(data, prep, prep.manifest.shards), 0, point.val_events, data.uri)[1]
    if split_ids is not None:  # the events each half holds, for a run record's split
        for role, chunks in (("train", train), ("test", val)):
            split_ids[role] = [i for c in chunks for i in c.column("event_id").to_pylist()]
    fitted_on = "" if fit_data is None else f" fitted on {fit_data.uri},"
    log(
        f"[raysvc] probing {init or f'a random {arch} {size}'}{fitted_on} on {data.uri}: "
        f"{point.train_events} + {point.val_events} events"
        + (f", features by {actors} Ray Data actor(s)" if actors else "")
    )
    if actors:
        args = (backbone, data.preprocess, tok_cfg, len(names), actors, cpus_per_actor)
        (p_train, t_train), (p_val, t_val) = _pool_features([train, val], *args)
    else:
        (p_train, t_train), (p_val, t_val) = (
            features(model, spec, c, data.preprocess, tok_cfg, len(names)) for c in (train, val)
        )
    pm = fit_points(p_train, p_val, point, names, seed)
    tm = fit_tokens(t_train, t_val, token, names, scored, seed)
    return {
        "backbone": about,
        "data": data.uri,
        "fit_data": None if fit_data is None else fit_data.uri,
        "events": {"train": point.train_events, "val": point.val_events},
        "point": {k: pm[k] for k in ("miou", "iou", "mf1", "f1", "accuracy")},
        "token": {**tm, "classes": scored},
        "tokenizer": {
            "radius_voxels": tok_cfg.radius * scale,
            "overlap": tok_cfg.overlap,
            "max_points": tok_cfg.max_points,
            "max_tokens": tok_cfg.max_tokens,
        },
        "seconds": time.perf_counter() - t0,
    }
