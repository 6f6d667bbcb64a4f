"""The run report and ``mltl compare`` reach mltl-roc only through the report hooks, and print the same
CI for the same target (one bootstrap). Built from synthetic predictions: nothing is trained."""

import ast
import json
import re
from pathlib import Path

import numpy as np
import pytest

import mltl
from mltl.running.compare import write_comparison
from mltl.evaluation.metrics import classification_metrics
from mltl.evaluation.report import write_report
from mltl_roc.reporter import EvaluationReporter, RocReporter

CORE = Path(__file__).resolve().parents[1] / "core" / "mltl"
CLASSES = ("normal", "cyst", "calculi")


def test_the_core_never_imports_mltl_roc():
    found = []
    for path in sorted(CORE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            found += [f"{path.relative_to(CORE.parent)}:{node.lineno}: {n}" for n in names
                      if n.split(".")[0] == "mltl_roc"]
    assert not found, "the core imports the mltl-roc plugin:\n" + "\n".join(found)


def stage(run_dir: Path, separation: float, seed: int) -> mltl.StageResult:
    """A finished three-class target stage of 45 test images (the same ids in every chain)."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(3), 15)
    logits = rng.normal(size=(45, 3))
    logits[np.arange(45), labels] += separation
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    stage_dir = run_dir / "target"
    stage_dir.mkdir(parents=True)
    test = mltl.Predictions(ids=tuple(f"img{i:03d}" for i in range(45)), split="test", labels=labels,
                            probs=probs, classes=CLASSES)
    metrics = {**classification_metrics(labels, probs, CLASSES), "classes": list(CLASSES), "n_test": 45,
               "n_images": {"train": 60, "val": 15, "test": 45}, "train_seconds": 1.0}
    return mltl.StageResult(name="target", stage_dir=stage_dir, classes=CLASSES, test=test, metrics=metrics)


@pytest.fixture
def compared(tmp_path):
    """Two chains compared with 200 resamples and seed 7, and each chain's report made by reporters with
    the same settings."""
    out = tmp_path / "cmp"
    runs = {name: mltl.RunResult(run_dir=out / name, stages=(stage(out / name, sep, seed),))
            for name, sep, seed in (("scratch", 0.6, 1), ("multi-stage", 1.4, 2))}
    comparison = write_comparison(out, runs, n_resamples=200, seed=7)
    for run in runs.values():
        target = run.stages[-1]
        RocReporter(n_resamples=200, seed=7).stage_finished(target)
        EvaluationReporter(n_resamples=200, seed=7).stage_finished(target)
        write_report(run.run_dir, {"run": {"name": run.run_dir.name}}, list(run.stages), {})
    return out, runs, comparison


def test_comparison_and_report_print_the_same_ci(compared):
    out, runs, comparison = compared
    table = (out / "comparison.md").read_text()
    for row in comparison.rows:
        target = runs[row["chain"]].stages[-1]
        d = target.stage_dir
        expected = list(mltl.bootstrap_auc_ci(target.test.labels, target.test.probs, n_resamples=200, seed=7))
        assert row["auc_ci95"] == expected  # the reference (alone) and the other chain (paired) alike
        assert json.loads((d / "roc.json").read_text())["auc_macro_ci95"] == expected
        assert json.loads((d / "evaluation.json").read_text())["image"]["auc_macro_ci95"] == expected
        lo, hi = expected
        printed = f"{row['auc_macro']:.3f} ({lo:.3f}-{hi:.3f})"
        assert re.search(rf"^\| {row['chain']} \|.*\| {re.escape(printed)} \|", table, re.MULTILINE)
        report = (runs[row["chain"]].run_dir / "report.md").read_text()
        assert re.search(rf"^\| target \|.*\| {re.escape(printed)} \|", report, re.MULTILINE)  # the summary row
        assert f"| macro ROC AUC (95% CI) | {printed} |" in report  # the stage's test metrics


def test_the_plugin_shows_its_parts_through_the_hooks(compared):
    out, runs, _ = compared
    table = (out / "comparison.md").read_text()
    assert "![roc_chains](roc_chains.png)" in table and (out / "roc_chains.png").is_file()
    assert json.loads((out / "comparison.json").read_text())["figure"] == "roc_chains.png"
    report = (runs["multi-stage"].run_dir / "report.md").read_text()
    for text in ("| micro ROC AUC |", "### Calibration", "200 resamples", "### Figures",
                 "![roc](target/roc.png)", "*ROC curves per class (one-vs-rest)"):
        assert text in report, text
    assert report.index("![roc](target/roc.png)") < report.index("![calibration](target/calibration.png)")


def test_without_plugins_the_report_keeps_the_core_sections(tmp_path, monkeypatch, fresh_plugins):
    """No plugin answers the report hooks: the report still has the stage summary and test metrics."""
    monkeypatch.setenv("MLTL_LOAD_PLUGINS", "")  # the built-ins only: no mltl-roc
    assert fresh_plugins.hooks().report_stage(stage(tmp_path / "probe", 1.0, 3)) == []
    target = stage(tmp_path / "run", 1.0, 3)
    write_report(tmp_path / "run", {"run": {"name": "bare"}}, [target], {})
    text = (tmp_path / "run" / "report.md").read_text()
    assert "## Summary" in text and "### Test metrics" in text and "true \\ predicted" in text
    assert "micro ROC AUC" not in text and "(95% CI) | " + f"{target.metrics['auc_macro']:.3f} |" in text
