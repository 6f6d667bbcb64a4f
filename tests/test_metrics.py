"""mltl.evaluation.metrics against scikit-learn: the numpy ROC AUC (Mann-Whitney with mid-ranks), accuracy,
balanced accuracy and confusion matrix give scikit-learn's values on random, tied and degenerate scores."""

import math

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix, roc_auc_score

from mltl.evaluation.metrics import binary_auc, classification_metrics


def _probs(rng, n, k, decimals=None):
    p = rng.dirichlet(np.ones(k), size=n)
    return np.round(p, decimals) if decimals is not None else p  # rounded: many tied scores


@pytest.mark.parametrize("k", [2, 3, 5])
@pytest.mark.parametrize("decimals", [None, 1])
def test_every_metric_equals_scikit_learns(k, decimals):
    rng = np.random.default_rng(k * 10 + (decimals or 0))
    classes = tuple(f"c{i}" for i in range(k))
    for n in (7, 40, 301):
        y = rng.integers(0, k, n)
        y[:k] = np.arange(k)  # every class present
        p = _probs(rng, n, k, decimals)
        m = classification_metrics(y, p, classes)
        if k == 2:
            want = roc_auc_score(y, p[:, 1])
        elif decimals is None:
            want = roc_auc_score(y, p, multi_class="ovr", average="macro")
        else:  # rounded rows no longer sum to 1, which multi_class="ovr" refuses: its definition, class by class
            want = np.mean([roc_auc_score(y == c, p[:, c]) for c in range(k)])
        assert m["auc_macro"] == pytest.approx(want, abs=1e-12)
        for c in range(k):
            assert m["auc_per_class"][classes[c]] == pytest.approx(
                roc_auc_score(y == c, p[:, c]) if k > 2 else want, abs=1e-12)
        pred = p.argmax(1)
        assert m["accuracy"] == pytest.approx(accuracy_score(y, pred), abs=1e-15)
        assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred), abs=1e-15)
        assert m["confusion_matrix"] == confusion_matrix(y, pred, labels=list(range(k))).tolist()


def test_a_class_missing_from_the_labels_is_left_out_as_scikit_learn_would():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 50)  # classes 0 and 1 of three
    p = _probs(rng, 50, 3)
    m = classification_metrics(y, p, ("a", "b", "c"))
    assert set(m["auc_per_class"]) == {"a", "b"}
    assert m["auc_macro"] == pytest.approx(np.mean([roc_auc_score(y == c, p[:, c]) for c in (0, 1)]), abs=1e-12)
    pred = p.argmax(1)
    with pytest.warns(UserWarning):  # scikit-learn warns about the predicted class absent from y_true
        want = balanced_accuracy_score(y, pred)
    assert m["balanced_accuracy"] == pytest.approx(want, abs=1e-15)
    assert m["confusion_matrix"] == confusion_matrix(y, pred, labels=[0, 1, 2]).tolist()


def test_degenerate_inputs():
    assert math.isnan(classification_metrics(np.zeros(4, int), _probs(np.random.default_rng(0), 4, 2), ("a", "b"))["auc_macro"])
    empty = classification_metrics(np.zeros(0, int), np.zeros((0, 3)), ("a", "b", "c"))
    assert math.isnan(empty["auc_macro"]) and math.isnan(empty["accuracy"]) and empty["n"] == 0
    assert empty["confusion_matrix"] == [[0] * 3] * 3
    assert binary_auc(np.array([True, False]), np.array([0.5, 0.5])) == 0.5  # a tie counts half
    assert binary_auc(np.array([True, True, False]), np.array([0.9, 0.1, 0.5])) == 0.5
    assert binary_auc(np.array([False, True]), np.array([0.2, 0.3])) == 1.0
