"""raysvc.train.token_probe: PCA + one linear SVM per class on multi-label token targets, scored by F1."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import f1_score

from raysvc.train.token_probe import TokenProbeConfig, fit_and_score

CLASSES = ["shower", "track", "michel", "delta", "led"]


def _tokens(rng, n: int, informative: bool) -> tuple[np.ndarray, np.ndarray]:
    """Multi-label targets over 4 classes (led never) and 32-d features: the first 4 dims carry the labels (+ noise)
    when informative, else nothing does."""
    y = rng.random((n, len(CLASSES))) < [0.5, 0.4, 0.1, 0.2, 0.0]
    x = rng.normal(size=(n, 32))
    if informative:
        x[:, :4] += 6.0 * y[:, :4]
    return x.astype(np.float32), y


def test_informative_features_score_high_and_noise_scores_at_chance():
    rng = np.random.default_rng(0)
    cfg = TokenProbeConfig(pca_dims=16)
    scored = CLASSES[:4]
    good = fit_and_score(_tokens(rng, 2000, True), _tokens(rng, 1000, True), cfg, CLASSES, scored)
    assert set(good["f1"]) == set(scored) and all(v > 0.9 for v in good["f1"].values()), good
    assert good["mean_f1"] == np.mean(list(good["f1"].values())) and good["tokens"] == {"train": 2000, "val": 1000}
    noise = fit_and_score(_tokens(rng, 2000, False), _tokens(rng, 1000, False), cfg, CLASSES, scored)
    # a class-balanced guess on noise: F1 near 2p / (1 + 2p) for a class of prevalence p (michel 0.1 -> ~0.17)
    assert noise["f1"]["michel"] < 0.35 and noise["mean_f1"] < good["mean_f1"] - 0.3, noise


def test_a_class_without_positive_tokens_has_no_f1_and_stays_out_of_the_mean():
    rng = np.random.default_rng(1)
    train, val = _tokens(rng, 500, True), _tokens(rng, 300, True)
    out = fit_and_score(train, val, TokenProbeConfig(pca_dims=8), CLASSES, CLASSES)
    assert out["f1"]["led"] is None
    assert np.isclose(out["mean_f1"], np.mean([out["f1"][c] for c in CLASSES[:4]]))


def test_scores_are_sklearns_f1_of_the_predictions_it_would_make():
    """The F1 reported equals sklearn's f1_score on the same split when the SVM is refitted independently."""
    from sklearn.decomposition import PCA
    from sklearn.svm import LinearSVC

    rng = np.random.default_rng(2)
    (x, y), (xv, yv) = _tokens(rng, 800, True), _tokens(rng, 400, True)
    cfg = TokenProbeConfig(pca_dims=10)
    out = fit_and_score((x, y), (xv, yv), cfg, CLASSES, ["track"])
    pca = PCA(10, random_state=0).fit(x)
    svm = LinearSVC(C=0.005, class_weight="balanced", max_iter=5000, random_state=0).fit(pca.transform(x), y[:, 1])
    assert out["f1"]["track"] == f1_score(yv[:, 1], svm.predict(pca.transform(xv)))
