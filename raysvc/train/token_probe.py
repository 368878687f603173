"""The token probe of PoLAr-MAE (docs/methods.md, "PoLAr-MAE"): how well frozen token features tell which particle
classes a token's group contains.

Targets are multi-label: token t has class c when any real point of its group is of class c. Features are reduced
by PCA (fitted on the probe-train tokens) and each class gets its own linear SVM (one-vs-rest, class-balanced,
C = 0.005 in the paper); the score is the F1 of each class on the probe-validation tokens and their mean.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from raysvc.train.config import HeldOutProbeSection


class TokenProbeConfig(HeldOutProbeSection):
    pca_dims: int = Field(128, gt=0, description="PCA components (fewer when features or tokens are fewer)")
    C: float = Field(0.005, gt=0, description="inverse regularisation strength of each linear SVM")
    max_iter: int = Field(5000, gt=0)
    classes: list[str] | None = Field(
        None, description="classes scored (default: every class of the detector but its stuff class)"
    )


def scored_classes(cfg: TokenProbeConfig, detector) -> list[str]:
    """The classes the probe scores: `cfg.classes`, or every class of `detector` but its stuff class; a class the
    detector does not have is an error naming both."""
    names = list(detector.class_names)
    if cfg.classes is None:
        return [c for i, c in enumerate(names) if i != detector.stuff_class]
    unknown = [c for c in cfg.classes if c not in names]
    if unknown:
        raise ValueError(f"probe.classes {unknown} are not classes of {detector.name}: {names}")
    return list(cfg.classes)


def fit_and_score(
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    cfg: TokenProbeConfig,
    class_names: list[str],
    scored: list[str],
    seed: int = 0,
) -> dict:
    """`train` / `val`: (token features (T, D), multi-label targets (T, C) bool over `class_names`). Returns
    {"f1": {class: F1 or None when the class has no positive probe-train token}, "mean_f1": over scored classes
    that have an F1, "tokens": {"train", "val"}}."""
    from sklearn.decomposition import PCA  # here: ~1 s at import, see train/probe.py
    from sklearn.metrics import f1_score
    from sklearn.svm import LinearSVC

    (x, y), (xv, yv) = train, val
    dims = min(cfg.pca_dims, x.shape[1], len(x))
    pca = PCA(n_components=dims, random_state=seed).fit(x)
    z, zv = pca.transform(x), pca.transform(xv)
    f1: dict[str, float | None] = {}
    for name in scored:
        c = class_names.index(name)
        if y[:, c].all() or not y[:, c].any():  # one label only: nothing to separate
            f1[name] = None
            continue
        svm = LinearSVC(C=cfg.C, class_weight="balanced", max_iter=cfg.max_iter, random_state=seed)
        svm.fit(z, y[:, c])
        f1[name] = float(f1_score(yv[:, c], svm.predict(zv), zero_division=0.0))
    values = [v for v in f1.values() if v is not None]
    return {
        "f1": f1,
        "mean_f1": float(np.mean(values)) if values else None,
        "tokens": {"train": len(x), "val": len(xv)},
    }
