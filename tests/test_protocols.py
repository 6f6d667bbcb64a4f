"""Evaluation protocols: k-fold (the default for a small last stage), training fractions, repeated seeds."""

import csv
import json
import shutil

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, roc_auc_score

import mltl
from mltl.data.domain import Domain, kfold_assignment, subsample
from mltl.hookspecs import hookimpl

CONFIG = """
[run]
name = "proto"
seed = 5

[input]
size = 56
channels = 1

[[stages]]
name = "target"
domain = {{ plugin = "patients", n_patients = {n_patients} }}
backbone = "gfe-1"
train = {{ epochs = 2, batch_size = 16, optimizer = "adamw", lr = 0.003 }}
{split}
"""


def patients(n_patients: int = 12, *, image_size: int = 56) -> Domain:
    """Two classes told apart by a bright square; three slices per patient, all of one class."""
    rng = np.random.default_rng(0)
    images, labels, ids, groups = [], [], [], []
    for p in range(n_patients):
        label = p % 2
        for s in range(3):
            img = rng.integers(0, 60, (image_size, image_size), dtype=np.uint8)
            if label:
                img[20:36, 20:36] = 200
            images.append(img)
            labels.append(label)
            ids.append(f"p{p}/slice{s}")
            groups.append(f"patient-{p}")
    return Domain(classes=("clear", "lesion"), images=np.stack(images), labels=labels, ids=ids, groups=groups)


@pytest.fixture
def patients_plugin(fresh_plugins):
    class Plugin:
        @hookimpl
        def register_domains(self, register):
            register("patients", patients)

    mltl.register_plugin(Plugin(), name="patients-plugin")
    yield


def _config(tmp_path, split: str = "", n_patients: int = 12):
    path = tmp_path / "proto.toml"
    path.write_text(CONFIG.format(split=split, n_patients=n_patients))
    return path


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _scores(rows, classes=("clear", "lesion")):
    y = np.array([classes.index(r["label"]) for r in rows])
    p = np.array([[float(r[f"p_{c}"]) for c in classes] for r in rows])
    return roc_auc_score(y, p[:, 1]), accuracy_score(y, p.argmax(1))


def test_kfold_assignment_keeps_patients_whole_and_classes_in_every_fold():
    dom = patients(20)
    fold = kfold_assignment(dom, 4, seed=1)
    groups = np.asarray(dom.groups)
    for g in np.unique(groups):
        assert len(set(fold[groups == g])) == 1  # a patient's slices are in one fold
    for k in range(4):
        counts = np.bincount(dom.labels[fold == k], minlength=2)
        assert counts.min() >= 6  # 10 patients of each class over 4 folds: 2 or 3 patients, 3 slices each
    with pytest.raises(mltl.UserError, match=r'class "clear" has 2 image group\(s\); 3-fold cross-validation '
                                             r"needs at least 3 \(lower split.folds or add images\)"):
        kfold_assignment(patients(4), 3, seed=1, where="")


def test_subsample_draws_whole_patients_per_class():
    dom = patients(20)
    pool = np.arange(len(dom))
    half = subsample(dom, pool, 0.5, seed=3)
    assert len(half) == 30 and np.bincount(dom.labels[half]).tolist() == [15, 15]
    groups = np.asarray(dom.groups)
    for g in np.unique(groups[half]):
        assert np.isin(np.flatnonzero(groups == g), half).all()
    assert not np.array_equal(half, subsample(dom, pool, 0.5, seed=4))
    assert np.array_equal(subsample(dom, pool, 1.0, seed=4), pool)


@pytest.mark.slow
def test_small_last_stage_defaults_to_kfold_and_every_number_is_recomputable(tmp_path, patients_plugin):
    result = mltl.run(_config(tmp_path), out=tmp_path / "run")
    stage_dir = result.run_dir / "target"
    metrics = json.loads((stage_dir / "metrics.json").read_text())
    proto = metrics["protocol"]
    assert proto["name"] == "kfold" and proto["n_repeats"] == 5 and proto["representative"] == "fold-1"
    dom = patients(12)
    groups = dict(zip(dom.ids, dom.groups))
    tested = []
    for k in range(1, 6):
        fold_dir = stage_dir / "repeats" / f"fold-{k}"
        fm = json.loads((fold_dir / "metrics.json").read_text())
        rows = [r for r in _rows(fold_dir / "predictions.csv") if r["split"] == "test"]
        auc, acc = _scores(rows)
        assert fm["auc_macro"] == pytest.approx(auc, abs=1e-9) and fm["accuracy"] == pytest.approx(acc, abs=1e-9)
        assert proto["auc_macro"]["values"][k - 1] == pytest.approx(auc, abs=1e-9)
        split_of = {r["id"]: r["split"] for r in _rows(fold_dir / "splits.csv")}
        test_groups = {groups[i] for i, s in split_of.items() if s == "test"}
        train_groups = {groups[i] for i, s in split_of.items() if s != "test"}
        assert not test_groups & train_groups  # no patient on both sides
        tested += [r["id"] for r in rows]
    assert sorted(tested) == sorted(dom.ids)  # every image tested exactly once
    assert proto["auc_macro"]["mean"] == pytest.approx(np.mean(proto["auc_macro"]["values"]), abs=1e-12)
    assert proto["auc_macro"]["sd"] == pytest.approx(np.std(proto["auc_macro"]["values"], ddof=1), abs=1e-12)
    pooled_auc, pooled_acc = _scores(_rows(stage_dir / "oof_predictions.csv"))
    assert proto["pooled"]["auc_macro"] == pytest.approx(pooled_auc, abs=1e-9)
    assert proto["pooled"]["n"] == 36 and proto["pooled"]["accuracy"] == pytest.approx(pooled_acc, abs=1e-9)
    # the stage's own files are the representative fold's: its model reproduces its predictions
    assert (stage_dir / "predictions.csv").read_bytes() == (stage_dir / "repeats/fold-1/predictions.csv").read_bytes()
    assert json.loads((stage_dir / "repeats.json").read_text())["protocol"] == "kfold"
    assert "over 5 folds" in (result.run_dir / "report.md").read_text()

    # resume after losing folds 3-5 and the stage's summary: folds 1-2 are reused untouched
    kept = (stage_dir / "repeats/fold-2/model.safetensors").stat().st_mtime_ns
    for k in (3, 4, 5):
        shutil.rmtree(stage_dir / "repeats" / f"fold-{k}")
    (stage_dir / "metrics.json").unlink()
    again = mltl.run(_config(tmp_path), out=tmp_path / "run", resume=True)
    assert (stage_dir / "repeats/fold-2/model.safetensors").stat().st_mtime_ns == kept
    assert json.loads((again.run_dir / "target/metrics.json").read_text())["protocol"]["auc_macro"]["values"] == \
        pytest.approx(proto["auc_macro"]["values"], abs=1e-12)


@pytest.mark.slow
def test_fractions_protocol_gives_a_learning_curve_on_a_fixed_test_split(tmp_path, patients_plugin):
    split = 'split = { protocol = "fractions", fractions = [0.5, 1.0], draws = 2, val = 0.25, test = 0.25 }'
    result = mltl.run(_config(tmp_path, split, n_patients=16), out=tmp_path / "run")
    stage_dir = result.run_dir / "target"
    rows = json.loads((stage_dir / "repeats.json").read_text())["rows"]
    assert [(r["fraction"], r["draw"]) for r in rows] == [(0.5, 1), (0.5, 2), (1.0, 1), (1.0, 2)]
    full = [r["n_train"] for r in rows if r["fraction"] == 1.0]
    half = [r["n_train"] for r in rows if r["fraction"] == 0.5]
    assert full[0] == full[1] and all(h < f for h, f in zip(half, full)) and all(h % 3 == 0 for h in half)
    tests = [{r["id"] for r in _rows(stage_dir / "repeats" / row["label"] / "predictions.csv")
              if r["split"] == "test"} for row in rows]
    assert all(t == tests[0] for t in tests)  # the same test images for every fraction and draw
    trains = [{r["id"] for r in _rows(stage_dir / "repeats" / row["label"] / "splits.csv") if r["split"] == "train"}
              for row in rows[:2]]
    assert trains[0] != trains[1]  # two different draws at 50%
    proto = json.loads((stage_dir / "metrics.json").read_text())["protocol"]
    assert proto["headline"] == "training fraction 1" and proto["representative"] == "fraction-1-draw-1"
    assert [b["fraction"] for b in proto["by_fraction"]] == [0.5, 1.0]
    assert proto["by_fraction"][0]["auc_macro"]["values"] == [r["auc_macro"] for r in rows[:2]]


def test_protocol_config_errors(tmp_path, patients_plugin):
    with pytest.raises(mltl.ConfigError, match=r"stages\[0\].split.seeds: split.seeds repeats a holdout split"):
        mltl.run(_config(tmp_path, 'split = { protocol = "kfold", seeds = 3 }'), out=tmp_path / "a")
    with pytest.raises(mltl.ConfigError, match=r"stages\[0\].split.fractions: .*distinct fractions in \(0, 1\]"):
        mltl.load_config(_config(tmp_path, 'split = { protocol = "fractions", fractions = [0.5, 1.5] }'))
    with pytest.raises(mltl.ConfigError, match=r"stages\[0\].split.folds: 1 must be at least 2"):
        mltl.load_config(_config(tmp_path, 'split = { folds = 1 }'))
    with pytest.raises(mltl.UserError, match=r'class "clear" has 2 image group\(s\); 5-fold cross-validation'):
        mltl.run(_config(tmp_path, n_patients=4), out=tmp_path / "b")


@pytest.mark.slow
def test_saved_split_is_reused_by_a_later_run_and_checked(tmp_path, patients_plugin):
    first = mltl.run(_config(tmp_path, 'split = { protocol = "holdout", seeds = 2 }'), out=tmp_path / "one")
    seeds = json.loads((first.run_dir / "target/metrics.json").read_text())["protocol"]
    assert seeds["name"] == "holdout" and seeds["n_repeats"] == 2
    a = (first.run_dir / "target/repeats/seed-1/splits.csv").read_text()
    assert a == (first.run_dir / "target/repeats/seed-2/splits.csv").read_text()  # seeds share the split
    saved = first.run_dir / "target/splits.csv"
    second = mltl.run(_config(tmp_path, f'split = {{ protocol = "holdout", seed = 99, file = "{saved}" }}'),
                      out=tmp_path / "two")
    assert (second.run_dir / "target/splits.csv").read_text() == a  # split.seed 99 ignored: the file rules
    broken = tmp_path / "broken.csv"
    broken.write_text("".join(a.splitlines(keepends=True)[:10]))
    with pytest.raises(mltl.UserError, match=r"split.file .*broken.csv assigns no split to 27 of the domain's 36 "
                                             r"images \(first: .*\); the data changed"):
        mltl.run(_config(tmp_path, f'split = {{ protocol = "holdout", file = "{broken}" }}'), out=tmp_path / "c")


def test_a_split_the_data_cannot_make_fails_before_any_training(tmp_path, tiny_config):
    cfg = mltl.load_config(tiny_config(), ["stages.target.domain.images_per_class=4", "stages.target.split.test=0.5", "stages.target.split.val=0.5"])
    with pytest.raises(mltl.UserError, match=r'stages\[2\] \(ct-phantom\): class "normal" has no training images left'):
        mltl.run(cfg, out=tmp_path / "run")
    assert not (tmp_path / "run").exists()  # found before the source stage trained, nothing written
