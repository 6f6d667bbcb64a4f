"""ROC arithmetic (macro AUC, its stratified bootstrap CI, ROC curves) and ROC figures.

Conventions shared by every function here:

* ``labels`` is an ``(N,)`` array of true class indices, ``probs`` an ``(N, C)`` array whose column ``k``
  scores class ``k`` (as in :class:`mltl.results.Predictions`).
* One-vs-rest: class ``k`` is "positive" for the images labelled ``k``, "negative" for all others,
  scored by column ``k``.
* Classes absent from ``labels`` have no one-vs-rest AUC; they are left out of every macro average.
* A two-column problem is binary: its macro AUC is the AUC of column 1 (the one-vs-rest AUC of class 0
  on column 0 is the same number when rows sum to one).

Figures are drawn with matplotlib's object API on an Agg canvas (no pyplot, so importing this module
never changes the process's matplotlib backend and works headless), and written atomically.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import auc as _trapezoid_auc
from sklearn.metrics import roc_auc_score, roc_curve

from mltl.rundir import write_bytes_atomic

__all__ = [
    "macro_auc",
    "bootstrap_macro_aucs",
    "bootstrap_auc_ci",
    "roc_curves",
    "plot_roc",
    "scored_classes",
]


# --------------------------------------------------------------------------------------------- checks


def _as_arrays(labels: Any, probs: Any) -> tuple[np.ndarray, np.ndarray]:
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
    labels, probs = _as_arrays(labels, probs)
    present = np.unique(labels)
    if present.size < 2:
        return []
    if probs.shape[1] == 2:
        return [1]
    return [int(k) for k in present]


# ------------------------------------------------------------------------------------------ macro AUC


def macro_auc(labels: np.ndarray, probs: np.ndarray) -> float:
    """One-vs-rest macro ROC AUC, via :func:`sklearn.metrics.roc_auc_score`.

    Binary (2 columns): the AUC of column 1. Otherwise the unweighted mean of the one-vs-rest AUCs of
    the classes present in ``labels`` (absent classes are left out of the mean; with every class
    present this equals ``roc_auc_score(labels, probs, multi_class="ovr", average="macro")``).
    NaN when fewer than two classes are present.
    """
    labels, probs = _as_arrays(labels, probs)
    classes = scored_classes(labels, probs)
    if not classes:
        return math.nan
    per_class = [roc_auc_score(labels == k, probs[:, k]) for k in classes]
    return float(np.mean(per_class))


# ---------------------------------------------------------------------------------------- bootstrap


def _stratified_draws(labels: np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
    """Row indices of every resample, shape ``(n_resamples, N)``.

    The sampling scheme (the tests re-implement it, keep them in step):
    ``rng = np.random.default_rng(seed)``; for each class ``c`` present in ``labels``, ascending,
    ``members = np.flatnonzero(labels == c)`` and ``members[rng.integers(0, len(members),
    size=(n_resamples, len(members)))]``; the blocks are concatenated along axis 1 in that class order.
    So resample ``b`` is row ``b``, and every resample keeps each class's count.
    """
    rng = np.random.default_rng(seed)
    blocks = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        blocks.append(members[rng.integers(0, members.size, size=(n_resamples, members.size))])
    return np.concatenate(blocks, axis=1)


def bootstrap_macro_aucs(
    labels: np.ndarray, probs: np.ndarray, n_resamples: int = 1000, seed: int = 0
) -> np.ndarray:
    """:func:`macro_auc` of each stratified bootstrap resample, shape ``(n_resamples,)``.

    See :func:`bootstrap_auc_ci` for the resampling. Each one-vs-rest AUC is computed exactly as a
    Mann-Whitney count, ``(2 * #{pos > neg} + #{pos == neg}) / (2 * n_pos * n_neg)`` (one rounding),
    from tie-averaged ranks, all resamples at once. It equals sklearn's trapezoidal AUC up to
    floating-point rounding (~1e-16). All NaN when fewer than two classes are present.
    """
    labels, probs = _as_arrays(labels, probs)
    if isinstance(n_resamples, bool) or int(n_resamples) != n_resamples or n_resamples < 1:
        raise ValueError(f"n_resamples must be a positive integer, got {n_resamples!r}")
    n_resamples = int(n_resamples)
    classes = scored_classes(labels, probs)
    if not classes:
        return np.full(n_resamples, np.nan)

    draws = _stratified_draws(labels, n_resamples, seed)  # (B, N)
    # Stratified: the class of column j is the same in every resample, so one mask serves all rows.
    drawn_labels = labels[draws[0]]
    n = drawn_labels.size
    total = np.zeros(n_resamples)
    for k in classes:
        positive = drawn_labels == k
        n_pos = int(positive.sum())
        n_neg = n - n_pos
        ranks = rankdata(probs[draws, k], method="average", axis=1)  # 1-based, ties averaged
        # Twice the Mann-Whitney U of the positives: an exact integer (ranks are half-integers).
        twice_u = 2.0 * ranks[:, positive].sum(axis=1) - n_pos * (n_pos + 1)
        total += twice_u / (2.0 * n_pos * n_neg)
    return total / len(classes)


def bootstrap_auc_ci(
    labels: np.ndarray,
    probs: np.ndarray,
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Stratified bootstrap percentile confidence interval of :func:`macro_auc`.

    Each resample draws, within each class separately, as many indices with replacement as that class
    has, so every resample keeps the class counts (and so the set of present classes). The draws come
    from ``np.random.default_rng(seed)``, so the interval is reproducible. The bounds are the
    ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles (numpy's default linear interpolation) of the
    resampled macro AUCs. ``(nan, nan)`` when fewer than two classes are present.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    aucs = bootstrap_macro_aucs(labels, probs, n_resamples=n_resamples, seed=seed)
    if np.isnan(aucs).any():
        return (math.nan, math.nan)
    lo, hi = np.quantile(aucs, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return (float(lo), float(hi))


# --------------------------------------------------------------------------------------------- curves


def _one_sided_limits(grid: np.ndarray, fpr: np.ndarray, tpr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """TPR of one ROC curve (``fpr`` non-decreasing, from 0 to 1) at each ``grid`` FPR, as left and right
    limits: where the curve has a vertical step at that FPR the left limit is the bottom of the step
    and the right limit its top; elsewhere both are the straight line between the neighbouring points."""
    last = np.searchsorted(fpr, grid, side="right") - 1  # last point with fpr <= x
    first = np.searchsorted(fpr, grid, side="left")  # first point with fpr >= x
    on_left = fpr[np.minimum(first, fpr.size - 1)] == grid
    on_right = fpr[last] == grid
    # Between points last and last + 1 (only used where x is strictly inside that segment).
    j = np.clip(last, 0, fpr.size - 2)
    x0, x1, y0, y1 = fpr[j], fpr[j + 1], tpr[j], tpr[j + 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = y0 + (y1 - y0) * (grid - x0) / (x1 - x0)
    left = np.where(on_left, tpr[np.minimum(first, fpr.size - 1)], between)
    right = np.where(on_right, tpr[last], between)
    return left, right


def _curve(fpr: np.ndarray, tpr: np.ndarray) -> dict[str, Any]:
    return {
        "fpr": [float(x) for x in fpr],
        "tpr": [float(y) for y in tpr],
        "auc": float(_trapezoid_auc(fpr, tpr)),
    }


def roc_curves(labels: np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> dict[str, dict[str, Any]]:
    """ROC curves, each ``{"fpr": [...], "tpr": [...], "auc": float}``, keyed by name.

    * one key per class present in ``labels`` (``classes[k]``): the one-vs-rest curve of column ``k``
      (:func:`sklearn.metrics.roc_curve`; both classes in the binary case);
    * ``"macro"``: the per-class TPRs averaged on a common FPR grid, the union of the per-class FPRs.
      At each grid FPR both one-sided limits are averaged (two points at that FPR), so vertical steps
      are kept and the area under the macro curve equals the mean of the per-class AUCs (so
      :func:`macro_auc`) up to rounding;
    * ``"micro"``: one curve over all (image, class) pairs, every column of ``probs`` included.

    Every ``"auc"`` is :func:`sklearn.metrics.auc` of that curve. Raises ``ValueError`` when fewer than
    two classes are present (no curve is defined); check with :func:`scored_classes` first.
    """
    labels, probs = _as_arrays(labels, probs)
    classes = [str(c) for c in classes]
    if len(classes) != probs.shape[1]:
        raise ValueError(f"got {len(classes)} class names for {probs.shape[1]} probability columns")
    if len(set(classes) | {"macro", "micro"}) != len(classes) + 2:
        raise ValueError(f"class names must be unique and not 'macro' or 'micro': {classes}")
    present = [int(k) for k in np.unique(labels)]
    if len(present) < 2:
        raise ValueError(f"ROC curves need at least two classes in labels, got {len(present)}")

    out: dict[str, dict[str, Any]] = {}
    per_class: list[tuple[np.ndarray, np.ndarray]] = []
    for k in present:
        fpr, tpr, _ = roc_curve(labels == k, probs[:, k])
        per_class.append((fpr, tpr))
        out[classes[k]] = _curve(fpr, tpr)

    grid = np.unique(np.concatenate([fpr for fpr, _ in per_class]))
    limits = [_one_sided_limits(grid, f, t) for f, t in per_class]
    left = np.mean([lo for lo, _ in limits], axis=0)
    right = np.mean([hi for _, hi in limits], axis=0)
    m_fpr = np.repeat(grid, 2)
    m_tpr = np.column_stack([left, right]).ravel()
    # Averaging can leave tiny non-monotone wiggles only through rounding; clamp them away.
    m_tpr = np.clip(np.maximum.accumulate(m_tpr), 0.0, 1.0)
    keep = np.ones(m_fpr.size, dtype=bool)
    keep[1:] = (np.diff(m_fpr) != 0) | (np.diff(m_tpr) != 0)  # drop repeated points
    out["macro"] = _curve(m_fpr[keep], m_tpr[keep])

    onehot = labels[:, None] == np.arange(probs.shape[1])[None, :]
    fpr, tpr, _ = roc_curve(onehot.ravel(), probs.ravel())
    out["micro"] = _curve(fpr, tpr)
    return out


# -------------------------------------------------------------------------------------------- figures


def _legend_text(label: str, name: str, n_curves: int, auc_value: float) -> str:
    template = label
    if n_curves > 1 and "{name" not in template:
        template = f"{template} – {{name}}" if template else "{name}"
    if "{auc" not in template:
        template += ": AUC {auc:.2f}"
    try:
        return template.format(name=name, auc=auc_value)
    except (KeyError, IndexError, ValueError):  # stray braces in a caller's label: show it as written
        return f"{label} {name}: AUC {auc_value:.2f}".strip()


def plot_roc(curves: list[tuple[str, Mapping[str, Mapping[str, Any]]]], path: Path, title: str) -> None:
    """Draw ROC curves into one PNG at ``path`` (written atomically: temp file + ``os.replace``).

    ``curves`` is ``[(legend label, curves)]`` where ``curves`` is :func:`roc_curves` output or any
    subset of it (``{name: {"fpr", "tpr", "auc"}}``). So ``[("", roc_curves(...))]`` draws one model's
    curves, and ``[("stage 1", {"macro": c1["macro"]}), ("stage 2", {"macro": c2["macro"]})]`` compares
    several models' macro curves on one plot.

    Legend text: the label is a ``str.format`` template with fields ``{name}`` (the curve's key) and
    ``{auc}`` (its AUC). A label without ``{auc}`` gets ``": AUC 0.87"`` appended; a label without
    ``{name}`` whose dict holds several curves gets ``" – {name}"`` appended before that. So a caller
    adds a CI by writing it into the label, e.g. ``"macro: AUC {auc:.2f} [0.81, 0.92]"``.

    Styles: ``"macro"`` curves are thick (black when the figure has one macro curve), ``"micro"`` curves
    dotted, the rest thin and coloured.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    lines = [(label, name, c, len(group)) for label, group in curves for name, c in group.items()]
    n_macro = sum(1 for _, name, _, _ in lines if name == "macro")

    fig = Figure(figsize=(6.6, 6.6), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], linestyle="--", color="0.55", linewidth=1.0, label="chance: AUC 0.50")
    palette = [f"C{i}" for i in range(10)]
    colour_i = 0
    for label, name, c, n_in_group in lines:
        style: dict[str, Any] = {"linewidth": 1.5, "alpha": 0.9}
        if name == "macro":
            style = {"linewidth": 2.6}
            if n_macro == 1:
                style["color"] = "black"
        elif name == "micro":
            style = {"linewidth": 1.8, "linestyle": ":"}
        if "color" not in style:
            style["color"] = palette[colour_i % len(palette)]
            colour_i += 1
        auc_value = float(c["auc"])
        ax.plot(c["fpr"], c["tpr"], label=_legend_text(label, name, n_in_group, auc_value), **style)

    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_xticks(np.linspace(0, 1, 6))
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.grid(True, color="0.9", linewidth=0.8)
    ax.set_axisbelow(True)
    ax.set_xlabel("False positive rate (1 - specificity)")
    ax.set_ylabel("True positive rate (sensitivity)")
    ax.set_title(title, fontsize=11)
    ax.legend(loc="lower right", fontsize=8.5, framealpha=0.92)

    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=120)
    finally:
        fig.clear()  # a bare Figure is in no pyplot registry: dropping it frees it
    write_bytes_atomic(path, buf.getvalue())
