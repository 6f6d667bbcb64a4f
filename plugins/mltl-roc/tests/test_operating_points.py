"""Operating points: sensitivity, specificity and balanced accuracy at a threshold chosen on the validation
split (Youden's J or a target sensitivity), never on the test split. Synthetic predictions, nothing trained."""

import json

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, recall_score, roc_curve

import mltl
from mltl import StageFiles, UserError
from mltl.evaluation.metrics import classification_metrics
from mltl.evaluation.report import write_report
from mltl.running.rundir import predictions_csv
from mltl_roc.evaluation import operating_points, parse_operating_point
from mltl_roc.reporter import EvaluationReporter

BINARY = ("normal", "lesion")


def _pred(split, labels, p1, classes=BINARY):
    p1 = np.asarray(p1, dtype=np.float64)
    return mltl.Predictions(ids=tuple(f"{split}{i:03d}" for i in range(len(labels))), split=split,
                            labels=np.asarray(labels, dtype=np.int64), probs=np.c_[1.0 - p1, p1], classes=classes)


def _stage(tmp_path, val, test, name="target"):
    """A finished stage whose predictions.csv holds ``val`` and ``test`` rows."""
    stage_dir = tmp_path / "run" / name
    stage_dir.mkdir(parents=True)
    StageFiles(stage_dir).predictions.write_text(predictions_csv([val, test]))
    metrics = {**classification_metrics(test.labels, test.probs, test.classes), "classes": list(test.classes),
               "n_test": len(test), "n_images": {"train": 50, "val": len(val), "test": len(test)},
               "train_seconds": 1.0}
    return mltl.StageResult(name=name, stage_dir=stage_dir, classes=test.classes, test=test, metrics=metrics)


def _shifted(tmp_path):
    """Validation scores separate the classes at 0.3, test scores at 0.7: the thresholds differ."""
    rng = np.random.default_rng(0)
    val_labels = np.repeat([0, 1], 30)
    val_p = np.where(val_labels == 1, rng.uniform(0.32, 0.6, 60), rng.uniform(0.0, 0.28, 60))
    test_labels = np.repeat([0, 1], 40)
    test_p = np.where(test_labels == 1, rng.uniform(0.72, 1.0, 80), rng.uniform(0.1, 0.68, 80))
    return _pred("val", val_labels, val_p), _pred("test", test_labels, test_p)


def test_the_threshold_is_chosen_on_validation_and_the_test_metrics_are_sklearns(tmp_path):
    val, test = _shifted(tmp_path)
    result = _stage(tmp_path, val, test)
    EvaluationReporter(n_resamples=50).stage_finished(result)
    op = json.loads((result.stage_dir / "evaluation.json").read_text())["operating_points"]
    assert op["rule"] == "youden" and op["chosen_on"] == "val" and "validation" in op["how"]
    point = op["classes"]["lesion"]
    assert list(op["classes"]) == ["lesion"]  # binary: the second class only
    # the validation-optimal threshold (Youden's J), not the test-optimal one
    fpr, tpr, thr = roc_curve(val.labels, val.probs[:, 1], drop_intermediate=False)
    j = tpr - fpr
    assert point["threshold"] == pytest.approx(thr[int(np.argmax(j))])
    assert point["val"]["youden_j"] == pytest.approx(1.0)
    tf, tt, tthr = roc_curve(test.labels, test.probs[:, 1], drop_intermediate=False)
    assert tthr[int(np.argmax(tt - tf))] > 0.65 > point["threshold"]  # test would pick about 0.7; val about 0.3
    called = test.probs[:, 1] >= point["threshold"]
    assert point["test"]["sensitivity"] == pytest.approx(recall_score(test.labels, called))
    assert point["test"]["specificity"] == pytest.approx(recall_score(test.labels, called, pos_label=0))
    assert point["test"]["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(test.labels, called))
    assert point["test"]["sensitivity"] == 1.0 and point["test"]["specificity"] < 0.5  # the val threshold is low
    # changing the test predictions never moves the threshold
    flipped = _pred("test", test.labels, 1.0 - test.probs[:, 1])
    again = operating_points(val.labels, val.probs, flipped.labels, flipped.probs, BINARY)
    assert again["classes"]["lesion"]["threshold"] == point["threshold"]


def test_a_target_sensitivity_picks_the_most_specific_threshold_reaching_it():
    rng = np.random.default_rng(1)
    labels = np.repeat([0, 1], 50)
    p = np.clip(rng.normal(0.35 + 0.3 * labels, 0.15), 0, 1)
    op = operating_points(labels, np.c_[1 - p, p], labels, np.c_[1 - p, p], BINARY, "sensitivity:0.9")
    point = op["classes"]["lesion"]
    assert op["rule"] == "sensitivity:0.9" and point["val"]["sensitivity"] >= 0.9
    higher = np.sort(p[p > point["threshold"]])
    assert recall_score(labels, p >= higher[0]) < 0.9  # the next threshold up misses the target
    assert parse_operating_point("Youden") == ("youden", None)
    for bad in ("sensitivity:1.5", "sensitivity:x", "specificity:0.9", "max"):
        with pytest.raises(ValueError, match="operating_point"):
            parse_operating_point(bad)
    with pytest.raises(UserError, match="operating_point"):
        EvaluationReporter(operating_point="sensitivity:0")


def test_a_model_that_ranks_well_but_predicts_one_class_gets_a_sensible_operating_point(tmp_path):
    """Every probability of the positive class below 0.5: arg-max accuracy 0.5, AUC high; the threshold
    chosen on validation recovers sensitivity and specificity, and the report says so."""
    rng = np.random.default_rng(2)
    def one_class(split, n):
        labels = np.repeat([0, 1], n)
        return _pred(split, labels, np.where(labels == 1, rng.uniform(0.2, 0.45, 2 * n), rng.uniform(0.05, 0.3, 2 * n)))
    val, test = one_class("val", 20), one_class("test", 30)
    result = _stage(tmp_path, val, test)
    assert result.metrics["accuracy"] == 0.5 and result.metrics["auc_macro"] > 0.8
    EvaluationReporter(n_resamples=50).stage_finished(result)
    evaluation = json.loads((result.stage_dir / "evaluation.json").read_text())
    assert evaluation["image"]["per_class"]["lesion"]["sensitivity"] == 0.0  # arg-max: never "lesion"
    point = evaluation["operating_points"]["classes"]["lesion"]
    assert 0.2 < point["threshold"] < 0.45
    called = test.probs[:, 1] >= point["threshold"]
    assert point["test"]["sensitivity"] == pytest.approx(recall_score(test.labels, called)) and \
        point["test"]["sensitivity"] > 0.6
    assert point["test"]["specificity"] == pytest.approx(recall_score(test.labels, called, pos_label=0)) and \
        point["test"]["specificity"] > 0.6
    write_report(tmp_path / "run", {"run": {"name": "one-class"}}, [result], {})
    report = (tmp_path / "run" / "report.md").read_text()
    assert "### Operating points (threshold chosen on validation)" in report
    row = (f"| lesion | {point['threshold']:.4g} | ")
    assert row in report and "Youden's J" in report and "| 0.000 / 1.000 |" in report  # beside the arg-max


def test_one_vs_rest_for_each_class_of_a_multi_class_target(tmp_path):
    classes = ("normal", "cyst", "calculi")
    rng = np.random.default_rng(3)

    def three(split, n):
        labels = np.repeat(np.arange(3), n)
        logits = rng.normal(size=(3 * n, 3))
        logits[np.arange(3 * n), labels] += 2.0
        probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        return mltl.Predictions(ids=tuple(f"{split}{i}" for i in range(3 * n)), split=split, labels=labels,
                                probs=probs, classes=classes)

    val, test = three("val", 15), three("test", 20)
    result = _stage(tmp_path, val, test)
    op = EvaluationReporter(n_resamples=50, operating_point="sensitivity:0.8").evaluate(result)["operating_points"]
    assert list(op["classes"]) == list(classes) and op["scheme"] == "one-vs-rest per class"
    for k, name in enumerate(classes):
        point = op["classes"][name]
        assert point["val"]["sensitivity"] >= 0.8
        called = test.probs[:, k] >= point["threshold"]
        assert point["test"]["sensitivity"] == pytest.approx(recall_score(test.labels == k, called))
        assert point["test"]["specificity"] == pytest.approx(recall_score(test.labels == k, called, pos_label=False))


def test_without_validation_rows_there_is_no_threshold(tmp_path):
    _, test = _shifted(tmp_path)
    result = _stage(tmp_path, _pred("val", [], []), test)
    op = EvaluationReporter(n_resamples=50).evaluate(result)["operating_points"]
    assert "skipped" in op and "validation" in op["skipped"]
    one_class_val = _pred("val", [1, 1, 1], [0.2, 0.5, 0.7])
    op = operating_points(one_class_val.labels, one_class_val.probs, test.labels, test.probs, BINARY)
    assert "no negative" in op["classes"]["lesion"]["skipped"]
