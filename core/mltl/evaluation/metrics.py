"""Classification metrics, computed with scikit-learn, and how selection compares them."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix, roc_auc_score

HIGHER_IS_BETTER = {"auc": True, "accuracy": True, "balanced_accuracy": True, "loss": False}
METRIC_KEYS = {"auc": "auc_macro", "accuracy": "accuracy", "balanced_accuracy": "balanced_accuracy",
               "loss": "loss"}


def classification_metrics(labels: np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """ROC AUC (one-vs-rest per class and their macro mean; binary: the positive class's AUC), accuracy,
    balanced accuracy, mean cross-entropy and the confusion matrix (rows: true, columns: predicted).

    A class absent from ``labels`` has no AUC and is left out of the macro mean; with fewer than two
    classes present the AUC is NaN.
    """
    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    k = len(classes)
    pred = probs.argmax(1)
    present = np.unique(labels)
    per_class: dict[str, float] = {}
    if len(present) >= 2:
        if k == 2:
            auc = float(roc_auc_score(labels, probs[:, 1]))
            per_class = {classes[1]: auc, classes[0]: auc}
        else:
            for c in present:
                per_class[classes[c]] = float(roc_auc_score(labels == c, probs[:, c]))
            auc = float(np.mean(list(per_class.values())))
    else:
        auc = math.nan
    eps = 1e-12
    loss = float(-np.mean(np.log(np.clip(probs[np.arange(len(labels)), labels], eps, 1.0)))) if len(labels) else math.nan
    return {
        "auc_macro": auc,
        "auc_per_class": per_class,
        "accuracy": float(accuracy_score(labels, pred)) if len(labels) else math.nan,
        "balanced_accuracy": float(balanced_accuracy_score(labels, pred)) if len(present) else math.nan,
        "loss": loss,
        "n": int(len(labels)),
        "confusion_matrix": confusion_matrix(labels, pred, labels=list(range(k))).tolist(),
    }


def metric_value(metrics: dict[str, Any], metric: str) -> float:
    return float(metrics[METRIC_KEYS[metric]])


def is_better(new: float, best: float | None, metric: str) -> bool:
    """Whether ``new`` improves on ``best`` (NaN never does; ties keep the earlier one)."""
    if math.isnan(new):
        return False
    if best is None or math.isnan(best):
        return True
    return new > best if HIGHER_IS_BETTER[metric] else new < best
