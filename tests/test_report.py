"""Evaluation reporting: metrics recomputed from predictions.csv, case level, calibration, figures,
report.html, `mltl report`, Grad-CAM and the metrics log (mltl-roc and mltl.evaluation.report)."""

import base64
import csv
import io
import json
import os
import re
import shutil
import sys

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score

import mltl
from mltl import cli
from mltl.evaluation.report import parse_reporter_options, regenerate
from mltl_roc.evaluation import calibration, case_level, image_metrics
from mltl_roc.figures import plot_learning_curve, summarise_repeats

STAGES = ("source", "intermediate", "target")


def read_csv(path, split="test"):
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == split]
    return rows


def arrays(rows, classes):
    y = np.array([classes.index(r["label"]) for r in rows])
    p = np.array([[float(r[f"p_{c}"]) for c in classes] for r in rows])
    return y, p


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The tests' tiny three-stage chain (conftest TINY) with every installed reporter."""
    from tests.conftest import TINY

    tmp = tmp_path_factory.mktemp("report")
    cfg = tmp / "tiny.toml"
    cfg.write_text(TINY.format(target_freeze="none"))
    return mltl.run(cfg, out=tmp / "run", device="cpu")


class GroupedPhantom:
    """A binary CT-phantom domain whose images come in patients of three (raw ids "patient-N")."""

    @mltl.hookimpl
    def register_domains(self, register):
        def grouped(*, image_size: int = 64):
            base = mltl.get_registry().create("domain", "ct-phantom", {
                "classes": ["normal", "cyst"], "images_per_class": 18, "seed": 5}, extra={"image_size": image_size})
            groups = [f"patient-{int(lab)}-{i // 3}" for i, lab in enumerate(base.labels)]
            return mltl.Domain(classes=base.classes, images=base.images, labels=base.labels, ids=base.ids,
                               groups=groups)

        register("grouped-phantom", grouped)


BINARY = """
[run]
name = "binary"
seed = 5
reporters = ["evaluation", "roc", "metrics-log"]

[input]
size = 48
channels = 1

[[stages]]
name = "only"
domain = { plugin = "grouped-phantom" }
backbone = "gfe-1"
split = { protocol = "holdout", val = 0.25, test = 0.35 }
train = { epochs = 2, batch_size = 16, optimizer = "adamw", lr = 0.002 }
"""


@pytest.fixture(scope="module")
def binary_run(tmp_path_factory):
    """One binary stage on a domain with patient groups (raw ids, salted by MLTL_SALT)."""
    from mltl import plugins

    tmp = tmp_path_factory.mktemp("binary")
    cfg = tmp / "binary.toml"
    cfg.write_text(BINARY)
    old = os.environ.get("MLTL_SALT")
    os.environ["MLTL_SALT"] = "test-salt"
    plugins.register_plugin(GroupedPhantom(), name="grouped-phantom-test")
    try:
        yield mltl.run(cfg, out=tmp / "run", device="cpu")
    finally:
        plugins.unregister_plugin("grouped-phantom-test")
        if old is None:
            os.environ.pop("MLTL_SALT", None)
        else:
            os.environ["MLTL_SALT"] = old


# ------------------------------------------------------------------ metrics from predictions.csv


def check_stage_against_sklearn(stage_dir):
    m = json.loads((stage_dir / "metrics.json").read_text())
    classes = m["classes"]
    y, p = arrays(read_csv(stage_dir / "predictions.csv"), classes)
    assert len(y) == m["n_test"] > 0
    if len(classes) == 2:
        auc = roc_auc_score(y, p[:, 1])
    else:
        auc = np.mean([roc_auc_score(y == k, p[:, k]) for k in np.unique(y)])
    assert abs(m["auc_macro"] - auc) <= 1e-9
    assert abs(m["accuracy"] - accuracy_score(y, p.argmax(1))) <= 1e-9
    ev = json.loads((stage_dir / "evaluation.json").read_text())["image"]
    assert abs(ev["auc_macro"] - auc) <= 1e-9
    onehot = (y[:, None] == np.arange(len(classes))).astype(int)
    assert abs(ev["auc_micro"] - roc_auc_score(onehot.ravel(), p.ravel())) <= 1e-9
    assert abs(ev["balanced_accuracy"] - balanced_accuracy_score(y, p.argmax(1))) <= 1e-9
    pred = p.argmax(1)
    for k, c in enumerate(classes):
        tp, fn = np.sum((y == k) & (pred == k)), np.sum((y == k) & (pred != k))
        tn, fp = np.sum((y != k) & (pred != k)), np.sum((y != k) & (pred == k))
        got = ev["per_class"][c]
        assert (got["tp"], got["fn"], got["tn"], got["fp"]) == (tp, fn, tn, fp)
        if tp + fn:
            assert abs(got["sensitivity"] - tp / (tp + fn)) <= 1e-12
        if tn + fp:
            assert abs(got["specificity"] - tn / (tn + fp)) <= 1e-12
    lo, hi = ev["auc_macro_ci95"]
    assert lo <= hi


@pytest.mark.parametrize("stage", STAGES)
def test_metrics_json_equals_sklearn_on_predictions_csv_multiclass(tiny_run, stage):
    check_stage_against_sklearn(tiny_run.run_dir / stage)


def test_metrics_json_equals_sklearn_on_predictions_csv_binary(binary_run):
    check_stage_against_sklearn(binary_run.run_dir / "only")


def test_image_metrics_micro_auc_is_pooled_one_vs_rest():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 80)
    p = rng.dirichlet(np.ones(4), 80)
    got = image_metrics(y, p, list("abcd"))
    onehot = (y[:, None] == np.arange(4)).astype(int)
    assert got["auc_micro"] == pytest.approx(roc_auc_score(onehot.ravel(), p.ravel()), abs=1e-12)
    assert got["auc_macro"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr"), abs=1e-12)


# ----------------------------------------------------------------------------------- case level


def test_case_level_auc_on_a_hand_made_example():
    # three cases: A (2 images of class 1), B (1 image of class 0), C (3 images of class 0, one suspicious)
    groups = ["A", "A", "B", "C", "C", "C"]
    y = np.array([1, 1, 0, 0, 0, 0])
    p1 = np.array([0.9, 0.3, 0.2, 0.1, 0.1, 0.95])
    probs = np.column_stack([1 - p1, p1])
    mean = case_level(groups, y, probs, ["no", "yes"], aggregate="mean", n_resamples=50)
    # mean p1: A 0.6, B 0.2, C 0.3833 -> the positive case outranks both negatives: AUC 1
    assert mean["n_cases"] == 3 and mean["cases"]["keys"] == ["A", "B", "C"]
    assert mean["cases"]["labels"] == [1, 0, 0]
    assert mean["cases"]["probs"][2][1] == pytest.approx((0.1 + 0.1 + 0.95) / 3)
    assert mean["auc_macro"] == pytest.approx(1.0)
    assert mean["accuracy"] == pytest.approx(1.0)  # A 0.6 -> yes; B 0.2 and C 0.383 -> no: all right
    # max p1: A 0.9, B 0.2, C 0.95 -> the negative case C outranks A: AUC 1/2, and C is called positive
    mx = case_level(groups, y, probs, ["no", "yes"], aggregate="max", n_resamples=50)
    assert mx["auc_macro"] == pytest.approx(0.5)
    assert mx["accuracy"] == pytest.approx(2 / 3)
    # image level for contrast: 2 positives x 4 negatives, 6 of the 8 pairs ordered right (0.95 beats both)
    assert roc_auc_score(y, p1) == pytest.approx(6 / 8)
    assert mean["n_mixed_label_cases"] == 0


def test_case_label_is_the_majority_and_mixed_cases_are_counted():
    got = case_level(["x", "x", "x", "y", "y"], [2, 2, 1, 0, 0], np.full((5, 3), 1 / 3), ["a", "b", "c"],
                     n_resamples=10)
    assert got["cases"]["labels"] == [2, 0] and got["n_mixed_label_cases"] == 1
    with pytest.raises(ValueError, match="aggregate"):
        case_level(["x"], [0], np.array([[0.5, 0.5]]), ["a", "b"], aggregate="median")


def test_group_column_holds_salted_case_keys_and_case_auc_is_reported(binary_run):
    d = binary_run.run_dir / "only"
    text = (d / "predictions.csv").read_text()
    assert "patient-" not in text  # raw ids never reach the file
    rows = read_csv(d / "predictions.csv")
    assert all(re.fullmatch(r"p-[0-9a-f]{16}", r["group"]) for r in rows)
    # images of one patient share a key: the domain made patients of three images of one class
    from mltl.data.privacy import pseudonym

    splits = {r["id"]: r for r in read_csv(d / "splits.csv", "test")}
    assert set(splits) == {r["id"] for r in rows}
    by_key = {}
    for r in rows:
        by_key.setdefault(r["group"], set()).add(r["label"])
    assert all(len(v) == 1 for v in by_key.values()) and len(by_key) < len(rows)
    assert pseudonym("patient-0-0", b"test-salt").startswith("p-")
    ev = json.loads((d / "evaluation.json").read_text())
    case = ev["case"]
    assert case["aggregate"] == "mean" and case["n_cases"] == len(by_key) and case["n_images"] == len(rows)
    # recompute the case AUC by hand from predictions.csv
    keys = list(dict.fromkeys(r["group"] for r in rows))
    y = np.array([0 if next(r for r in rows if r["group"] == k)["label"] == "normal" else 1 for k in keys])
    score = np.array([np.mean([float(r["p_cyst"]) for r in rows if r["group"] == k]) for k in keys])
    assert case["auc_macro"] == pytest.approx(roc_auc_score(y, score), abs=1e-12)
    report = (binary_run.run_dir / "report.md").read_text()
    assert "### Case level" in report and "case AUC (95% CI)" in report


def test_predictions_without_groups_leave_the_column_empty(tiny_run):
    rows = read_csv(tiny_run.run_dir / "source" / "predictions.csv", "val")
    assert rows and all(r["group"] == "" for r in rows)
    assert tiny_run.stage("source").test.groups is None


# ---------------------------------------------------------------------------------- calibration


def slow_calibration(y, probs, n_bins):
    """Loops over images and bins; binary: column 1 vs class 1, else top-label confidence vs correctness."""
    n, k = len(probs), len(probs[0])
    pairs = []
    for i in range(n):
        if k == 2:
            pairs.append((probs[i][1], 1.0 if y[i] == 1 else 0.0))
        else:
            top = max(range(k), key=lambda j: probs[i][j])
            pairs.append((probs[i][top], 1.0 if top == y[i] else 0.0))
    ece = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        members = [(c, o) for c, o in pairs if (lo <= c < hi) or (b == n_bins - 1 and c == 1.0)]
        if members:
            conf = sum(c for c, _ in members) / len(members)
            obs = sum(o for _, o in members) / len(members)
            ece += len(members) / n * abs(obs - conf)
    brier = 0.0
    for i in range(n):
        if k == 2:
            brier += (probs[i][1] - (1.0 if y[i] == 1 else 0.0)) ** 2
        else:
            brier += sum((probs[i][j] - (1.0 if y[i] == j else 0.0)) ** 2 for j in range(k))
    return ece, brier / n


@pytest.mark.parametrize("k", [2, 3, 5])
def test_ece_and_brier_against_a_slow_reference(k):
    rng = np.random.default_rng(k)
    y = rng.integers(0, k, 150)
    probs = rng.dirichlet(np.ones(k) * 0.7, 150)
    probs[:4] = np.eye(k)[y[:4]]  # confidence exactly 1.0: the last, closed bin
    if k == 2:
        probs[4:8] = [[0.7, 0.3], [0.8, 0.2], [0.5, 0.5], [0.1, 0.9]]  # on bin edges
    got = calibration(y, probs, [f"c{j}" for j in range(k)], n_bins=10)
    ece, brier = slow_calibration(y, probs.tolist(), 10)
    assert got["ece"] == pytest.approx(ece, abs=1e-12)
    assert got["brier"] == pytest.approx(brier, abs=1e-12)
    assert sum(b["count"] for b in got["bins"]) == 150


def test_a_calibrated_model_has_small_ece():
    rng = np.random.default_rng(1)
    p = rng.uniform(0, 1, 20000)
    y = (rng.uniform(0, 1, 20000) < p).astype(int)
    got = calibration(y, np.column_stack([1 - p, p]), ["n", "y"])
    assert got["ece"] < 0.02
    worse = calibration(y, np.column_stack([1 - p ** 3, p ** 3]), ["n", "y"])
    assert worse["ece"] > 0.1 and worse["brier"] > got["brier"]


# --------------------------------------------------------------------------- figures and report


def assert_png(path, min_side=200):
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and min(im.size) >= min_side
        arr = np.asarray(im.convert("L"))
    assert arr.std() > 5  # not a blank canvas


def test_every_figure_is_a_valid_png(tiny_run):
    d = tiny_run.run_dir
    assert_png(d / "roc_stages.png")
    for stage in STAGES:
        for name in ("roc.png", "training.png", "calibration.png", "gradcam.png"):
            assert_png(d / stage / name)
        cal = json.loads((d / stage / "calibration.json").read_text())
        assert {"ece", "brier", "bins", "binning"} <= set(cal)


def test_report_html_is_self_contained_and_holds_the_tables(tiny_run):
    d = tiny_run.run_dir
    page = (d / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>")
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//|[^"'#d])""", page)  # no link to another file
    assert "<link" not in page and "<script" not in page and "@import" not in page
    images = re.findall(r'<img [^>]*src="data:image/png;base64,([^"]+)"', page)
    n_png = len(list(d.glob("*.png"))) + sum(len(list((d / s).glob("*.png"))) for s in STAGES)
    assert len(images) == n_png
    for data in images:
        with Image.open(io.BytesIO(base64.b64decode(data))) as im:
            assert im.format == "PNG"
    for text in ("Summary", "Test metrics", "macro ROC AUC (95% CI)", "micro ROC AUC", "sensitivity",
                 "specificity", "true \\ predicted", "Calibration", "Selection among variants", "Figures"):
        assert text in page, text
    m = json.loads((d / "target" / "metrics.json").read_text())
    assert f"{m['confusion_matrix'][0][0]}</td>" in page
    md = (d / "report.md").read_text()
    assert "Test metrics" in md and "(target/roc.png)" in md and "data:image" not in md
    if m.get("protocol"):  # the target of a small dataset defaults to k-fold
        assert "Repeats (" in md and "every test AUC" in md and "pooled out-of-fold" in md


def test_metrics_log_has_one_json_line_per_epoch(tiny_run):
    d = tiny_run.run_dir
    lines = (d / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert {r["stage"] for r in rows} == set(STAGES)
    assert all({"time", "stage", "variant", "epoch", "metrics"} <= set(r) for r in rows)
    source = [r for r in rows if r["stage"] == "source"]
    for label, vdir in (("backbone=gfe-1", "backbone=gfe-1"), ("backbone=gfe-2", "backbone=gfe-2")):
        history = json.loads((d / "source" / "variants" / vdir / "history.json").read_text())
        mine = [r for r in source if r["variant"] == label]
        assert [r["epoch"] for r in mine] == [h["epoch"] for h in history]
        assert [r["metrics"]["loss"] for r in mine] == pytest.approx([h["loss"] for h in history])


def test_metrics_log_appends_when_a_run_resumes(tmp_path):
    from mltl_roc.reporter import MetricsLogReporter

    for epoch in (1, 2):  # two processes, e.g. a run and its --resume
        log = MetricsLogReporter()
        log.stage_started("s", tmp_path / "s")
        log.epoch_ended("s", "", epoch, {"loss": 0.5, "val_auc": float("nan")})
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and rows[0]["metrics"]["val_auc"] is None
    assert rows[0]["variant"] is None


def test_mltl_report_regenerates_identical_metrics(tiny_run, capsys):
    d = tiny_run.run_dir
    before = {s: {n: (d / s / n).read_bytes() for n in ("metrics.json", "evaluation.json", "roc.json",
                                                          "calibration.json", "predictions.csv")} for s in STAGES}
    (d / "report.html").unlink()
    for s in STAGES:
        (d / s / "roc.png").unlink()
    assert cli.main(["report", str(d), "--reporters", "evaluation,roc"]) == 0
    assert str(d / "report.html") in capsys.readouterr().out
    for s in STAGES:
        for name, data in before[s].items():
            assert (d / s / name).read_bytes() == data, f"{s}/{name} changed"
        assert_png(d / s / "roc.png")
    assert "Test metrics" in (d / "report.html").read_text()


def test_mltl_report_lists_unfinished_stages_of_an_interrupted_run(tiny_run, tmp_path):
    d = tmp_path / "interrupted"
    shutil.copytree(tiny_run.run_dir, d)
    (d / "target" / "metrics.json").unlink()  # as if interrupted during the target stage
    done = regenerate(d, reporters=["evaluation"], reporter_options={"evaluation": {"n_resamples": 50}})
    assert done.finished == ("source", "intermediate") and done.unfinished == ("target",)
    md = (d / "report.md").read_text()
    assert "**Unfinished stages**" in md and "target" in md and "## Stage `target`" not in md
    ev = json.loads((d / "source" / "evaluation.json").read_text())
    assert ev["n_resamples"] == 50


def test_mltl_report_errors_are_one_line(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not an mltl run directory (no config.toml)" in err
    with pytest.raises(mltl.UserError, match="REPORTER.OPTION=VALUE"):
        parse_reporter_options(["case_aggregate=max"])
    assert parse_reporter_options(["evaluation.case_aggregate=max", "roc.n_resamples=20"]) == {
        "evaluation": {"case_aggregate": "max"}, "roc": {"n_resamples": 20}}


def test_mltl_report_rejects_bad_reporter_options(tiny_run, capsys):
    d = str(tiny_run.run_dir)
    assert cli.main(["report", d, "--reporters", "evaluation", "--set", "evaluation.case_agregate=max"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "case_agregate" in err and "case_aggregate" in err
    assert cli.main(["report", d, "--reporters", "evaluation", "--set", "evaluation.case_aggregate=median"]) == 2
    assert 'case_aggregate must be "mean" or "max"' in capsys.readouterr().err


# ------------------------------------------------------------------------------------ repeats


def synthetic_repeats():
    rng = np.random.default_rng(7)
    rows = []
    for fraction, base in ((0.1, 0.62), (0.25, 0.7), (0.5, 0.78), (1.0, 0.84)):
        for draw in range(1, 6):
            rows.append({"fraction": fraction, "fold": None, "draw": draw, "seed": 100 + draw,
                         "n_train": int(200 * fraction), "auc_macro": float(base + rng.normal(0, 0.03)),
                         "accuracy": float(base - 0.1 + rng.normal(0, 0.03))})
    return rows


def test_learning_curve_and_repeats_table_from_a_synthetic_repeats_json(tiny_run, tmp_path):
    rows = synthetic_repeats()
    summary = summarise_repeats(rows)
    assert [s["fraction"] for s in summary] == [0.1, 0.25, 0.5, 1.0]
    for s in summary:
        values = [r["auc_macro"] for r in rows if r["fraction"] == s["fraction"]]
        assert s["auc_mean"] == pytest.approx(np.mean(values)) and s["auc_sd"] == pytest.approx(np.std(values, ddof=1))
        assert s["auc_values"] == values and s["n_repeats"] == 5
    plot_learning_curve(rows, tmp_path / "lc.png")
    assert_png(tmp_path / "lc.png")
    with pytest.raises(ValueError, match="fraction"):
        plot_learning_curve([{**r, "fraction": None} for r in rows], tmp_path / "none.png")
    # the report of a run whose stage holds that repeats.json: table with mean +/- SD and every value, figure
    d = tmp_path / "run"
    shutil.copytree(tiny_run.run_dir, d)
    (d / "target" / "repeats.json").write_text(json.dumps({"protocol": "fractions", "rows": rows}))
    regenerate(d, reporters=["evaluation"], reporter_options={"evaluation": {"n_resamples": 20}})
    assert_png(d / "target" / "learning_curve.png")
    md = (d / "report.md").read_text()
    s = summary[0]
    assert f"| 0.1 | 5 | 20.0 | {s['auc_mean']:.3f} ± {s['auc_sd']:.3f} |" in md
    assert ", ".join(f"{v:.3f}" for v in s["auc_values"]) in md
    assert "learning_curve.png" in md and "Repeats (fractions, 20 runs)" in md


# ----------------------------------------------------------------------------------- Grad-CAM


def test_gradcam_heatmap_has_the_input_shape_and_is_not_constant(tiny_run):
    from mltl.running.rundir import load_network
    from mltl.config import InputConfig
    from mltl.data.domain import prepare_images
    from mltl.training.train import normalise
    from mltl_roc.gradcam import gradcam_maps, last_conv_group

    d = tiny_run.run_dir / "source"
    net = load_network(d / "model.safetensors", mltl.get_registry())
    info = json.loads((d / "model.json").read_text())
    inp = InputConfig(**info["input"])
    dom = mltl.get_registry().create("domain", "fractal", info["domain"]["options"], extra={"image_size": inp.size})
    x = normalise(prepare_images(dom.images[:6], size=inp.size, channels=inp.channels), inp)
    targets = net.eval()(x).argmax(1).tolist()
    maps = gradcam_maps(net, x, targets)
    assert last_conv_group(net) == "C2"
    assert maps.shape == (6, inp.size, inp.size)
    assert np.all(maps >= 0) and maps.max() > 0
    assert all(m.std() > 0 for m in maps if m.max() > 0)
    record = json.loads((d / "gradcam.json").read_text())
    assert "skipped" not in record and record["max_probability_difference"] < 1e-5
    assert {c["kind"] for c in record["images"]} <= {"correct", "wrong"}


def test_gradcam_reporter_without_captum_leaves_a_note(tiny_run, tmp_path, monkeypatch):
    from mltl_roc.reporter import GradCamReporter

    d = tmp_path / "stage"
    shutil.copytree(tiny_run.run_dir / "target", d)
    (d / "gradcam.png").unlink()
    monkeypatch.setitem(sys.modules, "captum.attr", None)  # import fails as if captum were not installed
    result = tiny_run.stage("target")
    GradCamReporter().stage_finished(type(result)(name="target", stage_dir=d, classes=result.classes,
                                                  test=result.test, metrics=result.metrics))
    note = json.loads((d / "gradcam.json").read_text())
    assert "pip install captum" in note["skipped"] and not (d / "gradcam.png").exists()


def test_reporter_options_are_checked():
    from mltl_roc.reporter import EvaluationReporter, GradCamReporter, MetricsLogReporter

    with pytest.raises(mltl.UserError, match="case_aggregate"):
        EvaluationReporter(case_aggregate="median")
    with pytest.raises(mltl.UserError, match="per_class"):
        GradCamReporter(per_class=-1)
    with pytest.raises(mltl.UserError, match="plain file name"):
        MetricsLogReporter(file="../x.jsonl")


@pytest.mark.slow
def test_reporter_options_in_the_config_reach_the_reporters_and_mltl_report(tmp_path, capsys):
    from tests.conftest import TINY

    cfg = tmp_path / "tiny.toml"
    cfg.write_text(TINY.format(target_freeze="none").replace(
        'seed = 3\n', 'seed = 3\nreporter_options = { evaluation = { n_resamples = 37, case_aggregate = "max" } }\n'))
    # checked by mltl validate, before any data: unknown option, a reporter the run does not use, a bad value
    for value, expected in [('{ evaluation = { case_agregate = "max" } }', 'did you mean "case_aggregate"'),
                            ('{ tensorboard = { log_dir = "tb" } }', "which this run does not use"),
                            ('{ nosuch = {} }', "run.reporter_options.nosuch"),
                            ('{ roc = { n_resamples = -1 } }', "n_resamples must be a positive integer"),
                            ('{ roc = 5 }', "expected a table of options")]:
        code = cli.main(["validate", str(cfg), "--set", f"run.reporter_options={value}"])
        err = capsys.readouterr().err
        assert code == 2 and expected in err and "run.reporter_options" in err and err.count("\n") == 1, (value, err)
    run = mltl.run(cfg, out=tmp_path / "run", device="cpu")
    ev = json.loads((run.run_dir / "target" / "evaluation.json").read_text())
    assert ev["n_resamples"] == 37
    # mltl report replays with the run's own options; --set changes one option and keeps the others
    regenerate(run.run_dir, reporters=["evaluation"], reporter_options={"evaluation": {"seed": 4}})
    ev = json.loads((run.run_dir / "target" / "evaluation.json").read_text())
    assert ev["n_resamples"] == 37 and ev["seed"] == 4
