"""``mltl compare`` on a target repeated over training fractions: per-fraction tables (every draw, paired
differences against the multi-stage chain with a CI over draws and images), the learning-curve figure with
every chain, and the draws shared across chains. The fast tests build the chains' run directories from
synthetic predictions (nothing trained); one slow test runs the real command on the tiny chain."""

import csv
import json
import math

import numpy as np
import pytest

import mltl
from mltl.evaluation.metrics import classification_metrics
from mltl.evaluation.stats import paired_bootstrap_over_draws, stratified_resamples
from mltl.running.compare import compare, write_comparison
from mltl.running.rundir import StageFiles, predictions_csv, read_predictions, splits_csv, write_json_atomic

CLASSES = ("normal", "lesion")
FRACTIONS = (0.1, 0.5)
DRAWS = 3
N_TEST = 40


def _probs(rng, labels, separation):
    logit = rng.normal(size=labels.size) + separation * (2 * labels - 1)
    p = 1.0 / (1.0 + np.exp(-logit))
    return np.c_[1.0 - p, p]


def fractions_target(run_dir, separations, seed):
    """A finished binary target repeated over FRACTIONS x DRAWS: repeats/<label>/{predictions,splits}.csv,
    repeats.json and metrics.json, with test AUC growing with the fraction by ``separations[fraction]``."""
    rng = np.random.default_rng(seed)
    ids = [f"img{i:03d}" for i in range(120)]
    labels_all = np.tile([0, 1], 60)
    test_idx, train_pool = np.arange(80, 120), np.arange(0, 60)
    stage_dir = run_dir / "target"
    files = StageFiles(stage_dir)
    rows, first = [], None
    for fi, fraction in enumerate(FRACTIONS):
        for d in range(DRAWS):
            label = f"fraction-{fraction:g}-draw-{d + 1}"
            rep = files.repeat(label)
            rep.root.mkdir(parents=True)
            # the same training images for draw d in every chain (as the plan makes them), whatever the chain
            pick = np.random.default_rng(1000 * fi + d).permutation(train_pool)[:int(len(train_pool) * fraction)]
            rep.splits.write_text(splits_csv(ids, CLASSES, labels_all, {"train": np.sort(pick),
                                                                        "val": np.arange(60, 80), "test": test_idx}))
            test_labels = labels_all[test_idx]
            test = mltl.Predictions(ids=tuple(ids[i] for i in test_idx), split="test", labels=test_labels,
                                    probs=_probs(rng, test_labels, separations[fraction]), classes=CLASSES)
            val_labels = labels_all[60:80]
            val = mltl.Predictions(ids=tuple(ids[60:80]), split="val", labels=val_labels,
                                   probs=_probs(rng, val_labels, separations[fraction]), classes=CLASSES)
            rep.predictions.write_text(predictions_csv([val, test]))
            m = classification_metrics(test.labels, test.probs, CLASSES)
            rows.append({"label": label, "fold": None, "fraction": fraction, "draw": d + 1, "seed": d,
                         "n_train": len(pick), "n_test": N_TEST, "auc_macro": m["auc_macro"],
                         "accuracy": m["accuracy"], "balanced_accuracy": m["balanced_accuracy"],
                         "train_seconds": 1.0})
            if fraction == max(FRACTIONS) and d == 0:
                first = (label, test, m)
    write_json_atomic(files.repeats_json, {"protocol": "fractions", "rows": rows})
    label, test, m = first
    metrics = {**m, "classes": list(CLASSES), "n_test": N_TEST, "train_seconds": 1.0,
               "n_images": {"train": 60, "val": 20, "test": N_TEST},
               "protocol": {"name": "fractions", "representative": label, "train_seconds_total": 6.0,
                            "auc_macro": {"mean": m["auc_macro"], "sd": 0.01, "n": DRAWS, "values": []}}}
    return mltl.StageResult(name="target", stage_dir=stage_dir, classes=CLASSES, test=test, metrics=metrics)


@pytest.fixture
def compared(tmp_path):
    out = tmp_path / "cmp"
    spec = (("scratch", {0.1: 0.2, 0.5: 1.2}, 1), ("single-stage", {0.1: 0.9, 0.5: 1.3}, 2),
            ("multi-stage", {0.1: 1.6, 0.5: 1.4}, 3))
    runs = {name: mltl.RunResult(run_dir=out / name, stages=(fractions_target(out / name, sep, seed),))
            for name, sep, seed in spec}
    return out, runs, write_comparison(out, runs, n_resamples=300, seed=5)


def _recomputed(run_dir, fraction):
    """Every draw's test AUC and probabilities at ``fraction``, straight from repeats/<label>/predictions.csv."""
    files = StageFiles(run_dir / "target")
    rows = json.loads(files.repeats_json.read_text())["rows"]
    labels = sorted((r["label"] for r in rows if r["fraction"] == fraction),
                    key=lambda lab: int(lab.rsplit("-", 1)[1]))
    preds = [read_predictions(files.repeat(lab).predictions, "test", CLASSES) for lab in labels]
    from sklearn.metrics import roc_auc_score
    return [roc_auc_score(p.labels, p.probs[:, 1]) for p in preds], preds


def test_each_fraction_is_judged_over_its_draws_against_the_multi_stage_chain(compared):
    out, runs, comparison = compared
    data = json.loads((out / "comparison.json").read_text())
    assert [f["fraction"] for f in data["fractions"]] == list(FRACTIONS)
    assert "resamples the draws" in data["fractions_method"]
    assert comparison.fractions == tuple(json.loads(json.dumps(comparison.fractions)))  # plain JSON values
    for item in data["fractions"]:
        assert item["n_draws"] == DRAWS and item["same_training_images"] is True
        ref_aucs, ref_preds = _recomputed(runs["multi-stage"].run_dir, item["fraction"])
        for entry in item["chains"]:
            aucs, preds = _recomputed(runs[entry["chain"]].run_dir, item["fraction"])
            assert entry["auc_values"] == pytest.approx(aucs, abs=1e-12)
            assert entry["auc_mean"] == pytest.approx(np.mean(aucs), abs=1e-12)
            assert entry["auc_sd"] == pytest.approx(np.std(aucs, ddof=1), abs=1e-12)
            assert entry["n_train"] == int(60 * item["fraction"])
            d = entry.get("diff_vs_reference")
            if entry["chain"] == "multi-stage":
                assert d is None
                continue
            assert d["per_draw"] == pytest.approx(np.subtract(aucs, ref_aucs), abs=1e-12)
            assert d["mean"] == pytest.approx(np.mean(np.subtract(aucs, ref_aucs)), abs=1e-12)
            if (entry["chain"], item["fraction"]) != ("scratch", FRACTIONS[0]):
                continue  # the bootstrap recomputed by hand once (sklearn per resample is slow)
            # the CI: draws and test images resampled, one image resample shared by every draw and chain
            labels = ref_preds[0].labels
            images = stratified_resamples(labels, 300, 5)
            picks = np.random.default_rng([5, 1]).integers(0, DRAWS, size=(300, DRAWS))
            from sklearn.metrics import roc_auc_score
            per = np.array([[roc_auc_score(labels[rs], p.probs[rs, 1]) - roc_auc_score(labels[rs], r.probs[rs, 1])
                             for rs in images] for p, r in zip(preds, ref_preds)])  # (draws, resamples)
            values = np.round(per[picks, np.arange(300)[:, None]].mean(axis=1), 12)  # exact zeros stay zero
            assert d["ci95"] == pytest.approx(list(np.quantile(values, [0.025, 0.975])), abs=1e-9)
            assert d["p"] == pytest.approx(min(1.0, 2 * min((values <= 0).mean(), (values >= 0).mean())))
            assert d["detected"] == (d["ci95"][0] > 0 or d["ci95"][1] < 0)
    # scarce data (10%): scratch far below multi-stage; at 50% the chains are close
    low = data["fractions"][0]
    assert "scratch" in low["detected"] and "scratch is lower than multi-stage" in low["sentence"]
    assert "a difference is detected" in low["sentence"]


def test_the_tables_and_the_learning_curve_are_in_every_output(compared):
    from PIL import Image

    out, _, comparison = compared
    md = (out / "comparison.md").read_text()
    html = (out / "comparison.html").read_text()
    for item in comparison.fractions:
        heading = f"Training fraction {item['fraction'] * 100:g}% (~{item['chains'][0]['n_train']:.0f} training images)"
        assert heading in md and heading in html
        assert item["sentence"] in md
        for e in item["chains"]:
            draws = ", ".join(f"{v:.3f}" for v in e["auc_values"])
            assert f"| {e['chain']} |" in md and draws in md and f"<td>{draws}</td>" in html
    assert "| multi-stage | 6 | " in md and "| reference | - |" in md
    assert "no difference is detected" in md or "a difference is detected" in md
    assert "![learning_curve_chains](learning_curve_chains.png)" in md
    assert json.loads((out / "comparison.json").read_text())["figures"] == ["roc_chains.png",
                                                                           "learning_curve_chains.png"]
    assert html.count("data:image/png;base64,") == 2
    with Image.open(out / "learning_curve_chains.png") as im:
        assert im.size[0] > 300


def test_the_chains_handed_to_the_figure_hooks_carry_every_draw(tmp_path):
    from mltl.running import compare as compare_module

    out = tmp_path / "cmp"
    runs = {name: mltl.RunResult(run_dir=out / name, stages=(fractions_target(out / name, {0.1: s, 0.5: s}, k),))
            for k, (name, s) in enumerate((("scratch", 0.5), ("multi-stage", 1.5)))}
    seen = []

    class Spy:
        def comparison_figures(self, chains, out_dir):
            seen.extend(chains)
            return []

    original = compare_module.hooks
    compare_module.hooks = lambda: Spy()
    try:
        result = write_comparison(out, runs, n_resamples=50, seed=0)
    finally:
        compare_module.hooks = original
    assert [c.name for c in seen] == ["scratch", "multi-stage"]
    for c in seen:
        assert [f.fraction for f in c.fractions] == list(FRACTIONS)
        for f, item in zip(c.fractions, result.fractions):
            entry = next(e for e in item["chains"] if e["chain"] == c.name)
            assert list(f.aucs) == entry["auc_values"] and f.n_train == entry["n_train"]
            assert len(f.aucs) == DRAWS and all(math.isfinite(a) for a in f.aucs)


def test_a_plain_target_has_no_fraction_section(tmp_path):
    out = tmp_path / "cmp"
    runs = {}
    for k, name in enumerate(("scratch", "multi-stage")):
        target = fractions_target(out / name, {0.1: 1.0, 0.5: 1.0}, k)
        metrics = {key: v for key, v in target.metrics.items() if key != "protocol"}
        runs[name] = mltl.RunResult(run_dir=out / name, stages=(mltl.StageResult(
            name="target", stage_dir=target.stage_dir, classes=CLASSES, test=target.test, metrics=metrics),))
    result = write_comparison(out, runs, n_resamples=50, seed=0)
    assert result.fractions == ()
    assert "fractions" not in json.loads((out / "comparison.json").read_text())
    assert "By training fraction" not in (out / "comparison.md").read_text()
    assert not (out / "learning_curve_chains.png").exists()


def test_paired_bootstrap_over_draws_reduces_to_the_image_bootstrap_for_one_draw():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 25)
    a, b = _probs(rng, labels, 1.0), _probs(rng, labels, 0.3)
    one = paired_bootstrap_over_draws(labels, [a], [b], n_resamples=400, seed=3)
    plain = mltl.paired_bootstrap(labels, a, b, classes=CLASSES, n_resamples=400, seed=3)
    assert (one["diff_ci_low"], one["diff_ci_high"], one["p"]) == pytest.approx(
        (plain["diff_ci_low"], plain["diff_ci_high"], plain["p"]))
    with pytest.raises(ValueError, match="same positive number of draws"):
        paired_bootstrap_over_draws(labels, [a, a], [b], n_resamples=10)


@pytest.mark.slow
def test_mltl_compare_on_a_tiny_fractions_target(tmp_path, tiny_config):
    result = compare(tiny_config("C1"), overrides=["stages.target.split.protocol=fractions",
                                                   "stages.target.split.fractions=[0.5, 1.0]",
                                                   "stages.target.split.draws=2"],
                     out=tmp_path / "cmp", device="cpu", n_resamples=100)
    assert [f["fraction"] for f in result.fractions] == [0.5, 1.0]
    classes = ("normal", "caroli-focal", "caroli-diffuse")
    from sklearn.metrics import roc_auc_score
    for item in result.fractions:
        assert item["same_training_images"] is True and item["n_draws"] == 2
        train_sets = []
        for entry in item["chains"]:
            files = StageFiles(tmp_path / "cmp" / entry["chain"] / "target")
            aucs, trains = [], []
            for label in entry["draws"]:
                p = read_predictions(files.repeat(label).predictions, "test", classes)
                aucs.append(roc_auc_score(p.labels, p.probs, multi_class="ovr", average="macro"))
                with open(files.repeat(label).splits, newline="") as f:
                    trains.append(sorted(r["id"] for r in csv.DictReader(f) if r["split"] == "train"))
            assert entry["auc_values"] == pytest.approx(aucs, abs=1e-9)
            train_sets.append(trains)
        assert all(t == train_sets[0] for t in train_sets)  # draw k: the same training ids in every chain
        assert train_sets[0][0] != train_sets[0][1] or item["fraction"] == 1.0  # draws differ below 100%
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "Training fraction 50%" in md and "learning_curve_chains.png" in md
