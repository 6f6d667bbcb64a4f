"""Reports never mix levels (one fold; mean +/- SD over folds; pooled out-of-fold predictions), and the run
report opens with the chain against the last stage trained from scratch (``[run] baseline = "scratch"``).

Most tests build run directories from recorded (synthetic) predictions with the chain's own code for the
repeated protocols (:func:`mltl.running.protocols.summarise_repeats`), so nothing is trained; the slow one
trains a tiny real chain with a baseline."""

import csv
import json
import re
import tomllib
from pathlib import Path

import attrs
import mltl
import numpy as np
import pytest
from mltl import cli
from mltl.config import SplitConfig, parse_config
from mltl.evaluation.metrics import classification_metrics
from mltl.evaluation.report import headline, write_report
from mltl.evaluation.stats import bootstrap_auc_ci, delong_test, paired_bootstrap, paired_bootstrap_over_draws
from mltl.running.compare import chains, paired_difference, verdict, write_comparison
from mltl.running.protocols import plan_repeats, summarise_repeats
from mltl.running.rundir import StageFiles, predictions_csv, write_json_atomic, write_text_atomic
from sklearn.metrics import accuracy_score, confusion_matrix, roc_auc_score

CLASSES = ("normal", "cyst", "calculi")
N = 60  # test images of the target (k-fold: all of them, each in one fold)
BOOT = {"n_resamples": 200, "seed": 3}


def probs_for(labels, separation, rng):
    logits = rng.normal(size=(len(labels), len(CLASSES)))
    logits[np.arange(len(labels)), labels] += separation
    return np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)


def fake_stage(run_dir: Path, name: str, protocol: str, separation: float, seed: int, *, groups: bool = False,
               n_repeats: int = 3) -> mltl.StageResult:
    """A finished stage as the chain writes it, from synthetic predictions: ``holdout`` (one test split of N
    images), ``kfold`` (N images in ``n_repeats`` folds, oof_predictions.csv) or ``seeds`` (``n_repeats`` runs
    tested on the same N images). The labels and ids are the same for every stage, so stages pair."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(CLASSES)), N // len(CLASSES))
    ids = tuple(f"img{i:03d}" for i in range(N))
    keys = tuple(f"p-{i // 2:016x}" for i in range(N)) if groups else None  # cases of two images
    stage_dir = run_dir / name
    files = StageFiles(stage_dir)

    def preds(idx, sep_rng):
        return mltl.Predictions(ids=tuple(ids[i] for i in idx), split="test", labels=labels[idx],
                                probs=probs_for(labels[idx], separation, sep_rng), classes=CLASSES,
                                groups=None if keys is None else tuple(keys[i] for i in idx))

    def metrics_of(pred, **extra):
        m = classification_metrics(pred.labels, pred.probs, CLASSES)
        return {**m, "classes": list(CLASSES), "n_test": len(pred), "select_by": "auc", "domain": "ct-phantom",
                "start": "new gfe-1", "frozen": [], "val": {"selection_value": 0.7}, "selected_variant": None,
                "n_images": {"train": 2 * len(pred), "val": len(pred) // 2, "test": len(pred)},
                "train_seconds": 1.0, **extra}

    if protocol == "holdout":
        test = preds(np.arange(N), rng)
        stage_dir.mkdir(parents=True)
        write_text_atomic(files.predictions, predictions_csv([test]))
        return mltl.StageResult(name=name, stage_dir=stage_dir, classes=CLASSES, test=test, metrics=metrics_of(test))
    split = SplitConfig(folds=n_repeats) if protocol == "kfold" else SplitConfig(protocol="holdout", seeds=n_repeats)
    repeats = plan_repeats(split, "kfold" if protocol == "kfold" else "holdout")
    rows, tests = [], []
    for k, rep in enumerate(repeats):
        idx = np.flatnonzero(np.arange(N) % n_repeats == k) if protocol == "kfold" else np.arange(N)
        test = preds(idx, np.random.default_rng([seed, k]))
        rfiles = files.repeat(rep.label)
        rfiles.root.mkdir(parents=True)
        write_text_atomic(rfiles.predictions, predictions_csv([test]))
        m = metrics_of(test)
        rows.append({**rep.row(), "seed": 100 + k, "n_train": m["n_images"]["train"], "n_test": len(test),
                     "auc_macro": m["auc_macro"], "accuracy": m["accuracy"],
                     "balanced_accuracy": m["balanced_accuracy"], "train_seconds": 1.0})
        tests.append(test)
    summary = summarise_repeats("kfold" if protocol == "kfold" else "holdout", rows, list(repeats), tests)
    oof = summary.pop("pooled_csv", None)
    if oof is not None:
        write_text_atomic(files.oof_predictions, oof)
    write_json_atomic(files.repeats_json, {"protocol": summary["name"], "rows": rows})
    test = tests[0]  # the representative repeat's files are the stage's own
    write_text_atomic(files.predictions, predictions_csv([test]))
    metrics = json.loads(json.dumps(metrics_of(test, protocol=summary)))
    return mltl.StageResult(name=name, stage_dir=stage_dir, classes=CLASSES, test=test, metrics=metrics)


def table_rows(md: str, first_header: str) -> list[dict[str, str]]:
    """The rows of the first markdown table whose header starts with ``first_header``, as dicts."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    header = [c.strip() for c in lines[start].strip("|").split(" | ")]
    out = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        out.append(dict(zip(header, (c.strip() for c in line.strip().strip("|").split(" | ")))))
    return out


def oof_arrays(stage_dir: Path):
    with open(stage_dir / "oof_predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    y = np.array([CLASSES.index(r["label"]) for r in rows])
    p = np.array([[float(r[f"p_{c}"]) for c in CLASSES] for r in rows])
    return y, p, [r["group"] for r in rows]


def macro(y, p):
    return float(np.mean([roc_auc_score(y == k, p[:, k]) for k in np.unique(y)]))


def ci_cell(auc, ci):
    return f"{auc:.3f} ({ci[0]:.3f}-{ci[1]:.3f})"


RAW = {"run": {"name": "levels", "baseline": "scratch", "reporter_options": {"evaluation": dict(BOOT)}},
       "stages": [{"name": "source"}, {"name": "target"}]}


@pytest.fixture(scope="module")
def kfold_run(tmp_path_factory):
    """A run directory: a holdout source, a 3-fold target with patient groups and its 3-fold baseline; the
    mltl-roc reporters replayed on the k-fold stages, then the report written."""
    from mltl_roc.reporter import EvaluationReporter, RocReporter

    run_dir = tmp_path_factory.mktemp("levels") / "run"
    stages = [fake_stage(run_dir, "source", "holdout", 1.0, 1),
              fake_stage(run_dir, "target-scratch", "kfold", 0.4, 2, groups=True),
              fake_stage(run_dir, "target", "kfold", 1.2, 3, groups=True)]
    for s in stages[1:]:  # the source's CI comes from the report itself (the same bootstrap settings)
        EvaluationReporter(**BOOT).stage_finished(s)
    RocReporter(**BOOT).stage_finished(stages[2])
    write_report(run_dir, RAW, stages, {})
    return run_dir, stages


def test_every_number_in_the_summary_row_is_of_the_level_its_header_names(kfold_run):
    run_dir, stages = kfold_run
    md = (run_dir / "report.md").read_text()
    rows = {r["stage"]: r for r in table_rows(md, "stage")}
    assert set(rows) == {"source", "target", "target-scratch (baseline: from scratch)"}
    level = "evaluated on (the level of the next columns)"
    for name in ("target", "target-scratch"):
        row = rows[name if name == "target" else "target-scratch (baseline: from scratch)"]
        d = run_dir / name
        y, p, groups = oof_arrays(d)
        assert row[level] == f"pooled out-of-fold ({N} images, 3 folds)"
        auc = macro(y, p)
        # a CI, of the pooled AUC: the cluster bootstrap (whole cases resampled), as the domain has patients
        assert row["test AUC (95% CI)"] == ci_cell(auc, bootstrap_auc_ci(y, p, **BOOT, groups=groups))
        assert row["test accuracy"] == f"{accuracy_score(y, p.argmax(1)):.3f}"  # pooled, not fold 1's
        repeats = [r["auc_macro"] for r in json.loads((d / "repeats.json").read_text())["rows"]]
        assert row["test AUC mean ± SD over repeats"] == \
            f"{np.mean(repeats):.3f} ± {np.std(repeats, ddof=1):.3f} over 3 folds"
        n = next(s for s in stages if s.name == name).metrics["n_images"]  # the representative fold's
        assert row["train / val / test"] == f"{n['train']} / {n['val']} / {n['test']} (fold-1)"
        # the case column is of the pooled predictions too: cases = groups, mean of their images' probabilities
        keys = list(dict.fromkeys(groups))
        cy = np.array([y[[g == k for g in groups]][0] for k in keys])
        cp = np.array([p[[g == k for g in groups]].mean(axis=0) for k in keys])
        assert row["case AUC (95% CI)"].startswith(f"{macro(cy, cp):.3f} (")
    src = rows["source"]
    with open(run_dir / "source" / "predictions.csv", newline="") as f:
        test = [r for r in csv.DictReader(f) if r["split"] == "test"]
    y = np.array([CLASSES.index(r["label"]) for r in test])
    p = np.array([[float(r[f"p_{c}"]) for c in CLASSES] for r in test])
    assert src[level] == f"test split ({N} images)"
    assert src["test AUC (95% CI)"] == ci_cell(macro(y, p), bootstrap_auc_ci(y, p, **BOOT))
    assert src["test accuracy"] == f"{accuracy_score(y, p.argmax(1)):.3f}"
    assert src["test AUC mean ± SD over repeats"] == "-" and src["case AUC (95% CI)"] == "-"  # no cases there
    html = (run_dir / "report.html").read_text()
    assert f"<td>pooled out-of-fold ({N} images, 3 folds)</td>" in html


def test_the_pooled_section_shows_pooled_numbers_and_the_fold_section_says_so(kfold_run):
    run_dir, stages = kfold_run
    md = (run_dir / "report.md").read_text()
    target = md[md.index("## Stage `target`"):]
    y, p, groups = oof_arrays(run_dir / "target")
    pooled = target[target.index("### Pooled out-of-fold predictions"):target.index("### Repeats (kfold, 3 runs)")]
    cm = confusion_matrix(y, p.argmax(1), labels=[0, 1, 2])
    for k, c in enumerate(CLASSES):  # the pooled confusion matrix, from oof_predictions.csv
        assert f"| **{c}** | " + " | ".join(str(v) for v in cm[k]) + " |" in pooled
    assert f"| macro ROC AUC (95% CI) | {ci_cell(macro(y, p), bootstrap_auc_ci(y, p, **BOOT, groups=groups))} |" \
        in pooled
    assert "![roc_pooled](target/roc_pooled.png)" in pooled
    assert "Pooled out-of-fold, case level" in pooled
    fold = target[target.index("### Test metrics (representative repeat `fold-1`"):]
    t = stages[2].test
    cm1 = confusion_matrix(t.labels, t.probs.argmax(1), labels=[0, 1, 2])
    fold_cm = fold[fold.index("| true \\ predicted"):]
    assert f"| **{CLASSES[0]}** | " + " | ".join(str(v) for v in cm1[0]) + " |" in fold_cm
    assert "fold-1: confusion matrix" in fold_cm
    assert "### Calibration (fold-1)" in target and "### Case level (fold-1)" in target


def test_the_first_screen_gives_chain_against_scratch_with_a_paired_ci(kfold_run):
    run_dir, _ = kfold_run
    md = (run_dir / "report.md").read_text()
    y, pa, groups = oof_arrays(run_dir / "target")
    _, pb, _ = oof_arrays(run_dir / "target-scratch")
    boot = paired_bootstrap(y, pa, pb, classes=CLASSES, **BOOT, groups=groups)  # patients: cluster bootstrap
    diff = macro(y, pa) - macro(y, pb)
    lines = md.split("\n\n")[1:4]  # the three lines under the title
    assert lines[0].startswith(f"Result: on the pooled out-of-fold predictions of {N} images")
    assert f"reaches test AUC {macro(y, pa):.3f} (95% CI {boot['ci_low']:.3f}-{boot['ci_high']:.3f})" in lines[0]
    assert f"a difference of {diff:+.3f} (95% CI {boot['diff_ci_low']:+.3f} to {boot['diff_ci_high']:+.3f})" \
        in lines[0]
    clear = boot["diff_ci_low"] > 0 or boot["diff_ci_high"] < 0
    assert (": a clear difference on" in lines[1]) == clear and (": no clear difference on" in lines[1]) != clear
    assert lines[2].startswith(f"Full report: {run_dir / 'report.html'}")
    first = table_rows(md, "model")
    assert [r["model"] for r in first] == ["the chain", "from scratch (baseline)", "difference (chain - scratch)"]
    assert first[2][next(k for k in first[2] if k.startswith("test AUC"))].startswith(
        f"{diff:+.3f} ({boot['diff_ci_low']:+.3f} to {boot['diff_ci_high']:+.3f}); p ")
    assert md.index("| the chain |") < md.index("## Summary")


def test_without_a_baseline_the_summary_says_so(kfold_run):
    run_dir, stages = kfold_run
    raw = {"run": {"name": "x", "reporter_options": {"evaluation": dict(BOOT)}}, "stages": RAW["stages"]}
    lines, blocks = headline(run_dir, raw, [stages[0], stages[2]])
    y, p, groups = oof_arrays(run_dir / "target")
    lo, hi = bootstrap_auc_ci(y, p, **BOOT, groups=groups)
    assert len(lines) == 3 and blocks == []
    assert f"reaches test AUC {macro(y, p):.3f} (95% CI {lo:.3f}-{hi:.3f})" in lines[0]
    assert lines[1].startswith("No baseline was trained") and "report.html" in lines[2]


@pytest.mark.parametrize("protocol", ["holdout", "kfold", "seeds"])
def test_compare_states_the_difference_and_a_verdict_that_matches_it(tmp_path, protocol):
    out = tmp_path / "cmp"
    runs = {name: mltl.RunResult(run_dir=out / name, stages=(fake_stage(out / name, "target", protocol, sep, seed),))
            for name, sep, seed in (("scratch", 0.3, 1), ("single-stage", 2.0, 2), ("multi-stage", 1.0, 3))}
    comparison = write_comparison(out, runs, **BOOT)
    md = (out / "comparison.md").read_text()
    ref = runs["multi-stage"].stages[0]
    for row in comparison.rows:
        if row["chain"] == "multi-stage":
            assert "sentence" not in row
            continue
        a = runs[row["chain"]].stages[0]
        if protocol == "seeds":  # the mean over the seeds, paired seed by seed
            def draws(s):
                return [mltl.read_predictions(StageFiles(s.stage_dir).repeat(f"seed-{k}").predictions, "test",
                                              CLASSES).probs for k in (1, 2, 3)]
            d = paired_bootstrap_over_draws(a.test.labels, draws(a), draws(ref), **BOOT)
            diff, lo, hi, p = d["diff"], d["diff_ci_low"], d["diff_ci_high"], d["p"]
        else:
            judged = (lambda s: oof_arrays(s.stage_dir)[1]) if protocol == "kfold" else (lambda s: s.test.probs)
            y = oof_arrays(a.stage_dir)[0] if protocol == "kfold" else a.test.labels
            b = paired_bootstrap(y, judged(a), judged(ref), classes=CLASSES, **BOOT)
            diff, lo, hi, p = macro(y, judged(a)) - macro(y, judged(ref)), b["diff_ci_low"], b["diff_ci_high"], b["p"]
        assert row["diff_vs_reference"]["diff"] == pytest.approx(diff, abs=1e-12)
        assert row["diff_vs_reference"]["diff_ci95"] == pytest.approx([lo, hi], abs=1e-12)
        assert row["p_vs_multi-stage"] == pytest.approx(p, abs=1e-12)
        sentence = row["sentence"]
        direction = "higher" if diff > 0 else "lower"
        assert sentence.startswith(f"{row['chain'].capitalize()} reaches an AUC {abs(diff):.3f} {direction} than "
                                   f"multi-stage (95% CI {lo:+.3f} to {hi:+.3f})")
        assert ("a clear difference" in sentence) == (lo > 0 or hi < 0)
        assert sentence in md
        cell = f"{diff:+.3f} ({lo:.3f} to {hi:.3f})"
        assert re.search(rf"^\| {row['chain']} \|.*\| {re.escape(cell)} \|", md, re.MULTILINE)
    # the synthetic single-stage chain separates far better than multi-stage: the verdict must say so
    single = next(r for r in comparison.rows if r["chain"] == "single-stage")
    assert single["diff_vs_reference"]["detected"] and "a clear difference" in single["sentence"]
    header = table_rows(md, "chain")[0]
    level = {"holdout": "test split", "kfold": "pooled out-of-fold (3 folds)", "seeds": "mean over 3 seeds"}[protocol]
    assert f"AUC difference vs multi-stage (95% CI), {level}" in header


def test_a_binary_difference_is_tested_with_delong(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 20)
    stages = []
    for name, sep in (("a", 1.5), ("b", 0.5)):
        logits = rng.normal(size=(40, 2))
        logits[np.arange(40), labels] += sep
        probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        test = mltl.Predictions(ids=tuple(f"i{k}" for k in range(40)), split="test", labels=labels, probs=probs,
                                classes=("no", "yes"))
        stages.append(mltl.StageResult(name=name, stage_dir=tmp_path / name, classes=("no", "yes"), test=test,
                                       metrics={}))
    d = paired_difference(*stages, n_resamples=100, seed=1)
    assert d["test"] == "DeLong"
    assert d["p"] == pytest.approx(delong_test(labels, stages[0].test.probs[:, 1], stages[1].test.probs[:, 1])["p"])
    assert d["diff"] == pytest.approx(roc_auc_score(labels, stages[0].test.probs[:, 1])
                                      - roc_auc_score(labels, stages[1].test.probs[:, 1]))
    text = verdict(d, "model a", "model b")
    assert text.startswith(f"Model a reaches an AUC {abs(d['diff']):.3f}") and "these 40 test images" in text


# ------------------------------------------------------------------------------------- the baseline config


CHAIN = """
[run]
name = "b"
baseline = "scratch"

[[stages]]
name = "source"
domain = { plugin = "fractal" }
backbone = { sweep = ["gfe-1", "gfe-2"] }

[[stages]]
name = "mid"
init = "source"
domain = { plugin = "fractal", seed = 2 }
head = { dense = [16] }

[[stages]]
name = "target"
init = "mid"
domain = { plugin = "ct-phantom" }
freeze = "C1"
split = { protocol = "auto", folds = 3 }
train = { epochs = 2, lr = 0.005 }
"""


def test_the_baseline_is_the_last_stage_from_scratch_and_not_a_chain_stage():
    cfg = parse_config(tomllib.loads(CHAIN), "chain.toml")
    assert [s.name for s in cfg.stages] == ["source", "mid", "target"]  # nothing added to the chain
    b = cfg.baseline
    assert b.name == "target-scratch" and [label for label, _ in b.variants] == ["backbone=gfe-1", "backbone=gfe-2"]
    for _, v in b.variants:
        assert v.init is None and v.freeze == "none" and v.head.dense == (16,)  # the head target inherits
        target = cfg.stages[-1].first
        # the same split settings; no final model (split.final_model), since nothing starts from the baseline
        same = attrs.evolve(target.split, final_model=False) if hasattr(target.split, "final_model") else target.split
        assert v.domain == target.domain and v.split == same
        assert v.train == cfg.stages[-1].first.train
    assert "target-scratch" not in json.dumps(cfg.raw)  # config.toml holds what the user wrote
    # mltl compare's scratch chain is the same stage under the target's name, and no chain trains a baseline
    derived = chains(cfg)
    assert derived["scratch"]["stages"][0] == {**{k: v for k, v in tomllib.loads(CHAIN)["stages"][2].items()
                                                  if k not in ("init", "freeze")},
                                               "backbone": {"sweep": ["gfe-1", "gfe-2"]}, "head": {"dense": [16]}}
    assert all("baseline" not in raw["run"] for raw in derived.values())


def test_baseline_config_errors_name_the_key():
    raw = tomllib.loads(CHAIN)
    one = {**raw, "stages": raw["stages"][:1]}
    with pytest.raises(mltl.ConfigError, match=r"run\.baseline: .*one stage"):
        parse_config(one, "c.toml")
    clash = {**raw, "stages": raw["stages"][:1] + [{**raw["stages"][1], "name": "target-scratch"},
                                                   {**raw["stages"][2], "init": "target-scratch"}]}
    with pytest.raises(mltl.ConfigError, match=r"run\.baseline: .*already has"):
        parse_config(clash, "c.toml")
    raw["stages"][1]["name"] = "m" * 60
    raw["stages"][2]["init"] = "m" * 60
    raw["stages"][2]["name"] = "t" * 60
    with pytest.raises(mltl.ConfigError, match=r"run\.baseline\.name: .*too long"):
        parse_config(raw, "c.toml")
    raw = tomllib.loads(CHAIN)
    raw["run"]["baseline"] = "imagenet"
    with pytest.raises(mltl.ConfigError, match=r"run\.baseline: .*'none', 'scratch'"):
        parse_config(raw, "c.toml")


TINY_BASELINE = """
[run]
name = "tiny-baseline"
seed = 2
baseline = "scratch"
reporter_options = { evaluation = { n_resamples = 200 }, gradcam = { per_class = 0 } }

[input]
size = 32
channels = 1

[[stages]]
name = "source"
domain = { plugin = "fractal", classes = 2, images_per_class = 10, seed = 1, channels = 1 }
backbone = "gfe-1"
train = { epochs = 1, batch_size = 16, optimizer = "adamw", lr = 0.002 }

[[stages]]
name = "target"
init = "source"
domain = { plugin = "ct-phantom", classes = ["normal", "cyst"], images_per_class = 12, seed = 23 }
freeze = "C1"
split = { folds = 3 }
train = { epochs = 1, batch_size = 8, optimizer = "adamw", lr = 0.001 }
"""


@pytest.mark.slow
def test_a_real_run_with_a_scratch_baseline(tmp_path):
    from mltl.deploy.predict import last_finished_stage

    cfg = tmp_path / "b.toml"
    cfg.write_text(TINY_BASELINE)
    result = mltl.run(cfg, out=tmp_path / "run", device="cpu")
    d = result.run_dir
    assert [s.name for s in result.stages] == ["source", "target-scratch", "target"]
    assert last_finished_stage(d).root.name == "target"  # the chain's last stage stays what predict serves
    base, target = result.stage("target-scratch"), result.stage("target")
    # the protocol resolved as for the last stage ("auto": k-fold), on the very same folds and training seeds
    assert base.metrics["protocol"]["name"] == target.metrics["protocol"]["name"] == "kfold"
    for k in (1, 2, 3):
        fold = f"repeats/fold-{k}/splits.csv"
        assert (d / "target-scratch" / fold).read_text() == (d / "target" / fold).read_text()
    assert [r["seed"] for r in json.loads((d / "target-scratch" / "repeats.json").read_text())["rows"]] == \
        [r["seed"] for r in json.loads((d / "target" / "repeats.json").read_text())["rows"]]
    model = json.loads((d / "target-scratch" / "model.json").read_text())
    assert base.metrics["start"] == "new gfe-1" and model["frozen"] == [] and target.metrics["start"] == "from source"
    md = (d / "report.md").read_text()
    classes = ("normal", "cyst")

    def oof(stage):
        with open(d / stage / "oof_predictions.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        return (np.array([classes.index(r["label"]) for r in rows]),
                np.array([[float(r[f"p_{c}"]) for c in classes] for r in rows]))

    y, pa = oof("target")
    _, pb = oof("target-scratch")
    boot = paired_bootstrap(y, pa, pb, classes=classes, n_resamples=200, seed=0)
    a, b = roc_auc_score(y, pa[:, 1]), roc_auc_score(y, pb[:, 1])
    assert (f"the chain (source -> target) reaches test AUC {a:.3f} (95% CI {boot['ci_low']:.3f}-"
            f"{boot['ci_high']:.3f}) and the last stage trained from scratch {b:.3f}") in md
    assert f"a difference of {a - b:+.3f} (95% CI {boot['diff_ci_low']:+.3f} to {boot['diff_ci_high']:+.3f})" in md
    rows = {r["stage"]: r for r in table_rows(md, "stage")}
    assert rows["target"]["test accuracy"] == f"{accuracy_score(y, pa.argmax(1)):.3f}"
    assert rows["target"]["test AUC (95% CI)"] == ci_cell(a, bootstrap_auc_ci(y, pa, n_resamples=200, seed=0))
    # the console's last lines are the report's first three
    lines, _ = headline(d, tomllib.loads((d / "config.toml").read_text()), list(result.stages))
    assert md.split("\n\n")[1:4] == lines
    # mltl report rebuilds the same first screen from the run directory
    assert cli.main(["report", str(d)]) == 0
    assert (d / "report.md").read_text().split("Device:")[0] == md.split("Device:")[0]
