"""Uncertainty of AUCs on small test sets: DeLong's test and paired stratified bootstrap.

DeLong, DeLong & Clarke-Pearson (1988), "Comparing the areas under two or more correlated receiver
operating characteristic curves", Biometrics 44(3), with the structural components computed from
mid-ranks (Sun & Xu 2014). The macro AUC of a multi-class problem is not a single Mann-Whitney
statistic, so for it we use a paired, class-stratified bootstrap instead.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import norm, rankdata

from .metrics import classification_metrics


def _structural_components(pos: np.ndarray, neg: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    m, n = len(pos), len(neg)
    all_ranks = rankdata(np.concatenate([pos, neg]))
    pos_ranks, neg_ranks = rankdata(pos), rankdata(neg)
    auc = (all_ranks[:m].sum() - m * (m + 1) / 2) / (m * n)
    v10 = (all_ranks[:m] - pos_ranks) / n  # per positive: fraction of negatives it beats (ties 1/2)
    v01 = 1 - (all_ranks[m:] - neg_ranks) / m  # per negative: fraction of positives that beat it
    return float(auc), v10, v01


def delong_test(labels: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray) -> dict[str, float]:
    """Two-sided DeLong test of AUC(a) = AUC(b) for two scores of the same binary-labelled cases."""
    labels = np.asarray(labels).astype(bool)
    a_auc, a10, a01 = _structural_components(np.asarray(scores_a)[labels], np.asarray(scores_a)[~labels])
    b_auc, b10, b01 = _structural_components(np.asarray(scores_b)[labels], np.asarray(scores_b)[~labels])
    m, n = len(a10), len(a01)
    s10 = np.cov(np.vstack([a10, b10]))
    s01 = np.cov(np.vstack([a01, b01]))
    cov = s10 / m + s01 / n
    var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    diff = a_auc - b_auc
    if var <= 0:
        p = 1.0 if diff == 0 else 0.0
    else:
        p = float(2 * norm.sf(abs(diff) / math.sqrt(var)))
    return {"auc_a": a_auc, "auc_b": b_auc, "difference": diff, "p": p}


def _stratified_indices(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    parts = [rng.choice(np.flatnonzero(labels == c), size=int((labels == c).sum()), replace=True)
             for c in np.unique(labels)]
    return np.concatenate(parts)


def paired_bootstrap(labels: np.ndarray, probs_a: np.ndarray, probs_b: np.ndarray | None = None, *,
                     classes: tuple[str, ...], n_resamples: int = 1000, seed: int = 0,
                     level: float = 0.95) -> dict[str, float]:
    """Percentile CI of model a's macro AUC; with ``probs_b``, also of the difference a - b and a two-sided
    p-value (twice the smaller share of resampled differences on either side of 0). Resamples are drawn
    within each class (the class counts stay fixed) and shared by both models (paired)."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    aucs, diffs = [], []
    for _ in range(n_resamples):
        idx = _stratified_indices(labels, rng)
        a = classification_metrics(labels[idx], probs_a[idx], classes)["auc_macro"]
        aucs.append(a)
        if probs_b is not None:
            diffs.append(a - classification_metrics(labels[idx], probs_b[idx], classes)["auc_macro"])
    lo, hi = (1 - level) / 2, (1 + level) / 2
    out = {"ci_low": float(np.nanquantile(aucs, lo)), "ci_high": float(np.nanquantile(aucs, hi)),
           "n_resamples": n_resamples, "seed": seed}
    if probs_b is not None:
        d = np.asarray(diffs)
        out.update({"diff_ci_low": float(np.quantile(d, lo)), "diff_ci_high": float(np.quantile(d, hi)),
                    "p": float(min(1.0, 2 * min((d <= 0).mean(), (d >= 0).mean())))})
    return out
