"""Evaluation reporting for mltl: ROC curves with bootstrap confidence intervals, the full test
evaluation recomputed from ``predictions.csv`` (micro / macro / per-class AUC, sensitivity and
specificity, case-level AUC, calibration), training and learning curves, Grad-CAM overlays, and a
JSON-lines metrics log; an opt-in TensorBoard reporter where tensorboard is installed. What the reporters
wrote is shown in the run report and in ``mltl compare``'s comparison through the report hooks
(:mod:`mltl_roc.sections`). See :mod:`mltl_roc.roc`, :mod:`mltl_roc.evaluation`, :mod:`mltl_roc.figures`
and :mod:`mltl_roc.gradcam` for the arithmetic and the figures, ``docs/evaluation.md`` for what is
reported."""

from __future__ import annotations

from mltl import hookimpl

from .reporter import EvaluationReporter, GradCamReporter, MetricsLogReporter, RocReporter
from .sections import mltl_comparison_figures, mltl_report_run, mltl_report_stage  # noqa: F401 (report hooks)


@hookimpl
def register_reporters(register):
    register("roc", RocReporter, "ROC curves (roc.png, roc.json) per stage and roc_stages.png per run")
    register("evaluation", EvaluationReporter,
             "evaluation.json (AUCs with CI, sensitivity/specificity, case level), calibration, training curves")
    register("gradcam", GradCamReporter, "Grad-CAM overlays of correct and wrong test images (gradcam.png)")
    register("metrics-log", MetricsLogReporter, "one JSON line per training epoch in RUN_DIR/metrics.jsonl")
    from . import mlflow_reporter, tensorboard, wandb_reporter

    register("mlflow", mlflow_reporter.MlflowReporter,
             "an MLflow run: config as parameters, curves, test metrics, report and figures; opt-in", opt_in=True)
    register("wandb", wandb_reporter.WandbReporter,
             "a W&B run, offline in RUN_DIR/wandb by default: config, curves, metrics, report; opt-in", opt_in=True)

    if tensorboard.available():  # opt-in: name it in [run] reporters
        register("tensorboard", tensorboard.TensorBoardReporter,
                 "TensorBoard scalars (training curves, test metrics) in RUN_DIR/tensorboard; opt-in", opt_in=True)
