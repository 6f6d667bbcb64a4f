"""The cluster (patient) bootstrap of mltl.evaluation.stats: with ``groups``, whole groups are resampled.

Images of one patient are not independent evidence. The reference case: every image repeated five times as
one group carries exactly the information of the de-duplicated set, so the cluster bootstrap must give the
de-duplicated set's interval (here exactly: the same draws), while the image bootstrap, counting each copy
as new evidence, gives a far narrower one.
"""

import hashlib
import math

import numpy as np
import pytest

import mltl
from mltl.evaluation.stats import (bootstrap_auc_ci, bootstrap_macro_aucs, macro_auc, paired_bootstrap,
                                   paired_bootstrap_over_draws, stratified_resamples)
from tests.conftest import fake_predictions


def _baseline_data():
    rng = np.random.default_rng(123)
    labels = np.repeat([0, 1, 2], [20, 15, 25])
    probs = rng.dirichlet([1, 1, 1], 60)
    probs[np.arange(60), labels] += 0.4
    probs /= probs.sum(1, keepdims=True)
    return labels, probs, rng.dirichlet([1, 1, 1], 60)


def _sha(array, dtype) -> str:
    return hashlib.sha256(np.ascontiguousarray(array, dtype=dtype).tobytes()).hexdigest()


def test_without_groups_every_result_is_bit_identical_to_before():
    """Values computed with the code before groups existed (same data, same seeds)."""
    labels, probs, probs_b = _baseline_data()
    assert _sha(stratified_resamples(labels, 300, 7), np.int64) == \
        "67c6d40d638ef0acbe288c577e624c9012644d5a45d26db4bee80242fca83ee0"
    assert _sha(bootstrap_macro_aucs(labels, probs, n_resamples=300, seed=7), np.float64) == \
        "b7807c7568f35c9981f6f5e07041aa58aec9c97987d46d61eb1b7fec93c87417"
    assert bootstrap_auc_ci(labels, probs, n_resamples=300, seed=7) == (0.8370473765432099, 0.9496374669312169)
    r = paired_bootstrap(labels, probs, probs_b, classes=("a", "b", "c"), n_resamples=300, seed=7, groups=None)
    assert (r["ci_low"], r["ci_high"], r["diff_ci_low"], r["diff_ci_high"], r["p"]) == (
        0.8370473765432099, 0.9496374669312169, 0.33016134259259244, 0.5881397376543209, 0.0)
    assert (r["unit"], r["n_units"]) == ("images", 60)
    d = paired_bootstrap_over_draws(labels, [probs, probs_b], [probs_b, probs], n_resamples=200, seed=2)
    assert (d["diff_ci_low"], d["diff_ci_high"], d["p"]) == (-0.5411191137566136, 0.5460375220458555, 1.0)


def _duplicated(labels, probs, copies=5):
    """Each image ``copies`` times in a row, one group per original image (names sort like the originals)."""
    groups = [f"patient-{i:04d}" for i in range(labels.size) for _ in range(copies)]
    return np.repeat(labels, copies), np.repeat(probs, copies, axis=0), groups


@pytest.mark.parametrize("n_classes", [2, 3])
def test_duplicates_as_groups_give_the_deduplicated_interval_and_a_wider_one_than_images(n_classes):
    labels, probs = fake_predictions(80, n_classes, separation=1.0, seed=31)
    dup_labels, dup_probs, groups = _duplicated(labels, probs)
    dedup = bootstrap_auc_ci(labels, probs, n_resamples=500, seed=4)
    images = bootstrap_auc_ci(dup_labels, dup_probs, n_resamples=500, seed=4)
    cluster = bootstrap_auc_ci(dup_labels, dup_probs, n_resamples=500, seed=4, groups=groups)
    width = {name: ci[1] - ci[0] for name, ci in (("dedup", dedup), ("images", images), ("cluster", cluster))}
    assert width["cluster"] > 1.8 * width["images"]  # about sqrt(5) = 2.2 times
    assert width["cluster"] == pytest.approx(width["dedup"], abs=1e-12)
    assert cluster == pytest.approx(dedup, abs=1e-12)
    # the same draws: every resampled AUC is the de-duplicated one's
    np.testing.assert_allclose(bootstrap_macro_aucs(dup_labels, dup_probs, 200, seed=9, groups=groups),
                               bootstrap_macro_aucs(labels, probs, 200, seed=9), rtol=0, atol=1e-12)
    # and the public API passes groups through
    assert mltl.bootstrap_auc_ci(dup_labels, dup_probs, n_resamples=500, seed=4, groups=groups) == cluster


def test_correlated_patients_of_unequal_size_widen_the_interval():
    """Patients with 1 to 12 images whose scores share a patient effect: the images are not independent."""
    rng = np.random.default_rng(5)
    sizes = rng.integers(1, 13, size=60)
    patient_label = np.repeat([0, 1], 30)
    effect = rng.normal(0, 1.5, size=60) + patient_label * 1.0
    labels = np.repeat(patient_label, sizes)
    score = np.repeat(effect, sizes) + rng.normal(0, 0.3, size=labels.size)
    probs = np.column_stack([1 / (1 + np.exp(score)), 1 / (1 + np.exp(-score))])
    groups = np.repeat([f"p{i}" for i in range(60)], sizes)
    lo_i, hi_i = bootstrap_auc_ci(labels, probs, n_resamples=1000, seed=0)
    lo_c, hi_c = bootstrap_auc_ci(labels, probs, n_resamples=1000, seed=0, groups=groups)
    assert lo_c < macro_auc(labels, probs) < hi_c
    assert hi_c - lo_c > 1.5 * (hi_i - lo_i)


def test_cluster_resamples_follow_the_documented_scheme():
    labels = np.array([2, 0, 1, 0, 2, 2, 1, 0, 0, 2, 1, 1])
    groups = ["d", "a", "c", "a", "e", "e", "c", "b", "b", "f", "f", "g"]  # f is mixed: 2 and 1, tie -> class 1
    draws = stratified_resamples(labels, 40, seed=8, groups=groups)
    assert isinstance(draws, list) and len(draws) == 40
    names = sorted(set(groups))  # a b c d e f g
    rows = {g: [i for i, x in enumerate(groups) if x == g] for g in names}
    group_class = {"a": 0, "b": 0, "c": 1, "d": 2, "e": 2, "f": 1, "g": 1}
    rng = np.random.default_rng(8)
    blocks = []
    for c in (0, 1, 2):
        members = [k for k, g in enumerate(names) if group_class[g] == c]
        blocks.append([[members[j] for j in row] for row in rng.integers(0, len(members), size=(40, len(members)))])
    for b, got in enumerate(draws):
        picked = [names[k] for block in blocks for k in block[b]]
        assert got.tolist() == [i for g in picked for i in rows[g]]
        drawn_classes = sorted(group_class[g] for g in picked)  # as many groups of each class as the data
        assert drawn_classes == [0, 0, 1, 1, 1, 2, 2]
    # the weighted (multiplicity) AUCs are the AUCs of those index resamples, ties included
    rng = np.random.default_rng(1)
    probs = np.round(rng.dirichlet([1, 1, 1], labels.size), 1)
    got = bootstrap_macro_aucs(labels, probs, 40, seed=8, groups=groups)
    expected = [macro_auc(labels[idx], probs[idx]) for idx in draws]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


def test_paired_p_value_resamples_patients():
    rng = np.random.default_rng(15)
    labels = np.repeat([0, 1], 30)
    base = labels * 1.0 + rng.normal(0, 1, 60)
    score_a = base + rng.normal(0, 0.5, 60)  # two correlated models, a a little less noisy
    score_b = base + rng.normal(0, 0.8, 60)
    a = np.column_stack([-score_a, score_a])
    b = np.column_stack([-score_b, score_b])
    dup_labels, dup_a, groups = _duplicated(labels, a)
    _, dup_b, _ = _duplicated(labels, b)
    classes = ("neg", "pos")
    dedup = paired_bootstrap(labels, a, b, classes=classes, n_resamples=1000, seed=2)
    images = paired_bootstrap(dup_labels, dup_a, dup_b, classes=classes, n_resamples=1000, seed=2)
    cluster = paired_bootstrap(dup_labels, dup_a, dup_b, classes=classes, n_resamples=1000, seed=2, groups=groups)
    assert 0.1 < dedup["p"] < 0.9 and dedup["diff_ci_low"] < 0  # a modest difference on 60 patients ...
    assert images["p"] < 0.01 and images["diff_ci_low"] > 0  # ... that 300 copies, as images, call clear
    assert cluster["p"] == pytest.approx(dedup["p"], abs=1e-12)
    assert (cluster["diff_ci_low"], cluster["diff_ci_high"]) == pytest.approx(
        (dedup["diff_ci_low"], dedup["diff_ci_high"]), abs=1e-12)
    assert (cluster["unit"], cluster["n_units"]) == ("groups", 60)
    assert (images["unit"], images["n_units"]) == ("images", 300)
    # over draws: with one draw it is the paired bootstrap, groups included
    over = paired_bootstrap_over_draws(dup_labels, [dup_a], [dup_b], n_resamples=1000, seed=2, groups=groups)
    assert (over["diff_ci_low"], over["diff_ci_high"], over["p"]) == pytest.approx(
        (cluster["diff_ci_low"], cluster["diff_ci_high"], cluster["p"]), abs=1e-12)
    assert (over["unit"], over["n_units"]) == ("groups", 60)
    two = paired_bootstrap_over_draws(dup_labels, [dup_a, dup_a], [dup_b, dup_b], n_resamples=300, seed=2,
                                      groups=groups)
    assert not math.isnan(two["p"]) and two["diff_ci_low"] < two["diff"] < two["diff_ci_high"]


def test_bad_groups_are_refused():
    labels, probs = fake_predictions(10, 2, seed=1)
    with pytest.raises(ValueError, match="one case key per row: got 9 keys for 10 rows"):
        bootstrap_auc_ci(labels, probs, groups=["g"] * 9)
    with pytest.raises(ValueError, match="every row needs a case key"):
        bootstrap_auc_ci(labels, probs, groups=["g"] * 9 + [""])


def test_roc_plugin_states_what_was_resampled():
    from mltl_roc.evaluation import case_level, macro_auc_ci
    from mltl_roc.roc import macro_legend

    labels, probs = fake_predictions(40, 2, separation=1.0, seed=3)
    dup_labels, dup_probs, groups = _duplicated(labels, probs)
    by_patient = macro_auc_ci(dup_labels, dup_probs, groups=groups, n_resamples=300, seed=1)
    by_image = macro_auc_ci(dup_labels, dup_probs, n_resamples=300, seed=1)
    assert by_patient["ci_note"] == "95% CI, bootstrap over 40 patients"
    assert by_image["ci_note"] == "95% CI, bootstrap over 200 images"
    assert by_patient["auc_macro_ci95"] == list(bootstrap_auc_ci(dup_labels, dup_probs, n_resamples=300, seed=1,
                                                                 groups=groups))
    assert by_image["auc_macro_ci95"] == list(bootstrap_auc_ci(dup_labels, dup_probs, n_resamples=300, seed=1))
    lo, hi = by_patient["auc_macro_ci95"]
    assert macro_legend((lo, hi), by_patient["ci_note"]).format(auc=0.5) == (
        f"macro average: AUC 0.50 (95% CI {lo:.2f}–{hi:.2f}, bootstrap over 40 patients)")
    case = case_level(groups, dup_labels, dup_probs, ("a", "b"), n_resamples=300, seed=1)
    assert case["ci_note"] == "95% CI, bootstrap over 40 patients" and case["n_cases"] == 40
    one_class = macro_auc_ci(np.zeros(6, dtype=int), probs[:6], groups=list("aabbcc"))
    assert all(math.isnan(x) for x in one_class["auc_macro_ci95"]) and one_class["ci_n_units"] == 3
