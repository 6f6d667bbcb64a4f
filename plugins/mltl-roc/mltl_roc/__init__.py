"""ROC reporting for mltl: per-stage ROC curves with a bootstrap 95% CI of the macro AUC, and the
chain's stages on one plot. See :mod:`mltl_roc.roc` for the arithmetic."""

from __future__ import annotations

from mltl import hookimpl

from .reporter import RocReporter


@hookimpl
def register_reporters(register):
    register("roc", RocReporter, "ROC curves (roc.png, roc.json) per stage and roc_stages.png per run")
