"""The ROC reporter: per-stage ROC figure and numbers, and one figure comparing the stages.

Files written:

* ``<stage_dir>/roc.png``: the stage's per-class one-vs-rest ROC curves and the macro curve on its test
  split; the macro legend entry carries the stratified-bootstrap 95% CI of the macro AUC.
* ``<stage_dir>/roc.json``: the curves (:func:`mltl_roc.roc.roc_curves`), ``auc_macro``,
  ``auc_macro_ci95`` ``[lo, hi]``, ``n_resamples``, ``seed`` and a little context.
* ``<run_dir>/roc_stages.png``: every stage's macro ROC curve, each on its own test split.

A stage whose test split has fewer than two classes has no ROC curve: it is skipped with a warning on
the ``mltl.roc`` logger, and nothing is written for it.
"""

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from mltl.results import Predictions, StageResult

from mltl.rundir import write_bytes_atomic

from .roc import bootstrap_auc_ci, macro_auc, plot_roc, roc_curves, scored_classes

log = logging.getLogger("mltl.roc")

CI_LEVEL = 0.95
RUN_TITLE = "Macro ROC per stage (each on its own test split)"


def _json_safe(value: Any) -> Any:
    """NaN/inf become null, so the file is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _escape(text: str) -> str:
    """Make free text safe inside a :func:`plot_roc` legend template."""
    return str(text).replace("{", "{{").replace("}", "}}")


class _StageRoc:
    """What one stage's ROC analysis produced, kept for :meth:`RocReporter.run_finished`."""

    def __init__(self, test: Predictions, curves: dict, auc: float, ci: tuple[float, float]):
        self.test = test
        self.curves = curves
        self.auc = auc
        self.ci = ci


class RocReporter:
    """Reporter writing ROC curves and the bootstrap CI of the macro AUC.

    Options: ``n_resamples`` (bootstrap resamples for the CI, default 1000) and ``seed`` (of the
    bootstrap draws, default 0; the same seed gives the same CI).
    """

    def __init__(self, *, n_resamples: int = 1000, seed: int = 0):
        if isinstance(n_resamples, bool) or not isinstance(n_resamples, int) or n_resamples < 1:
            raise ValueError(f"n_resamples must be a positive integer, got {n_resamples!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.n_resamples = n_resamples
        self.seed = seed
        # (stage name, stage_dir) -> analysis done in stage_finished, reused by run_finished
        self._done: dict[tuple[str, str], _StageRoc] = {}

    # ------------------------------------------------------------------------------------ analysis

    def _analyse(self, result: StageResult) -> _StageRoc | None:
        test = result.test
        key = (result.name, str(result.stage_dir))
        cached = self._done.get(key)
        if cached is not None and (cached.test is test or _same_predictions(cached.test, test)):
            return cached
        labels, probs = np.asarray(test.labels), np.asarray(test.probs, dtype=np.float64)
        if not scored_classes(labels, probs):
            present = [test.classes[k] for k in np.unique(labels)] if len(labels) else []
            log.warning(
                "stage %r: no ROC curve, the %s split has fewer than two classes (present: %s); "
                "skipping roc.png/roc.json",
                result.name,
                test.split,
                ", ".join(map(str, present)) or "none",
            )
            return None
        curves = roc_curves(labels, probs, test.classes)
        auc = macro_auc(labels, probs)
        ci = bootstrap_auc_ci(labels, probs, n_resamples=self.n_resamples, seed=self.seed, level=CI_LEVEL)
        done = _StageRoc(test, curves, auc, ci)
        self._done[key] = done
        return done

    # ------------------------------------------------------------------------------- reporter hooks

    def stage_finished(self, result: StageResult) -> None:
        """Write ``roc.png`` and ``roc.json`` into ``result.stage_dir`` (nothing if < 2 classes)."""
        done = self._analyse(result)
        if done is None:
            return
        test = result.test
        lo, hi = done.ci
        per_class = [
            (_escape(name), {name: c}) for name, c in done.curves.items() if name not in ("macro", "micro")
        ]
        macro_label = "macro average: AUC {auc:.2f}" + f" (95% CI {lo:.2f}–{hi:.2f})"
        plot_roc(
            per_class + [(macro_label, {"macro": done.curves["macro"]})],
            Path(result.stage_dir) / "roc.png",
            f"ROC, stage {result.name} ({test.split} split, n = {len(test.labels)})",
        )
        present = [test.classes[k] for k in np.unique(np.asarray(test.labels))]
        payload = {
            "stage": result.name,
            "split": test.split,
            "n_images": int(len(test.labels)),
            "classes": list(test.classes),
            "classes_present": present,
            "auc_macro": done.auc,
            "auc_macro_ci95": [lo, hi],
            "ci_method": "stratified bootstrap, percentile",
            "n_resamples": self.n_resamples,
            "seed": self.seed,
            "curves": done.curves,
        }
        text = json.dumps(_json_safe(payload), indent=2, allow_nan=False) + "\n"
        write_bytes_atomic(Path(result.stage_dir) / "roc.json", text.encode("utf-8"))

    def run_finished(self, results: list[StageResult], run_dir: Path) -> None:
        """Write ``run_dir/roc_stages.png``: each stage's macro ROC on its own test split."""
        entries = []
        for result in results:
            done = self._analyse(result)
            if done is None:
                continue
            lo, hi = done.ci
            label = _escape(result.name) + ": AUC {auc:.2f}" + f" [{lo:.2f}, {hi:.2f}]"
            entries.append((label, {"macro": done.curves["macro"]}))
        if not entries:
            log.warning("no stage has a test split with two or more classes; skipping roc_stages.png")
            return
        plot_roc(entries, Path(run_dir) / "roc_stages.png", RUN_TITLE)


def _same_predictions(a: Predictions, b: Predictions) -> bool:
    return (
        a.ids == b.ids
        and a.classes == b.classes
        and np.array_equal(a.labels, b.labels)
        and np.array_equal(a.probs, b.probs)
    )
