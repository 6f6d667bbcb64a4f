import math

import numpy as np
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from mltl.stats import delong_test, paired_bootstrap


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


def test_paired_bootstrap_is_seeded_and_sensible():
    rng = np.random.default_rng(1)
    y = np.repeat([0, 1, 2], 40)
    good = np.eye(3)[y] * 2 + rng.normal(0, 1, (120, 3))
    good = np.exp(good) / np.exp(good).sum(1, keepdims=True)
    noise = rng.dirichlet([1, 1, 1], 120)
    r1 = paired_bootstrap(y, good, noise, classes=("a", "b", "c"), n_resamples=200, seed=3)
    r2 = paired_bootstrap(y, good, noise, classes=("a", "b", "c"), n_resamples=200, seed=3)
    assert r1 == r2
    auc = roc_auc_score(y, good, multi_class="ovr")
    assert r1["ci_low"] < auc < r1["ci_high"]
    assert r1["p"] < 0.01 and r1["diff_ci_low"] > 0
    same = paired_bootstrap(y, good, good, classes=("a", "b", "c"), n_resamples=50, seed=0)
    assert same["p"] == 1.0
