"""Tests of the mltl-roc plugin: ROC arithmetic, bootstrap CI, figures, and the reporter."""

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from mltl.results import Predictions, StageResult
from mltl_roc.reporter import RocReporter
from mltl_roc.roc import bootstrap_auc_ci, bootstrap_macro_aucs, macro_auc, plot_roc, roc_curves

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def fake_predictions(n, n_classes, separation=1.5, seed=0, decimals=None):
    """Labels and softmax probabilities of a model that is better than chance by ``separation``."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_classes, size=n)
    logits = rng.normal(size=(n, n_classes))
    logits[np.arange(n), labels] += separation
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    if decimals is not None:  # coarse scores: many ties
        probs = np.round(probs, decimals)
    return labels, probs


# ----------------------------------------------------------------------------------------- macro_auc


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_macro_auc_matches_sklearn_ovr_macro(seed):
    labels, probs = fake_predictions(200, 3, separation=1.0, seed=seed)
    expected = roc_auc_score(labels, probs, multi_class="ovr", average="macro")
    assert macro_auc(labels, probs) == pytest.approx(expected, abs=1e-12)


def test_macro_auc_binary_is_auc_of_column_one():
    labels, probs = fake_predictions(150, 2, separation=1.0, seed=3)
    assert macro_auc(labels, probs) == pytest.approx(roc_auc_score(labels, probs[:, 1]), abs=1e-12)


def test_macro_auc_leaves_absent_classes_out():
    labels, probs = fake_predictions(120, 4, seed=4)
    labels[labels == 2] = 0  # class 2 absent
    present = [0, 1, 3]
    expected = np.mean([roc_auc_score(labels == k, probs[:, k]) for k in present])
    assert macro_auc(labels, probs) == pytest.approx(expected, abs=1e-12)
    assert not math.isnan(macro_auc(labels, probs))


def test_macro_auc_nan_with_one_class():
    _, probs = fake_predictions(30, 3, seed=5)
    assert math.isnan(macro_auc(np.full(30, 1), probs))


# ------------------------------------------------------------------------------------------ bootstrap


def reference_bootstrap_aucs(labels, probs, n_resamples, seed):
    """Slow, obviously correct stratified bootstrap of the macro AUC, same scheme as the plugin:
    one ``rng.integers`` block of shape (n_resamples, class count) per class, classes ascending, then
    per resample and per class the Mann-Whitney AUC by comparing every positive with every negative."""
    labels = [int(v) for v in labels]
    n_classes = len(probs[0])
    rng = np.random.default_rng(seed)
    present = sorted(set(labels))
    members = {c: [i for i, lab in enumerate(labels) if lab == c] for c in present}
    blocks = {c: rng.integers(0, len(members[c]), size=(n_resamples, len(members[c]))) for c in present}
    scored = [1] if n_classes == 2 else present
    out = []
    for b in range(n_resamples):
        sample = [members[c][int(j)] for c in present for j in blocks[c][b]]
        total = 0.0
        for k in scored:
            pos = [float(probs[i][k]) for i in sample if labels[i] == k]
            neg = [float(probs[i][k]) for i in sample if labels[i] != k]
            twice_wins = 0
            for p in pos:
                for q in neg:
                    twice_wins += 2 if p > q else (1 if p == q else 0)
            total += twice_wins / (2 * len(pos) * len(neg))
        out.append(total / len(scored))
    return out


@pytest.mark.parametrize(
    "n_classes, decimals",
    [(3, None), (3, 1), (2, 2), (4, None)],
    ids=["3cls", "3cls-ties", "binary-ties", "4cls"],
)
def test_bootstrap_matches_slow_reference_exactly(n_classes, decimals):
    labels, probs = fake_predictions(60, n_classes, separation=1.0, seed=7, decimals=decimals)
    n_resamples, seed = 150, 11
    expected = reference_bootstrap_aucs(labels, probs, n_resamples, seed)
    got = bootstrap_macro_aucs(labels, probs, n_resamples=n_resamples, seed=seed)
    assert got.tolist() == expected  # same draws, same exact arithmetic: bit for bit
    lo, hi = bootstrap_auc_ci(labels, probs, n_resamples=n_resamples, seed=seed)
    level = 0.95  # bounds: the (1 - level) / 2 and (1 + level) / 2 quantiles, numpy's linear method
    assert [lo, hi] == np.quantile(expected, [(1 - level) / 2, (1 + level) / 2]).tolist()


def test_bootstrap_resample_auc_agrees_with_sklearn_macro_auc():
    """The fast per-resample AUC is the same number as sklearn's (up to rounding) on the same draws."""
    labels, probs = fake_predictions(50, 3, seed=8, decimals=1)
    n_resamples, seed = 40, 5
    rng = np.random.default_rng(seed)
    blocks = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        blocks.append(members[rng.integers(0, members.size, size=(n_resamples, members.size))])
    draws = np.concatenate(blocks, axis=1)
    expected = [macro_auc(labels[idx], probs[idx]) for idx in draws]
    got = bootstrap_macro_aucs(labels, probs, n_resamples=n_resamples, seed=seed)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


def test_bootstrap_is_deterministic_for_a_seed():
    labels, probs = fake_predictions(120, 3, seed=9)
    a = bootstrap_auc_ci(labels, probs, n_resamples=300, seed=42)
    b = bootstrap_auc_ci(labels, probs, n_resamples=300, seed=42)
    c = bootstrap_auc_ci(labels, probs, n_resamples=300, seed=43)
    assert a == b
    assert a != c


def test_bootstrap_ci_contains_point_estimate_and_shrinks_with_n():
    labels, probs = fake_predictions(150, 3, separation=1.2, seed=10)
    lo, hi = bootstrap_auc_ci(labels, probs, n_resamples=1000, seed=0)
    assert lo < macro_auc(labels, probs) < hi
    assert 0.0 <= lo < hi <= 1.0

    big_labels, big_probs = fake_predictions(600, 3, separation=1.2, seed=10)
    big_lo, big_hi = bootstrap_auc_ci(big_labels, big_probs, n_resamples=1000, seed=0)
    assert big_lo < macro_auc(big_labels, big_probs) < big_hi
    # 4x the images: the width should roughly halve.
    assert (big_hi - big_lo) < 0.75 * (hi - lo)


def test_bootstrap_keeps_class_counts():
    labels, probs = fake_predictions(40, 3, seed=12)
    labels[:3] = 2  # make counts unequal
    # A resample that lost a class would give NaN or a different class mix; the reference scheme
    # (per-class blocks) is checked bit for bit above, so here: no NaN, and values vary.
    aucs = bootstrap_macro_aucs(labels, probs, n_resamples=200, seed=1)
    assert np.isfinite(aucs).all() and aucs.std() > 0


def test_bootstrap_one_class_gives_nan():
    _, probs = fake_predictions(20, 3, seed=13)
    lo, hi = bootstrap_auc_ci(np.zeros(20, dtype=np.int64), probs, n_resamples=10)
    assert math.isnan(lo) and math.isnan(hi)


def test_bootstrap_is_fast():
    labels, probs = fake_predictions(300, 3, seed=14)
    bootstrap_auc_ci(labels, probs, n_resamples=50)  # warm up imports
    start = time.perf_counter()
    bootstrap_auc_ci(labels, probs, n_resamples=1000, seed=0)
    assert time.perf_counter() - start < 2.0


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
