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


@torch.no_grad()
def point_features(
    backbone: PTv3,
    batches: list[dict],
    inputs_fn,
    device: torch.device,
) -> tuple[np.ndarray, np.ndarray]:
    """(features (N, sum(channels)) float32, labels (N,)) of every point of `batches`; `inputs_fn(batch)` gives the
    model inputs (grid sampling and all) exactly as fine-tuning makes them."""
    was_training = backbone.training
    backbone.eval()
    feats, labels = [], []
    for batch in batches:
        x = inputs_fn(batch)
        levels = backbone(x["feat"], x["coord"], x["grid_coord"], x["offset"])
        feats.append(upcast(levels)[x["inverse"]].float().cpu().numpy())
        labels.append(x["labels"].cpu().numpy())
    backbone.train(was_training)
    return np.concatenate(feats), np.concatenate(labels)


def fit_and_score(
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    cfg: ProbeConfig,
    class_names: list[str],
    seed: int = 0,
) -> dict:
    """Fit on a class-capped sample of `train`, score on all of `val`: the metrics dict of `metrics.compute`."""
    # imported here, not at the top: sklearn costs ~1 s at import, paid by every command and Train worker that
    # imports the training modules, while few of them probe
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x, y = train
    rng = np.random.default_rng(seed)
    keep = np.concatenate([rng.permutation(np.flatnonzero(y == c))[: cfg.points_per_class] for c in np.unique(y)])
    scaler = StandardScaler().fit(x[keep])
    clf = LogisticRegression(C=cfg.C, max_iter=cfg.max_iter)
    clf.fit(scaler.transform(x[keep]), y[keep])
    pred = clf.predict(scaler.transform(val[0]))
    cm = ConfusionMatrix(len(class_names)).update(torch.from_numpy(pred), torch.from_numpy(val[1]))
    return compute(cm.matrix, class_names)


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
    return fit_and_score(
        point_features(backbone, probe_train, inputs_fn, device),
        point_features(backbone, probe_val, inputs_fn, device),
        cfg,
        class_names,
        seed,
    )
