"""ROC curves and ROC figures.

Conventions (those of :mod:`mltl.evaluation.stats`, where the macro AUC and its bootstrap CI live):

* ``labels`` is an ``(N,)`` array of true class indices, ``probs`` an ``(N, C)`` array whose column ``k``
  scores class ``k`` (as in :class:`mltl.Predictions`).
* One-vs-rest: class ``k`` is "positive" for the images labelled ``k``, "negative" for all others,
  scored by column ``k``.
* Classes absent from ``labels`` have no one-vs-rest curve; they are left out of the macro curve.

Figures are drawn with matplotlib's object API on an Agg canvas (no pyplot, so importing this module
never changes the process's matplotlib backend and works headless), and written atomically.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import auc as _trapezoid_auc
from sklearn.metrics import roc_curve

from mltl import check_scores, write_bytes_atomic

__all__ = ["roc_curves", "plot_roc", "macro_legend"]


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
      :func:`mltl.macro_auc`) up to rounding;
    * ``"micro"``: one curve over all (image, class) pairs, every column of ``probs`` included.

    Every ``"auc"`` is :func:`sklearn.metrics.auc` of that curve. Raises ``ValueError`` when fewer than
    two classes are present (no curve is defined); check with :func:`mltl.scored_classes` first.
    """
    labels, probs = check_scores(labels, probs)
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


def macro_legend(ci: Sequence[float], note: str = "") -> str:
    """The :func:`plot_roc` legend template of a macro curve with its CI and what the bootstrap resampled:
    ``"macro average: AUC {auc:.2f} (95% CI 0.81–0.92, bootstrap over 187 patients)"`` for ``note``
    ``"95% CI, bootstrap over 187 patients"`` (:func:`mltl_roc.evaluation.bootstrap_note`); without a note,
    ``"(95% CI 0.81–0.92)"``. A NaN bound (no CI defined) leaves the CI out."""
    lo, hi = (float(x) for x in ci)
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return "macro average: AUC {auc:.2f}"
    head, _, rest = str(note).partition(",")
    if not rest:  # no "<level> CI," head: the note, if any, follows the bounds
        head, rest = "95% CI", (" " + str(note).strip() if str(note).strip() else "")
    text = f"({head} {lo:.2f}–{hi:.2f}{',' + rest if rest else ''})"
    return "macro average: AUC {auc:.2f} " + text.replace("{", "{{").replace("}", "}}")


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
