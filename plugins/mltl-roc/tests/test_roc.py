"""Tests of the mltl-roc plugin: ROC curves, figures, and the reporter (the macro AUC and its bootstrap
are the core's, tested in tests/test_stats.py)."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from mltl import bootstrap_auc_ci, macro_auc
from mltl.evaluation.results import Predictions, StageResult
from mltl_roc.reporter import RocReporter
from mltl_roc.roc import plot_roc, roc_curves
from tests.conftest import fake_predictions

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"



# ------------------------------------------------------------------------------------------- curves


def test_roc_curves_per_class_macro_micro():
    labels, probs = fake_predictions(200, 3, separation=1.0, seed=15, decimals=2)
    classes = ["nevus", "melanoma", "bcc"]
    curves = roc_curves(labels, probs, classes)
    assert set(curves) == {"nevus", "melanoma", "bcc", "macro", "micro"}
    for k, name in enumerate(classes):
        assert curves[name]["auc"] == pytest.approx(roc_auc_score(labels == k, probs[:, k]), abs=1e-12)

    macro = curves["macro"]
    fpr, tpr = np.array(macro["fpr"]), np.array(macro["tpr"])
    assert fpr.shape == tpr.shape and fpr.size >= 2
    assert (np.diff(fpr) >= 0).all() and (np.diff(tpr) >= 0).all()
    assert (fpr[0], tpr[0]) == (0.0, 0.0)
    assert (fpr[-1], tpr[-1]) == (1.0, 1.0)
    # Both one-sided limits are averaged, so the area of the macro curve is the macro AUC.
    assert macro["auc"] == pytest.approx(macro_auc(labels, probs), abs=1e-12)

    onehot = labels[:, None] == np.arange(3)[None, :]
    assert curves["micro"]["auc"] == pytest.approx(roc_auc_score(onehot.ravel(), probs.ravel()), abs=1e-12)
    json.dumps(curves)  # plain floats and lists


def test_roc_curves_skip_absent_class_and_need_two_classes():
    labels, probs = fake_predictions(90, 3, seed=16)
    labels[labels == 1] = 0
    curves = roc_curves(labels, probs, ["a", "b", "c"])
    assert set(curves) == {"a", "c", "macro", "micro"}
    assert curves["macro"]["auc"] == pytest.approx(macro_auc(labels, probs), abs=1e-12)
    with pytest.raises(ValueError):
        roc_curves(np.zeros(90, dtype=np.int64), probs, ["a", "b", "c"])


def test_plot_roc_writes_png_atomically(tmp_path):
    labels, probs = fake_predictions(100, 3, seed=17)
    curves = roc_curves(labels, probs, ["a", "b", "c"])
    out = tmp_path / "figs" / "roc.png"
    plot_roc([("", curves), ("odd {label}", {"macro": curves["macro"]})], out, "title")
    assert out.read_bytes()[:8] == PNG_SIGNATURE
    assert [p.name for p in out.parent.iterdir()] == ["roc.png"]  # no temporary file left behind


# ----------------------------------------------------------------------------------------- reporter


def make_result(tmp_path, name, labels, probs, classes=("nevus", "melanoma", "bcc")):
    stage_dir = tmp_path / name
    stage_dir.mkdir(parents=True, exist_ok=True)
    test = Predictions(
        ids=tuple(f"img{i:04d}" for i in range(len(labels))),
        split="test",
        labels=np.asarray(labels, dtype=np.int64),
        probs=np.asarray(probs, dtype=np.float64),
        classes=tuple(classes),
    )
    return StageResult(name=name, stage_dir=stage_dir, classes=tuple(classes), test=test, metrics={})


def assert_png(path: Path):
    from PIL import Image

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size[0] > 100 and im.size[1] > 100


def test_reporter_stage_and_run(tmp_path):
    reporter = RocReporter(n_resamples=200, seed=3)
    results = []
    for i, (name, sep) in enumerate([("source", 0.8), ("intermediate", 1.5), ("target", 2.5)]):
        labels, probs = fake_predictions(90 + 30 * i, 3, separation=sep, seed=20 + i)
        result = make_result(tmp_path, name, labels, probs)
        reporter.stage_finished(result)
        results.append(result)

        assert_png(result.stage_dir / "roc.png")
        data = json.loads((result.stage_dir / "roc.json").read_text())
        assert {"curves", "auc_macro", "auc_macro_ci95", "n_resamples", "seed"} <= set(data)
        assert set(data["curves"]) == {"nevus", "melanoma", "bcc", "macro", "micro"}
        assert data["auc_macro"] == pytest.approx(macro_auc(labels, probs), abs=1e-12)
        lo, hi = data["auc_macro_ci95"]
        assert [lo, hi] == list(bootstrap_auc_ci(labels, probs, n_resamples=200, seed=3))
        assert lo <= data["auc_macro"] <= hi
        assert (data["n_resamples"], data["seed"]) == (200, 3)
        assert sorted(p.name for p in result.stage_dir.iterdir()) == ["roc.json", "roc.png"]

    run_dir = tmp_path / "run"
    reporter.run_finished(results, run_dir)
    assert_png(run_dir / "roc_stages.png")

    # A fresh reporter (nothing cached, e.g. results rebuilt from disk) draws the same run figure.
    RocReporter(n_resamples=200, seed=3).run_finished(results, tmp_path / "run2")
    assert_png(tmp_path / "run2" / "roc_stages.png")


def test_reporter_binary_stage(tmp_path):
    labels, probs = fake_predictions(80, 2, seed=30)
    result = make_result(tmp_path, "binary", labels, probs, classes=("benign", "malignant"))
    RocReporter(n_resamples=100).stage_finished(result)
    data = json.loads((result.stage_dir / "roc.json").read_text())
    assert data["auc_macro"] == pytest.approx(roc_auc_score(labels, probs[:, 1]), abs=1e-12)


def test_reporter_skips_one_class_split(tmp_path, caplog):
    _, probs = fake_predictions(25, 3, seed=31)
    result = make_result(tmp_path, "degenerate", np.full(25, 2), probs)
    reporter = RocReporter(n_resamples=50)
    with caplog.at_level(logging.WARNING, logger="mltl.roc"):
        reporter.stage_finished(result)
        reporter.run_finished([result], tmp_path / "run")
    assert list(result.stage_dir.iterdir()) == []
    assert not (tmp_path / "run" / "roc_stages.png").exists()
    assert any(r.name == "mltl.roc" and r.levelno == logging.WARNING for r in caplog.records)


def test_reporter_rejects_bad_options():
    with pytest.raises(ValueError):
        RocReporter(n_resamples=0)
    with pytest.raises(ValueError):
        RocReporter(seed=-1)
