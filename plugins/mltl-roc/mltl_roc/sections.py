"""What mltl-roc shows in the run report and in ``mltl compare``'s comparison (the report hooks).

Everything is read from the files the reporters wrote (``evaluation.json``, ``roc.json``,
``calibration.json``, ``gradcam.json`` and the figures), so ``mltl report`` shows the same after replaying
them; a file that is missing (its reporter did not run) leaves its part out.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from mltl import Figure, Heading, Para, StageReport, Table, hookimpl, scored_classes

from .roc import plot_roc, roc_curves

__all__ = ["FIGURES", "POOLED_ROC", "RUN_FIGURES", "mltl_report_stage", "mltl_report_run", "mltl_comparison_figures"]

# a stage's figures in the order the report shows them, with their captions
FIGURES = {
    "roc.png": "ROC curves per class (one-vs-rest) and their macro average, on the test split.",
    "training.png": "Training curves: training and validation loss, validation AUC per epoch; every sweep "
                    "variant faint, the selected one bold.",
    "calibration.png": "Reliability diagram (calibration) of the test predictions.",
    "learning_curve.png": "Learning curve: mean test AUC +/- 1 SD over the draws at each training fraction, "
                          "every draw as a point.",
    "gradcam.png": "Grad-CAM overlays: where the network looked for the class it predicted, for the most "
                   "confident correct and wrong test images of each class.",
}
# drawn from the representative repeat of a repeated stage (the learning curve is over every draw)
REPRESENTATIVE_FIGURES = ("roc.png", "training.png", "calibration.png", "gradcam.png")
POOLED_ROC = "roc_pooled.png"
POOLED_ROC_CAPTION = ("ROC curves per class (one-vs-rest) and their macro average, of the pooled out-of-fold "
                      "predictions: every image once, by the fold model that did not train on it.")
RUN_FIGURES = {"roc_stages.png": "Macro ROC curve of every stage, each on its own test split (a k-fold stage: on "
                                 "its pooled out-of-fold predictions; the stages' test sets differ, so the curves "
                                 "are not a paired comparison)."}
COMPARISON_FIGURE = "roc_chains.png"
COMPARISON_LEARNING_CURVE = "learning_curve_chains.png"


def _fmt(value: Any) -> str:
    """A number as the report prints it: three decimals; "n/a" for a missing or undefined value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _ci(ci: Any) -> str:
    """`` (0.712-0.905)``, or nothing when the interval is missing or undefined."""
    if not ci or ci[0] is None or ci[1] is None:
        return ""
    return f" ({_fmt(ci[0])}-{_fmt(ci[1])})"


def _load(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _pooled_case_table(pc: dict[str, Any]) -> Table:
    """The pooled out-of-fold predictions at case level (the image level is the core's pooled table)."""
    return Table(("level", "n", "macro ROC AUC (95% CI)", "micro ROC AUC", "accuracy", "balanced accuracy"), (
        (f"case ({pc['aggregate']} of its images)", str(pc["n_cases"]),
         _fmt(pc["auc_macro"]) + _ci(pc.get("auc_macro_ci95")), _fmt(pc["auc_micro"]), _fmt(pc["accuracy"]),
         _fmt(pc["balanced_accuracy"])),),
        f"Pooled out-of-fold, case level: {pc['n_images']} images of {pc['n_cases']} cases (patients / studies); a "
        f"case's probabilities are the {pc['aggregate']} of its images'. CI: stratified bootstrap over cases.")


def _case_blocks(case: dict[str, Any], image: dict[str, Any], metrics: dict[str, Any], at: str = "") -> list[Any]:
    ci = image.get("auc_macro_ci95")
    return [
        Heading(3, f"Case level{at}"),
        Para(f"{case['n_images']} test images of {case['n_cases']} cases (patients / studies; "
             f"{case['images_per_case']['min']}-{case['images_per_case']['max']} images each). A case's "
             f"probabilities are the **{case['aggregate']}** of its images'; its label is "
             f"{case['case_label_rule']} ({case['n_mixed_label_cases']} cases with mixed labels)."),
        Table(("level", "n", "macro ROC AUC (95% CI)", "accuracy", "balanced accuracy"), (
            ("image", str(case["n_images"]), _fmt(image.get("auc_macro", metrics.get("auc_macro"))) + _ci(ci),
             _fmt(metrics.get("accuracy")), _fmt(metrics.get("balanced_accuracy"))),
            ("case", str(case["n_cases"]), _fmt(case["auc_macro"]) + _ci(case.get("auc_macro_ci95")),
             _fmt(case["accuracy"]), _fmt(case["balanced_accuracy"])),
        )),
    ]


def _operating_blocks(op: dict[str, Any], image: dict[str, Any], at: str = "") -> list[Any]:
    """The operating points chosen on validation, beside the arg-max sensitivity and specificity."""
    head = Heading(3, f"Operating points (threshold chosen on validation){at}")
    if op.get("skipped"):
        return [head, Para(f"No operating point: {op['skipped']}.")]
    argmax = image.get("per_class") or {}
    rows = []
    for name, c in op["classes"].items():
        am = argmax.get(name) or {}
        at_argmax = f"{_fmt(am.get('sensitivity'))} / {_fmt(am.get('specificity'))}" if am else "n/a"
        if c.get("skipped"):
            rows.append((name, "n/a", "n/a", "n/a", "n/a", "n/a", at_argmax))
            continue
        v, t = c["val"], c["test"]
        rows.append((name, f"{c['threshold']:.4g}", f"{_fmt(v['sensitivity'])} / {_fmt(v['specificity'])}",
                     _fmt(t["sensitivity"]), _fmt(t["specificity"]), _fmt(t["balanced_accuracy"]), at_argmax))
    skipped = [f"{name} ({c['skipped']})" for name, c in op["classes"].items() if c.get("skipped")]
    return [
        head,
        Para(f"One threshold per class ({op['scheme']}), chosen on the {op['n_val']} validation images by "
             f"{op['how']}; the test split ({op['n_test']} images) never chooses it. Set the rule with "
             f"`reporter_options = {{ evaluation = {{ operating_point = \"sensitivity:0.9\" }} }}` (default "
             f"\"youden\"). The last column is the arg-max prediction's, for contrast: a model that ranks well "
             f"(high AUC) but calls every image one class at the arg-max shows 0 and 1 there, and what its ranking "
             f"is worth at a fixed threshold in the test columns."
             + (f" No threshold for {', '.join(skipped)}." if skipped else "")),
        Table(("class", "threshold", "val sensitivity / specificity", "test sensitivity", "test specificity",
               "test balanced accuracy", "arg-max test sensitivity / specificity"), tuple(rows)),
    ]


def _calibration_blocks(cal: dict[str, Any], at: str = "") -> list[Any]:
    bins = cal["bins"]
    return [
        Heading(3, f"Calibration{at}"),
        Para(f"Expected calibration error (ECE) {_fmt(cal['ece'])}, Brier score {_fmt(cal['brier'])} "
             f"({cal['brier_definition']}). Calibration of the {cal['kind']}; {cal['binning']}; "
             f"ECE is the count-weighted mean gap between observed frequency and mean predicted "
             f"probability over the bins."),
        Table(("bin", "images", "mean predicted", "observed"),
              tuple((f"[{b['lower']:.1f}, {b['upper']:.1f}{']' if i == len(bins) - 1 else ')'}",
                     str(b["count"]), _fmt(b["mean_predicted"]), _fmt(b["observed"]))
                    for i, b in enumerate(bins) if b["count"])),
    ]


@hookimpl
def mltl_report_stage(result):
    """The CI of the test macro AUC (from ``evaluation.json``, else ``roc.json``), the micro AUC, the case
    AUC as a summary column, the operating-point, case-level and calibration tables, and the figures; for a
    k-fold stage also the pooled out-of-fold CI, micro AUC, case level and ROC figure. A repeated stage's
    tables and figures other than the pooled ones are those of its representative repeat, and say so."""
    d = Path(result.stage_dir)
    evaluation, roc = _load(d / "evaluation.json"), _load(d / "roc.json")
    cal, gradcam = _load(d / "calibration.json"), _load(d / "gradcam.json")
    image = (evaluation or {}).get("image") or {}
    source = evaluation if image.get("auc_macro_ci95") else roc
    ci = (image.get("auc_macro_ci95") or (roc or {}).get("auc_macro_ci95")) or None
    rep = (result.metrics.get("protocol") or {}).get("representative")
    at = f" ({rep})" if rep else ""

    metrics, summary, blocks = [], [], []
    if image:
        metrics.append(("micro ROC AUC", _fmt(image.get("auc_micro"))))
    case = (evaluation or {}).get("case")
    pooled = (evaluation or {}).get("pooled_out_of_fold")
    pooled_ci, pooled_metrics, pooled_blocks = None, [], []
    if pooled:  # k-fold: the summary row shows the pooled out-of-fold level, so its case column does too
        pooled_ci = (pooled.get("image") or {}).get("auc_macro_ci95") or None
        pooled_metrics.append(("micro ROC AUC", _fmt((pooled.get("image") or {}).get("auc_micro"))))
        if pooled.get("case"):
            pooled_blocks.append(_pooled_case_table(pooled["case"]))
        if (d / POOLED_ROC).is_file():
            pooled_blocks.append(Figure(d / POOLED_ROC, POOLED_ROC_CAPTION))
    summary_case = (pooled or {}).get("case") if pooled else case
    if summary_case:
        summary.append(("case AUC (95% CI)", _fmt(summary_case["auc_macro"]) + _ci(summary_case.get("auc_macro_ci95"))
                        + f" ({summary_case['aggregate']})"))
    operating = (evaluation or {}).get("operating_points")
    if operating:
        blocks += _operating_blocks(operating, image, at)
    if case:
        blocks += _case_blocks(case, image, result.metrics, at)
    if cal:
        blocks += _calibration_blocks(cal, at)
    figures: list[Any] = [Figure(d / name, (f"Representative repeat {rep}: " if rep and name in REPRESENTATIVE_FIGURES
                                            else "") + caption)
                          for name, caption in FIGURES.items() if (d / name).is_file()]
    if gradcam and gradcam.get("skipped"):
        figures.append(Para(f"Grad-CAM: no figure ({gradcam['skipped']})."))
    if not (ci or metrics or summary or blocks or figures or pooled_ci or pooled_blocks):
        return None
    return StageReport(auc_ci95=tuple(ci) if ci else None, n_resamples=(source or {}).get("n_resamples"),
                       metrics=metrics, summary=summary, blocks=blocks, figures=figures,
                       pooled_auc_ci95=tuple(pooled_ci) if pooled_ci else None, pooled_metrics=pooled_metrics,
                       pooled_blocks=pooled_blocks)


@hookimpl
def mltl_report_run(results, run_dir):
    """``roc_stages.png``, the macro ROC curve of every stage."""
    return [Figure(Path(run_dir) / name, caption) for name, caption in RUN_FIGURES.items()
            if (Path(run_dir) / name).is_file()]


@hookimpl
def mltl_comparison_figures(chains, out_dir):
    """``roc_chains.png``: every chain's macro ROC curve on one plot (the paper's Figs. 5 and 6), with its AUC
    and 95% CI in the legend; for a target repeated over training fractions also ``learning_curve_chains.png``:
    every chain's learning curve on one plot (mean +/- 1 SD per fraction, every draw as a point)."""
    chains = [c for c in chains if scored_classes(c.predictions.labels, c.predictions.probs)]
    if not chains:
        return None
    curves = []
    for chain in chains:
        pred = chain.predictions
        lo, hi = chain.auc_ci95
        macro = roc_curves(pred.labels, pred.probs, pred.classes)["macro"]
        name = str(chain.name).replace("{", "{{").replace("}", "}}")
        curves.append((f"{name}: AUC {{auc:.3f}} [{lo:.3f}, {hi:.3f}]", {"macro": macro}))
    some = chains[0].predictions
    path = Path(out_dir) / COMPARISON_FIGURE
    plot_roc(curves, path, f"Target ROC by chain (macro over {len(some.classes)} classes, n={len(some)} {some.split})")
    figures = [Figure(path, "Target ROC curves of every chain (macro average), with AUC and 95% CI.")]
    curve_chains = [c for c in chains if getattr(c, "fractions", ())]
    if curve_chains:
        from .figures import plot_chain_learning_curves

        lc = Path(out_dir) / COMPARISON_LEARNING_CURVE
        plot_chain_learning_curves([(str(c.name), [(f.fraction, f.aucs) for f in c.fractions]) for c in curve_chains],
                                   lc)
        figures.append(Figure(lc, "Learning curves of every chain: the target's mean test AUC +/- 1 SD over the "
                                  "draws at each training fraction, every draw as a point (draw k trained on the "
                                  "same images in every chain; all tested on the same images)."))
    return figures
