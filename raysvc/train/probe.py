"""Online linear probe: frozen backbone features of held-out labelled events -> a linear classifier -> per-class
F1 / IoU. Cheap, and it tells early whether self-supervision learns anything (docs/methods.md, "Panda": "monitoring").

Features are the lin protocol's: every stage up-cast to the points (`ptv3.upcast`). The classifier is scikit-learn's
multinomial logistic regression on standardised features, fitted on a per-class-capped sample of the probe-train
events' points and scored on every point of the probe-validation events with the project's metrics.
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field

from raysvc.inference.metrics import ConfusionMatrix, compute
from raysvc.models.ptv3 import PTv3, upcast
from raysvc.train.config import HeldOutProbeSection


class ProbeConfig(HeldOutProbeSection):
    points_per_class: int = Field(4000, gt=0, description="cap on fitting points per class (balances the fit)")
    C: float = Field(1.0, gt=0, description="inverse L2 strength of the logistic regression")
    max_iter: int = Field(300, gt=0)


def _sample(y: np.ndarray, cap: int, seed: int) -> np.ndarray:
    """Indices of a per-class-capped random sample of the points labelled `y` (at most `cap` of each class)."""
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.permutation(np.flatnonzero(y == c))[:cap] for c in np.unique(y)])


def _classifier(x: np.ndarray, y: np.ndarray, cfg: ProbeConfig):
    """Standardisation and logistic regression fitted on (x, y): a function from features to classes."""
    # imported here, not at the top: sklearn costs ~1 s at import, paid by every command and Train worker that
    # imports the training modules, while few of them probe
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x)
    clf = LogisticRegression(C=cfg.C, max_iter=cfg.max_iter)
    clf.fit(scaler.transform(x), y)
    return lambda feats: clf.predict(scaler.transform(feats))


def fit_and_score(
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    cfg: ProbeConfig,
    class_names: list[str],
    seed: int = 0,
) -> dict:
    """Fit on a class-capped sample of `train`, score on all of `val`: the metrics dict of `metrics.compute`."""
    x, y = train
    keep = _sample(y, cfg.points_per_class, seed)
    pred = _classifier(x[keep], y[keep], cfg)(val[0])
    cm = ConfusionMatrix(len(class_names)).update(torch.from_numpy(pred), torch.from_numpy(val[1]))
    return compute(cm.matrix, class_names)


@torch.no_grad()
def run_probe(
    backbone: PTv3,
    probe_train: list[dict],
    probe_val: list[dict],
    inputs_fn,
    device,
    cfg: ProbeConfig,
    class_names: list[str],
    seed: int = 0,
) -> dict:
    """`fit_and_score` of the backbone's point features, the same figures without holding every point's features:
    the labels are read first to draw the sample, the backbone then keeps only the sampled points' features, and the
    validation points are classified batch by batch. (Every point's features of both sets were ~1 GB for the demo's
    probe: 300k points x 432 channels, twice.)"""
    was_training = backbone.training
    backbone.eval()
    labels = np.concatenate([inputs_fn(b)["labels"].cpu().numpy() for b in probe_train])
    keep = _sample(labels, cfg.points_per_class, seed)
    x, start = None, 0
    for batch in probe_train:
        feats, y = _features(backbone, inputs_fn(batch))
        rows = (keep >= start) & (keep < start + len(y))  # the sampled points in this batch, in sample order
        x = np.empty((len(keep), feats.shape[1]), np.float32) if x is None else x
        x[rows] = feats[keep[rows] - start]
        start += len(y)
    predict = _classifier(x, labels[keep], cfg)
    cm = ConfusionMatrix(len(class_names))
    for batch in probe_val:
        feats, y = _features(backbone, inputs_fn(batch))
        cm.update(torch.from_numpy(predict(feats)), torch.from_numpy(y))
    backbone.train(was_training)
    return compute(cm.matrix, class_names)


def _features(backbone: PTv3, x: dict) -> tuple[np.ndarray, np.ndarray]:
    """(features (N, sum(channels)) float32, labels (N,)) of the points of one batch of model inputs."""
    levels = backbone(x["feat"], x["coord"], x["grid_coord"], x["offset"])
    return upcast(levels)[x["inverse"]].float().cpu().numpy(), x["labels"].cpu().numpy()
