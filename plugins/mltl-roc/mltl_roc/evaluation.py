"""A stage's test predictions evaluated: image-level metrics, case-level AUC, calibration.

Everything here is computed from ``(labels, probs)`` (and case keys), the columns of a stage's
``predictions.csv``, with scikit-learn doing the metric arithmetic, so anyone can recompute every number
from that file. Conventions follow :mod:`mltl.evaluation.stats`: one-vs-rest per class, classes absent from the
test split left out of macro averages, and a two-class problem's AUC is that of column 1.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from sklearn.metrics import (accuracy_score, balanced_accuracy_score, brier_score_loss, confusion_matrix,
                             multilabel_confusion_matrix, roc_auc_score, roc_curve)

from mltl import bootstrap_auc_ci, check_scores, macro_auc

__all__ = ["image_metrics", "macro_auc_ci", "bootstrap_note", "case_level", "calibration", "operating_points",
           "parse_operating_point", "CASE_AGGREGATES", "N_BINS"]

CASE_AGGREGATES = ("mean", "max")
N_BINS = 10


def _ratio(num: int, den: int) -> float:
    return float(num) / den if den else math.nan


def image_metrics(labels: Any, probs: Any, classes: Sequence[str]) -> dict[str, Any]:
    """Per-image test metrics: ROC AUC (macro, micro, per class), accuracy, balanced accuracy,
    sensitivity / specificity / positive predictive value per class, and the confusion matrix.

    * ``auc_macro``: :func:`mltl.macro_auc` (as ``metrics.json``).
    * ``auc_micro``: ``roc_auc_score(onehot, probs, average="micro")``, every (image, class) pair pooled;
      for two classes the same as the binary AUC when rows sum to one.
    * ``auc_per_class``: one-vs-rest ``roc_auc_score(labels == k, probs[:, k])`` for each present class.
    * Sensitivity (recall) ``TP / (TP + FN)`` and specificity ``TN / (TN + FP)`` of "predicted class k" (the
      arg-max) against "true class k", from :func:`sklearn.metrics.multilabel_confusion_matrix`.
      NaN when undefined (no positives, or no negatives).
    AUCs are NaN when fewer than two classes are present.
    """
    labels, probs = check_scores(labels, probs)
    classes = [str(c) for c in classes]
    k = probs.shape[1]
    if len(classes) != k:
        raise ValueError(f"got {len(classes)} class names for {k} probability columns")
    pred = probs.argmax(axis=1)
    present = [int(c) for c in np.unique(labels)]
    n = int(labels.size)
    out: dict[str, Any] = {"n": n, "classes": classes, "classes_present": [classes[c] for c in present]}
    if len(present) >= 2:
        onehot = (labels[:, None] == np.arange(k)[None, :]).astype(int)
        out["auc_macro"] = macro_auc(labels, probs)
        out["auc_micro"] = float(roc_auc_score(onehot, probs, average="micro"))
        out["auc_per_class"] = {classes[c]: float(roc_auc_score(labels == c, probs[:, c])) for c in present}
    else:
        out["auc_macro"] = out["auc_micro"] = math.nan
        out["auc_per_class"] = {}
    out["accuracy"] = float(accuracy_score(labels, pred)) if n else math.nan
    out["balanced_accuracy"] = float(balanced_accuracy_score(labels, pred)) if n else math.nan
    per_class = {}
    if n:
        for c, ((tn, fp), (fn, tp)) in enumerate(multilabel_confusion_matrix(labels, pred, labels=list(range(k)))):
            per_class[classes[c]] = {
                "support": int(tp + fn),
                "sensitivity": _ratio(tp, tp + fn),
                "specificity": _ratio(tn, tn + fp),
                "ppv": _ratio(tp, tp + fp),
                "tp": int(tp), "fp": int(fp), "fn": int(fn), "tn": int(tn),
            }
    out["per_class"] = per_class
    out["confusion_matrix"] = confusion_matrix(labels, pred, labels=list(range(k))).tolist() if n else []
    return out


def bootstrap_note(n_units: int, *, grouped: bool, level: float = 0.95, word: str = "patients") -> str:
    """What a bootstrap CI resampled, for report text: ``"95% CI, bootstrap over 187 patients"`` (whole
    groups resampled, ``grouped``) or ``"95% CI, bootstrap over 203 images"``."""
    return f"{level:.0%} CI, bootstrap over {n_units} {word if grouped else 'images'}"


def macro_auc_ci(labels: Any, probs: Any, *, groups: Sequence[str] | None = None, n_resamples: int = 1000,
                 seed: int = 0, level: float = 0.95, word: str = "patients") -> dict[str, Any]:
    """The bootstrap percentile CI of the macro AUC (:func:`mltl.bootstrap_auc_ci`), and what it resampled.

    With ``groups`` (a case key per image, e.g. :attr:`mltl.Predictions.groups`) the cluster bootstrap:
    whole cases (patients) are drawn with replacement, stratified by their majority class, so images of one
    patient never count as independent evidence; without, the class-stratified image bootstrap. Returns
    ``auc_macro_ci95`` ``[lo, hi]`` (NaN with fewer than two classes present), ``ci_unit`` (``word`` or
    ``"images"``), ``ci_n_units`` and ``ci_note`` (:func:`bootstrap_note`).
    """
    labels, probs = check_scores(labels, probs)
    grouped = groups is not None
    n_units = len({str(g) for g in groups}) if grouped else int(labels.size)
    if np.unique(labels).size >= 2:
        lo, hi = bootstrap_auc_ci(labels, probs, n_resamples=n_resamples, seed=seed, level=level,
                                  groups=list(groups) if grouped else None)
    else:
        lo = hi = math.nan
    return {"auc_macro_ci95": [lo, hi], "ci_unit": word if grouped else "images", "ci_n_units": n_units,
            "ci_note": bootstrap_note(n_units, grouped=grouped, level=level, word=word)}


def case_level(groups: Sequence[str], labels: Any, probs: Any, classes: Sequence[str], *,
               aggregate: Literal["mean", "max"] = "mean", n_resamples: int = 1000,
               seed: int = 0) -> dict[str, Any]:
    """Images of one case (patient / study) aggregated into one case score, and the case-level metrics.

    A case's probability for class ``k`` is the ``aggregate`` ("mean" or "max") of its images' column ``k``
    (with "max" the rows no longer sum to one; AUC and the arg-max are still defined). A case's label is
    its images' label; a case whose images carry different labels gets the most frequent one (ties: the
    lower class index) and is counted in ``n_mixed_label_cases``. Cases are listed in order of first
    appearance. The case AUC's 95% CI is the stratified bootstrap over cases
    (:func:`mltl.bootstrap_auc_ci`, the bootstrap ``mltl compare`` uses); one row per case, so it resamples
    cases, as the cluster bootstrap of the image AUC does (:func:`macro_auc_ci` with ``groups``);
    ``ci_note`` says so.
    """
    if aggregate not in CASE_AGGREGATES:
        raise ValueError(f"aggregate must be one of {CASE_AGGREGATES}, got {aggregate!r}")
    labels, probs = check_scores(labels, probs)
    groups = [str(g) for g in groups]
    if len(groups) != labels.size:
        raise ValueError(f"got {len(groups)} case keys for {labels.size} images")
    if any(not g for g in groups):
        raise ValueError("every image needs a case key (empty group found)")
    order: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        order.setdefault(g, []).append(i)
    reduce = np.mean if aggregate == "mean" else np.max
    case_labels, case_probs, mixed = [], [], 0
    for idx in order.values():
        counts = np.bincount(labels[idx], minlength=probs.shape[1])
        mixed += int((counts > 0).sum() > 1)
        case_labels.append(int(counts.argmax()))
        case_probs.append(reduce(probs[idx], axis=0))
    case_labels_a = np.asarray(case_labels, dtype=np.int64)
    case_probs_a = np.asarray(case_probs, dtype=np.float64).reshape(len(order), probs.shape[1])
    out = image_metrics(case_labels_a, case_probs_a, classes)
    out.pop("n")
    lo, hi = (bootstrap_auc_ci(case_labels_a, case_probs_a, n_resamples=n_resamples, seed=seed)
              if len(set(case_labels)) >= 2 else (math.nan, math.nan))
    sizes = [len(v) for v in order.values()]
    out.update({
        "aggregate": aggregate,
        "n_cases": len(order),
        "n_images": int(labels.size),
        "images_per_case": {"min": min(sizes), "median": float(np.median(sizes)), "max": max(sizes)},
        "n_mixed_label_cases": mixed,
        "case_label_rule": "the label of the case's images; the most frequent one when they differ",
        "auc_macro_ci95": [lo, hi],
        "ci_note": bootstrap_note(len(order), grouped=True),
        "cases": {"keys": list(order), "labels": case_labels, "probs": case_probs_a.tolist()},
    })
    return out


def _bin_index(values: np.ndarray, n_bins: int) -> np.ndarray:
    """Equal-width bins on [0, 1]: ``[0, 1/n), [1/n, 2/n), ..., [(n-1)/n, 1]`` (the last one closed),
    as :func:`sklearn.calibration.calibration_curve` with ``strategy="uniform"`` bins them."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return np.clip(np.searchsorted(edges[1:-1], values, side="right"), 0, n_bins - 1)


def calibration(labels: Any, probs: Any, classes: Sequence[str], *, n_bins: int = N_BINS) -> dict[str, Any]:
    """Calibration of the predicted probabilities: Brier score, expected calibration error, and the
    reliability-diagram bins.

    * Two classes: the probability of the positive class (column 1) against the observed frequency of
      that class ("binary" ECE).
    * More classes: the top-label confidence (the largest probability) against the accuracy of the
      arg-max prediction (Guo et al. 2017, "top-label" ECE).

    ECE = ``sum_b (n_b / N) * |mean observed_b - mean predicted_b|`` over the ``n_bins`` equal-width bins
    of :func:`_bin_index` (empty bins contribute nothing). Brier score:
    :func:`sklearn.metrics.brier_score_loss` (binary: mean squared error of the column-1 probability;
    multi-class: mean over images of the squared distance between the probability row and the one-hot
    label, summed over classes, which is the binary one doubled when applied to two columns).
    """
    labels, probs = check_scores(labels, probs)
    k = probs.shape[1]
    n = int(labels.size)
    if n == 0:
        raise ValueError("calibration needs at least one image")
    if k == 2:
        kind = "binary: probability of " + str(classes[1])
        predicted = probs[:, 1]
        observed = (labels == 1).astype(np.float64)
        brier = float(brier_score_loss(labels == 1, probs[:, 1]))
    else:
        kind = "top-label: confidence of the predicted class vs its accuracy"
        predicted = probs.max(axis=1)
        observed = (probs.argmax(axis=1) == labels).astype(np.float64)
        with warnings.catch_warnings():
            # float32 softmax rows sum to one only within ~1e-7; sklearn warns, the score is computed as given
            warnings.filterwarnings("ignore", message=".*do not sum to one.*")
            brier = float(brier_score_loss(labels, probs, labels=list(range(k))))
    idx = _bin_index(predicted, n_bins)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins, ece = [], 0.0
    for b in range(n_bins):
        members = idx == b
        count = int(members.sum())
        row: dict[str, Any] = {"lower": float(edges[b]), "upper": float(edges[b + 1]), "count": count,
                               "mean_predicted": math.nan, "observed": math.nan}
        if count:
            row["mean_predicted"] = float(predicted[members].mean())
            row["observed"] = float(observed[members].mean())
            ece += count / n * abs(row["observed"] - row["mean_predicted"])
        bins.append(row)
    return {
        "kind": kind,
        "n": n,
        "n_bins": n_bins,
        "binning": f"{n_bins} equal-width bins on [0, 1], each [lower, upper) except the last, "
                   f"[{edges[-2]:g}, 1], which is closed",
        "ece": float(ece),
        "brier": brier,
        "brier_definition": "sklearn.metrics.brier_score_loss" + (" of the column-1 probability" if k == 2 else
                                                                    " (multi-class: summed over classes)"),
        "bins": bins,
    }


def parse_operating_point(rule: str) -> tuple[str, float | None]:
    """``"youden"`` -> ``("youden", None)``; ``"sensitivity:0.9"`` -> ``("sensitivity", 0.9)``. Raises
    ``ValueError`` for anything else (a target sensitivity must lie in (0, 1])."""
    text = str(rule).strip().lower()
    if text == "youden":
        return "youden", None
    if text.startswith("sensitivity:"):
        try:
            target = float(text.split(":", 1)[1])
        except ValueError:
            target = math.nan
        if 0.0 < target <= 1.0:
            return "sensitivity", target
    raise ValueError(f'operating_point must be "youden" or "sensitivity:X" with X in (0, 1], e.g. '
                     f'"sensitivity:0.9"; got {rule!r}')


def _at(positive: np.ndarray, score: np.ndarray, threshold: float) -> dict[str, Any]:
    """Sensitivity, specificity and balanced accuracy of "positive when score >= threshold"."""
    called = score >= threshold
    tp, fn = int((called & positive).sum()), int((~called & positive).sum())
    tn, fp = int((~called & ~positive).sum()), int((called & ~positive).sum())
    sens, spec = _ratio(tp, tp + fn), _ratio(tn, tn + fp)
    return {"sensitivity": sens, "specificity": spec, "balanced_accuracy": (sens + spec) / 2.0,
            "tp": tp, "fn": fn, "tn": tn, "fp": fp}


def operating_points(val_labels: Any, val_probs: Any, test_labels: Any, test_probs: Any, classes: Sequence[str],
                     rule: str = "youden") -> dict[str, Any]:
    """Sensitivity, specificity and balanced accuracy on the test split at a threshold chosen on the
    **validation** split; the test split never chooses it.

    Binary (two columns): one operating point, for the second class scored by column 1. More classes: one
    per class, one-vs-rest on its column. An image is called positive when its score is ``>= threshold``.
    The candidate thresholds are the validation scores (:func:`sklearn.metrics.roc_curve` on the validation
    split, ``drop_intermediate=False``); ``rule`` (:func:`parse_operating_point`):

    * ``"youden"``: the threshold maximising Youden's J = sensitivity + specificity - 1 on validation (the
      highest such threshold on ties);
    * ``"sensitivity:X"``: the highest threshold whose validation sensitivity is at least X (so the most
      specific one that reaches it).

    A class with no positive or no negative validation image gets no threshold (``skipped`` says why).
    """
    kind, target = parse_operating_point(rule)
    val_labels, val_probs = check_scores(val_labels, val_probs)
    test_labels, test_probs = check_scores(test_labels, test_probs)
    k = val_probs.shape[1]
    if test_probs.shape[1] != k or len(classes) != k:
        raise ValueError(f"got {len(classes)} class names, {k} validation and {test_probs.shape[1]} test columns")
    how = ("Youden's J (sensitivity + specificity - 1) maximised on the validation split" if kind == "youden"
           else f"the highest threshold reaching sensitivity >= {target:g} on the validation split")
    out: dict[str, Any] = {
        "rule": "youden" if kind == "youden" else f"sensitivity:{target:g}", "chosen_on": "val",
        "how": how + "; positive when the class's probability is >= the threshold",
        "n_val": int(val_labels.size), "n_test": int(test_labels.size),
        "scheme": "binary: the second class" if k == 2 else "one-vs-rest per class", "classes": {},
    }
    for c in ([1] if k == 2 else range(k)):
        name = str(classes[c])
        pos = val_labels == c
        if pos.all() or not pos.any():
            out["classes"][name] = {"skipped": "the validation split has no " +
                                    ("negative" if pos.all() else "positive") + " image for this class"}
            continue
        fpr, tpr, thresholds = roc_curve(pos, val_probs[:, c], drop_intermediate=False)
        finite = np.isfinite(thresholds)  # sklearn's first threshold (inf / max + 1) calls nothing positive
        finite &= thresholds <= val_probs[:, c].max()
        fpr, tpr, thresholds = fpr[finite], tpr[finite], thresholds[finite]
        if kind == "youden":
            i = int(np.argmax(tpr - fpr))
        else:
            i = int(np.flatnonzero(tpr >= target - 1e-12)[0])
        threshold = float(thresholds[i])
        out["classes"][name] = {
            "threshold": threshold,
            "val": _at(pos, val_probs[:, c], threshold),
            "test": _at(test_labels == c, test_probs[:, c], threshold),
        }
        out["classes"][name]["val"]["youden_j"] = float(tpr[i] - fpr[i])
    return out
