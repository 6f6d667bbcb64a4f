"""The core's AUC statistics: macro AUC, the one class-stratified bootstrap (CIs and paired p-values),
DeLong's test; each against a slow, obviously correct reference."""

import math
import time

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from mltl.evaluation.stats import (bootstrap_auc_ci, bootstrap_macro_aucs, delong_test, macro_auc, paired_bootstrap,
                                   stratified_resamples)
from tests.conftest import fake_predictions


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
    """Slow, obviously correct stratified bootstrap of the macro AUC, the scheme of stratified_resamples:
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
    draws = stratified_resamples(labels, n_resamples, seed)
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


# ----------------------------------------------------------------------------------- resamples


def test_stratified_resamples_follow_the_documented_scheme():
    labels = np.array([2, 0, 1, 0, 2, 2, 1, 0, 0, 2])
    draws = stratified_resamples(labels, 50, seed=4)
    assert draws.shape == (50, labels.size)
    rng = np.random.default_rng(4)  # the scheme in the docstring, spelled out
    expected = []
    for c in (0, 1, 2):
        members = [i for i, lab in enumerate(labels) if lab == c]
        block = rng.integers(0, len(members), size=(50, len(members)))
        expected.append([[members[j] for j in row] for row in block])
    assert draws.tolist() == [[i for e in expected for i in e[b]] for b in range(50)]
    for row in draws:  # every resample keeps each class's count, column by column
        assert (labels[row] == np.sort(labels)).all()


# ----------------------------------------------------------------------------------- paired bootstrap


def slow_paired_bootstrap(labels, probs_a, probs_b, n_resamples, seed, level=0.95):
    """The paired bootstrap by hand: sklearn's one-vs-rest AUCs, averaged, of both models on each shared
    resample."""
    def macro(y, p):
        return np.mean([roc_auc_score(y == k, p[:, k]) for k in np.unique(y)])

    a, d = [], []
    for idx in stratified_resamples(labels, n_resamples, seed):
        auc_a = macro(labels[idx], probs_a[idx])
        auc_b = macro(labels[idx], probs_b[idx])
        a.append(auc_a)
        d.append(auc_a - auc_b)
    q = [(1 - level) / 2, (1 + level) / 2]
    d = np.array(d)
    return np.quantile(a, q), np.quantile(d, q), min(1.0, 2 * min((d <= 0).mean(), (d >= 0).mean()))


def three_class_models(n=120, seed=1):
    rng = np.random.default_rng(seed)
    y = np.repeat([0, 1, 2], n // 3)
    good = np.eye(3)[y] * 2 + rng.normal(0, 1, (n, 3))
    good = np.exp(good) / np.exp(good).sum(1, keepdims=True)
    noise = rng.dirichlet([1, 1, 1], n)
    return y, good, noise


def test_paired_bootstrap_is_seeded_and_sensible():
    y, good, noise = three_class_models()
    r1 = paired_bootstrap(y, good, noise, classes=("a", "b", "c"), n_resamples=200, seed=3)
    r2 = paired_bootstrap(y, good, noise, classes=("a", "b", "c"), n_resamples=200, seed=3)
    assert r1 == r2
    auc = roc_auc_score(y, good, multi_class="ovr")
    assert r1["ci_low"] < auc < r1["ci_high"]
    assert r1["p"] < 0.01 and r1["diff_ci_low"] > 0
    same = paired_bootstrap(y, good, good, classes=("a", "b", "c"), n_resamples=50, seed=0)
    assert same["p"] == 1.0


def test_paired_bootstrap_matches_the_slow_reference():
    y, good, noise = three_class_models(90, seed=5)
    noise = np.round(noise, 1)  # ties
    r = paired_bootstrap(y, good, noise, classes=("a", "b", "c"), n_resamples=120, seed=9)
    ci, diff_ci, p = slow_paired_bootstrap(y, good, noise, 120, 9)
    np.testing.assert_allclose([r["ci_low"], r["ci_high"]], ci, rtol=0, atol=1e-12)
    np.testing.assert_allclose([r["diff_ci_low"], r["diff_ci_high"]], diff_ci, rtol=0, atol=1e-12)
    assert r["p"] == pytest.approx(p, abs=1e-12)
    assert (r["n_resamples"], r["seed"]) == (120, 9)


@pytest.mark.parametrize("n_classes", [2, 3])
def test_paired_bootstrap_ci_is_the_bootstrap_ci(n_classes):
    """One bootstrap: the CI mltl compare prints for a model (alone or paired) is the reporters' CI."""
    labels, probs_a = fake_predictions(70, n_classes, separation=1.0, seed=21)
    _, probs_b = fake_predictions(70, n_classes, separation=0.3, seed=22)
    classes = tuple("abc"[:n_classes])
    expected = bootstrap_auc_ci(labels, probs_a, n_resamples=300, seed=6)
    alone = paired_bootstrap(labels, probs_a, classes=classes, n_resamples=300, seed=6)
    paired = paired_bootstrap(labels, probs_a, probs_b, classes=classes, n_resamples=300, seed=6)
    assert (alone["ci_low"], alone["ci_high"]) == expected == (paired["ci_low"], paired["ci_high"])


# -------------------------------------------------------------------------------------- DeLong


def slow_delong(y, a, b):
    """DeLong 1988 written out with explicit pair loops (the reference)."""
    y = np.asarray(y, bool)

    def psi(x, z):
        return 1.0 if x > z else 0.5 if x == z else 0.0

    comps = []
    for s in (a, b):
        pos, neg = s[y], s[~y]
        v10 = np.array([np.mean([psi(p, q) for q in neg]) for p in pos])
        v01 = np.array([np.mean([psi(p, q) for p in pos]) for q in neg])
        comps.append((v10.mean(), v10, v01))
    m, n = y.sum(), (~y).sum()
    s10 = np.array([[np.sum((comps[i][1] - comps[i][0]) * (comps[j][1] - comps[j][0])) / (m - 1) for j in range(2)] for i in range(2)])
    s01 = np.array([[np.sum((comps[i][2] - comps[i][0]) * (comps[j][2] - comps[j][0])) / (n - 1) for j in range(2)] for i in range(2)])
    cov = s10 / m + s01 / n
    z = (comps[0][0] - comps[1][0]) / math.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    return comps[0][0], comps[1][0], 2 * norm.sf(abs(z))


def test_delong_matches_the_slow_reference_and_sklearn():
    rng = np.random.default_rng(0)
    for trial in range(4):
        y = rng.integers(0, 2, 60)
        a = y * 0.8 + rng.normal(0, 1, 60)
        b = np.round(y * 0.4 + rng.normal(0, 1, 60), 1)  # ties
        out = delong_test(y, a, b)
        ra, rb, rp = slow_delong(y, a, b)
        assert abs(out["auc_a"] - roc_auc_score(y, a)) < 1e-12 and abs(out["auc_b"] - rb) < 1e-12
        assert abs(out["p"] - rp) < 1e-10


def test_delong_known_case():
    # identical scores: no difference, p = 1
    y = np.array([0, 0, 1, 1, 0, 1])
    s = np.array([0.1, 0.4, 0.35, 0.8, 0.2, 0.9])
    assert delong_test(y, s, s)["p"] == 1.0
