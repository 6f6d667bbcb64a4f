"""AUCs and their uncertainty on small test sets: macro AUC, stratified bootstrap, DeLong's test.

Conventions shared by every function here:

* ``labels`` is an ``(N,)`` array of true class indices, ``probs`` an ``(N, C)`` array whose column ``k``
  scores class ``k`` (as in :class:`mltl.evaluation.results.Predictions`).
* One-vs-rest: class ``k`` is "positive" for the images labelled ``k``, "negative" for all others,
  scored by column ``k``.
* Classes absent from ``labels`` have no one-vs-rest AUC; they are left out of every macro average.
* A two-column problem is binary: its macro AUC is the AUC of column 1 (the one-vs-rest AUC of class 0
  on column 0 is the same number when rows sum to one).

The macro AUC of a multi-class problem is not a single Mann-Whitney statistic, so its uncertainty comes
from one class-stratified bootstrap (:func:`stratified_resamples`), used for every CI and paired
p-value mltl prints: the run report's, the reporters' and ``mltl compare``'s. For the same labels,
``n_resamples`` and ``seed`` they see the same resamples, so they print the same interval.

**Cluster bootstrap.** Images of one patient are not independent: a test set of 200 images from 40
patients carries far less information than 200 patients would, and resampling images gives too narrow an
interval and too small a p-value. Every bootstrap function here takes ``groups`` (one case key per image,
e.g. :attr:`mltl.Predictions.groups`): with it, whole groups are drawn with replacement, stratified by each
group's majority class, and a drawn group brings all its images (as often as it was drawn). Without it
(``groups=None``) the image bootstrap is used, unchanged. Binary AUCs
of two models are compared with DeLong, DeLong & Clarke-Pearson (1988), "Comparing the areas under two
or more correlated receiver operating characteristic curves", Biometrics 44(3), with the structural
components computed from mid-ranks (Sun & Xu 2014).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.stats import norm, rankdata
from sklearn.metrics import roc_auc_score

__all__ = ["check_scores", "scored_classes", "macro_auc", "stratified_resamples", "bootstrap_macro_aucs",
           "bootstrap_auc_ci", "paired_bootstrap", "paired_bootstrap_over_draws", "delong_test",
           "resampling_unit"]


# --------------------------------------------------------------------------------------------- checks


def check_scores(labels: Any, probs: Any) -> tuple[np.ndarray, np.ndarray]:
    """``labels`` as an ``int64`` ``(N,)`` array and ``probs`` as a ``float64`` ``(N, C)`` array, checked.

    Raises ``ValueError`` unless ``probs`` has two dimensions and at least two columns, ``labels`` one
    entry per row of ``probs``, and every label is a whole number in ``[0, C - 1]``.
    """
    labels = np.asarray(labels)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2:
        raise ValueError(f"probs must be a 2-D (N, C) array, got shape {probs.shape}")
    if labels.ndim != 1 or labels.shape[0] != probs.shape[0]:
        raise ValueError(
            f"labels must be a 1-D array with one entry per row of probs: got labels {labels.shape}, "
            f"probs {probs.shape}"
        )
    if probs.shape[1] < 2:
        raise ValueError(f"probs needs at least two class columns, got {probs.shape[1]}")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        if not np.all(labels == np.round(labels)):
            raise ValueError("labels must be integer class indices")
        labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= probs.shape[1]):
        raise ValueError(
            f"labels must be class indices in [0, {probs.shape[1] - 1}], "
            f"got values in [{labels.min()}, {labels.max()}]"
        )
    return labels.astype(np.int64, copy=False), probs


def scored_classes(labels: Any, probs: Any) -> list[int]:
    """The class indices whose one-vs-rest AUC enters the macro average.

    Empty when fewer than two classes are present in ``labels`` (no AUC is defined); ``[1]`` for a
    binary (two-column) problem with both classes present; otherwise the present classes, ascending.
    """
    labels, probs = check_scores(labels, probs)
    present = np.unique(labels)
    if present.size < 2:
        return []
    if probs.shape[1] == 2:
        return [1]
    return [int(k) for k in present]


# ------------------------------------------------------------------------------------------ macro AUC


def macro_auc(labels: Any, probs: Any) -> float:
    """One-vs-rest macro ROC AUC, via :func:`sklearn.metrics.roc_auc_score`.

    Binary (2 columns): the AUC of column 1. Otherwise the unweighted mean of the one-vs-rest AUCs of
    the classes present in ``labels`` (absent classes are left out of the mean; with every class
    present this equals ``roc_auc_score(labels, probs, multi_class="ovr", average="macro")``).
    NaN when fewer than two classes are present.
    """
    labels, probs = check_scores(labels, probs)
    classes = scored_classes(labels, probs)
    if not classes:
        return math.nan
    return float(np.mean([roc_auc_score(labels == k, probs[:, k]) for k in classes]))


# ---------------------------------------------------------------------------------------- bootstrap


def _positive_int(n_resamples: Any) -> int:
    if isinstance(n_resamples, bool) or int(n_resamples) != n_resamples or n_resamples < 1:
        raise ValueError(f"n_resamples must be a positive integer, got {n_resamples!r}")
    return int(n_resamples)


def stratified_resamples(labels: Any, n_resamples: int = 1000, seed: int = 0,
                         groups: Sequence[Any] | None = None) -> np.ndarray | list[np.ndarray]:
    """Row indices of ``n_resamples`` class-stratified bootstrap resamples, shape ``(n_resamples, N)``.

    Each resample draws, within each class separately, as many rows with replacement as that class
    has, so every resample keeps the class counts (and so the set of present classes). The scheme:
    ``rng = np.random.default_rng(seed)``; for each class ``c`` present in ``labels``, ascending,
    ``members = np.flatnonzero(labels == c)`` and ``members[rng.integers(0, len(members),
    size=(n_resamples, len(members)))]``; these blocks are joined along axis 1 in that class order.
    Resample ``b`` is row ``b``; column ``j`` holds a row of the same class in every resample.

    With ``groups`` (one case key per row, e.g. a patient id), the cluster bootstrap: a list of
    ``n_resamples`` 1-D index arrays, whose lengths vary with the sizes of the groups drawn. The scheme:
    the groups are the distinct keys, sorted (``np.unique``); each group's class is the class most of its
    rows have (ties: the lower class index); ``rng = np.random.default_rng(seed)``; for each such group
    class ``c``, ascending, ``members`` = the indices of the groups of class ``c`` and
    ``members[rng.integers(0, len(members), size=(n_resamples, len(members)))]``; resample ``b`` is, for
    each group drawn in row ``b`` of these blocks (in class order, then draw order), all of that group's
    rows in their original order. Every resample holds as many groups of each group class as the data
    (so a class that is the majority of some group is always present).
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be a 1-D array, got shape {labels.shape}")
    n_resamples = _positive_int(n_resamples)
    if groups is not None:
        group_of, picks = _group_picks(labels, groups, n_resamples, seed)
        rows_of = _rows_of_groups(group_of, picks.shape[1])
        empty = np.empty(0, dtype=np.int64)
        return [np.concatenate([rows_of[g] for g in row]) if row.size else empty for row in picks]
    rng = np.random.default_rng(seed)
    blocks = [np.empty((n_resamples, 0), dtype=np.int64)]
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        blocks.append(members[rng.integers(0, members.size, size=(n_resamples, members.size))])
    return np.concatenate(blocks, axis=1)


def _group_index(labels: np.ndarray, groups: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    """(per row its group index, groups sorted by key; per group the class most of its rows have, ties:
    the lower class index)."""
    keys = [str(g) if g is not None else "" for g in groups]
    if len(keys) != labels.shape[0]:
        raise ValueError(f"groups must give one case key per row: got {len(keys)} keys for {labels.shape[0]} rows")
    if any(not k for k in keys):
        raise ValueError("every row needs a case key (an empty or missing group found)")
    if not keys:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    names, group_of = np.unique(np.asarray(keys), return_inverse=True)
    group_of = group_of.reshape(-1).astype(np.int64)
    counts = np.zeros((names.size, int(labels.max()) + 1), dtype=np.int64)
    np.add.at(counts, (group_of, labels.astype(np.int64)), 1)
    return group_of, counts.argmax(axis=1)


def _group_picks(labels: np.ndarray, groups: Sequence[Any], n_resamples: int,
                 seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(per row its group index; the drawn group indices, ``(n_resamples, G)``, class blocks joined)."""
    group_of, group_class = _group_index(labels, groups)
    rng = np.random.default_rng(seed)
    blocks = [np.empty((n_resamples, 0), dtype=np.int64)]
    for c in np.unique(group_class):
        members = np.flatnonzero(group_class == c)
        blocks.append(members[rng.integers(0, members.size, size=(n_resamples, members.size))])
    return group_of, np.concatenate(blocks, axis=1)


def _rows_of_groups(group_of: np.ndarray, n_groups: int) -> list[np.ndarray]:
    order = np.argsort(group_of, kind="stable")
    return np.split(order, np.cumsum(np.bincount(group_of, minlength=n_groups))[:-1])


def _cluster_weights(labels: np.ndarray, groups: Sequence[Any], n_resamples: int, seed: int) -> np.ndarray:
    """``(n_resamples, N)``: how many times each row is in each cluster resample of
    :func:`stratified_resamples` (the times its group was drawn)."""
    group_of, picks = _group_picks(labels, groups, n_resamples, seed)
    n_groups = picks.shape[1]
    flat = (np.arange(n_resamples, dtype=np.int64)[:, None] * n_groups + picks).ravel()
    counts = np.bincount(flat, minlength=n_resamples * n_groups).reshape(n_resamples, n_groups)
    return counts.astype(np.int32)[:, group_of]  # a row is drawn at most N times: int32 halves the memory


_CHUNK_CELLS = 1 << 22  # resample x image cells per block of the weighted AUC (bounds its temporaries)


def _weighted_macro_aucs(labels: np.ndarray, probs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """:func:`macro_auc` of each resample given as row multiplicities ``weights`` ``(B, N)``: each
    one-vs-rest AUC is the Mann-Whitney count of the resample's (positive, negative) pairs, ties counted
    1/2, from integer sums (one rounding, as :func:`_resampled_macro_aucs`). NaN for a resample without a
    positive or a negative of a scored class."""
    classes = scored_classes(labels, probs)
    n_resamples = weights.shape[0]
    if not classes:
        return np.full(n_resamples, np.nan)
    total = np.zeros(n_resamples)
    step = max(1, _CHUNK_CELLS // max(1, labels.size))
    for k in classes:
        order = np.argsort(probs[:, k], kind="stable")
        score = probs[order, k]
        starts = np.flatnonzero(np.r_[True, score[1:] != score[:-1]])  # one block per distinct score
        positive = (labels == k)[order]
        for b0 in range(0, n_resamples, step):
            w = weights[b0:b0 + step][:, order].astype(np.int64)
            pos = np.add.reduceat(w * positive, starts, axis=1)
            neg = np.add.reduceat(w * ~positive, starts, axis=1)
            below = np.cumsum(neg, axis=1) - neg  # negative weight strictly below each score
            twice_u = (pos * (2 * below + neg)).sum(axis=1)
            with np.errstate(divide="ignore", invalid="ignore"):
                total[b0:b0 + step] += twice_u / (2.0 * pos.sum(axis=1) * neg.sum(axis=1))
    return total / len(classes)


class _Resampler:
    """The resamples of one bootstrap (image or cluster), scoring any probabilities on them."""

    def __init__(self, labels: np.ndarray, n_resamples: int, seed: int, groups: Sequence[Any] | None):
        self.labels = labels
        self.grouped = groups is not None
        if self.grouped:
            self.weights = _cluster_weights(labels, groups, n_resamples, seed)
        else:
            self.draws = stratified_resamples(labels, n_resamples, seed)

    def aucs(self, probs: np.ndarray) -> np.ndarray:
        if self.grouped:
            return _weighted_macro_aucs(self.labels, probs, self.weights)
        return _resampled_macro_aucs(self.labels, probs, self.draws)


def resampling_unit(n_rows: int, groups: Sequence[Any] | None) -> tuple[str, int]:
    """What the bootstrap resamples: ``("groups", number of distinct keys)`` with ``groups``, else
    ``("images", n_rows)``."""
    if groups is None:
        return "images", int(n_rows)
    return "groups", len({str(g) for g in groups})


def _resampled_macro_aucs(labels: np.ndarray, probs: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """:func:`macro_auc` of each row of ``draws`` (from :func:`stratified_resamples` of ``labels``)."""
    classes = scored_classes(labels, probs)
    if not classes:
        return np.full(draws.shape[0], np.nan)
    # Stratified: the class of column j is the same in every resample, so one mask serves all rows.
    drawn_labels = labels[draws[0]]
    n = drawn_labels.size
    total = np.zeros(draws.shape[0])
    for k in classes:
        positive = drawn_labels == k
        n_pos = int(positive.sum())
        n_neg = n - n_pos
        ranks = rankdata(probs[draws, k], method="average", axis=1)  # 1-based, ties averaged
        # Twice the Mann-Whitney U of the positives: an exact integer (ranks are half-integers).
        twice_u = 2.0 * ranks[:, positive].sum(axis=1) - n_pos * (n_pos + 1)
        total += twice_u / (2.0 * n_pos * n_neg)
    return total / len(classes)


def bootstrap_macro_aucs(labels: Any, probs: Any, n_resamples: int = 1000, seed: int = 0,
                         groups: Sequence[Any] | None = None) -> np.ndarray:
    """:func:`macro_auc` of each :func:`stratified_resamples` resample, shape ``(n_resamples,)``.

    Each one-vs-rest AUC is computed exactly as a Mann-Whitney count,
    ``(2 * #{pos > neg} + #{pos == neg}) / (2 * n_pos * n_neg)`` (one rounding), from tie-averaged
    ranks, all resamples at once. It equals sklearn's trapezoidal AUC up to floating-point rounding
    (~1e-16). All NaN when fewer than two classes are present. With ``groups``, the cluster resamples
    (whole groups drawn; see :func:`stratified_resamples`), scored from each row's multiplicity; a
    resample that lost every positive or negative of a scored class (possible only when a class is
    never a group's majority) is NaN.
    """
    labels, probs = check_scores(labels, probs)
    return _Resampler(labels, _positive_int(n_resamples), seed, groups).aucs(probs)


def _interval(values: np.ndarray, level: float) -> tuple[float, float]:
    if np.isnan(values).any():
        return (math.nan, math.nan)
    lo, hi = np.quantile(values, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return (float(lo), float(hi))


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level!r}")


def bootstrap_auc_ci(labels: Any, probs: Any, n_resamples: int = 1000, seed: int = 0,
                     level: float = 0.95, groups: Sequence[Any] | None = None) -> tuple[float, float]:
    """Stratified bootstrap percentile confidence interval of :func:`macro_auc`.

    The bounds are the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles (numpy's default linear
    interpolation) of :func:`bootstrap_macro_aucs`; the resamples come from
    ``np.random.default_rng(seed)`` (:func:`stratified_resamples`), so the interval is reproducible.
    ``(nan, nan)`` when fewer than two classes are present. With ``groups`` (a case key per image), the
    cluster bootstrap: whole groups (patients) are resampled.
    """
    _check_level(level)
    return _interval(bootstrap_macro_aucs(labels, probs, n_resamples=n_resamples, seed=seed, groups=groups),
                     level)


def paired_bootstrap(labels: Any, probs_a: Any, probs_b: Any | None = None, *, classes: Sequence[str],
                     n_resamples: int = 1000, seed: int = 0, level: float = 0.95,
                     groups: Sequence[Any] | None = None) -> dict[str, Any]:
    """Percentile CI of model a's macro AUC; with ``probs_b``, also of the difference a - b and a
    two-sided p-value (twice the smaller share of resampled differences on either side of 0).

    Both models are scored on the same :func:`stratified_resamples` (paired), so ``ci_low`` and
    ``ci_high`` are exactly :func:`bootstrap_auc_ci` of model a for the same ``n_resamples``, ``seed``
    and ``level``. ``classes`` names the probability columns. With ``groups`` (a case key per image) both
    models are scored on the same cluster resamples (whole patients drawn; :func:`stratified_resamples`).
    Returns ``ci_low``, ``ci_high``, ``n_resamples``, ``seed``, ``unit`` (``"images"`` or ``"groups"``:
    what was resampled) and ``n_units`` (how many of them); with ``probs_b`` also ``diff_ci_low``,
    ``diff_ci_high`` and ``p``.
    """
    _check_level(level)
    labels, probs_a = check_scores(labels, probs_a)
    if len(classes) != probs_a.shape[1]:
        raise ValueError(f"got {len(classes)} class names for {probs_a.shape[1]} probability columns")
    resampler = _Resampler(labels, _positive_int(n_resamples), seed, groups)
    aucs = resampler.aucs(probs_a)
    lo, hi = _interval(aucs, level)
    unit, n_units = resampling_unit(labels.size, groups)
    out: dict[str, Any] = {"ci_low": lo, "ci_high": hi, "n_resamples": int(n_resamples), "seed": seed,
                           "unit": unit, "n_units": n_units}
    if probs_b is not None:
        _, probs_b = check_scores(labels, probs_b)
        if probs_b.shape != probs_a.shape:
            raise ValueError(f"probs_b has shape {probs_b.shape}, probs_a {probs_a.shape}")
        d = aucs - resampler.aucs(probs_b)
        d_lo, d_hi = _interval(d, level)
        p = math.nan if np.isnan(d).any() else float(min(1.0, 2 * min((d <= 0).mean(), (d >= 0).mean())))
        out.update({"diff_ci_low": d_lo, "diff_ci_high": d_hi, "p": p})
    return out


def paired_bootstrap_over_draws(labels: Any, probs_a: Sequence[Any], probs_b: Sequence[Any], *,
                                n_resamples: int = 1000, seed: int = 0, level: float = 0.95,
                                groups: Sequence[Any] | None = None) -> dict[str, Any]:
    """The mean over draws of model a's macro AUC minus model b's, when draw ``k`` of a and draw ``k`` of b were
    trained on the same images and every draw is tested on the same images (``labels``): its percentile CI and
    a two-sided p-value, resampling both the draws and the test images.

    ``probs_a[k]`` and ``probs_b[k]`` are the ``(N, C)`` test probabilities of draw ``k`` (rows in the order of
    ``labels``). Each resample ``b`` takes row ``b`` of :func:`stratified_resamples` ``(labels, n_resamples,
    seed)`` for the test images (the same image resample for every draw and for both models, and for any
    other pair scored with the same labels, ``n_resamples`` and ``seed``) and ``D`` draw indices with
    replacement from ``np.random.default_rng([seed, 1])``; its value is the mean, over the drawn draws, of the
    paired difference of macro AUCs on the resampled images. With one draw only the images are resampled.
    The p-value is twice the smaller share of resampled values on either side of 0 (as
    :func:`paired_bootstrap`). With ``groups`` (a case key per test image) the test images are resampled as
    whole groups (the cluster resamples of :func:`stratified_resamples`), the same for every draw. Returns
    ``diff`` (the observed mean difference), ``diffs`` (per draw), ``diff_ci_low``, ``diff_ci_high``, ``p``,
    ``n_draws``, ``n_resamples``, ``seed``, ``unit`` and ``n_units`` (as :func:`paired_bootstrap`); NaN where
    an AUC is undefined (fewer than two classes in ``labels``).
    """
    _check_level(level)
    if len(probs_a) != len(probs_b) or not len(probs_a):
        raise ValueError(f"need the same positive number of draws for both models, got {len(probs_a)} "
                         f"and {len(probs_b)}")
    labels, _ = check_scores(labels, probs_a[0])
    a = [check_scores(labels, p)[1] for p in probs_a]
    b = [check_scores(labels, p)[1] for p in probs_b]
    if any(x.shape != a[0].shape for x in a + b):
        raise ValueError("every draw's probabilities need the same shape")
    n_resamples = _positive_int(n_resamples)
    images = _Resampler(labels, n_resamples, seed, groups)
    # (D, B): each draw's paired AUC difference on each image resample
    resampled = np.stack([images.aucs(pa) - images.aucs(pb) for pa, pb in zip(a, b)])
    diffs = np.array([macro_auc(labels, pa) - macro_auc(labels, pb) for pa, pb in zip(a, b)])
    n_draws = len(a)
    if n_draws > 1:
        picks = np.random.default_rng([seed, 1]).integers(0, n_draws, size=(n_resamples, n_draws))
        values = resampled[picks, np.arange(n_resamples)[:, None]].mean(axis=1)
    else:
        values = resampled[0]
    lo, hi = _interval(values, level)
    p = math.nan if np.isnan(values).any() else float(min(1.0, 2 * min((values <= 0).mean(),
                                                                        (values >= 0).mean())))
    unit, n_units = resampling_unit(labels.size, groups)
    return {"diff": float(diffs.mean()), "diffs": [float(d) for d in diffs], "diff_ci_low": lo,
            "diff_ci_high": hi, "p": p, "n_draws": n_draws, "n_resamples": n_resamples, "seed": seed,
            "unit": unit, "n_units": n_units}


# --------------------------------------------------------------------------------------------- DeLong


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
