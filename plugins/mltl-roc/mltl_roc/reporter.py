"""The reporters of mltl-roc: ``roc`` (below), ``evaluation``, ``gradcam`` and ``metrics-log`` (further down).

The ROC reporter: per-stage ROC figure and numbers, and one figure comparing the stages.

Files written:

* ``<stage_dir>/roc.png``: the stage's per-class one-vs-rest ROC curves and the macro curve on its test
  split; the macro legend entry carries the stratified-bootstrap 95% CI of the macro AUC.
* ``<stage_dir>/roc.json``: the curves (:func:`mltl_roc.roc.roc_curves`), ``auc_macro``,
  ``auc_macro_ci95`` ``[lo, hi]`` (:func:`mltl.bootstrap_auc_ci`), ``n_resamples``, ``seed`` and a little context.
* ``<stage_dir>/roc_pooled.png``: for a k-fold stage, the same for its pooled out-of-fold predictions
  (``oof_predictions.csv``).
* ``<run_dir>/roc_stages.png``: every stage's macro ROC curve, each on its own test split (a k-fold stage: on
  its pooled out-of-fold predictions).

A stage whose test split has fewer than two classes has no ROC curve: it is skipped with a warning on
the ``mltl.roc`` logger, and nothing is written for it.
"""

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from mltl import (Predictions, RunFiles, StageFiles, StageResult, UserError, bootstrap_auc_ci, macro_auc,
                  scored_classes, write_bytes_atomic, write_json_atomic)

from .roc import plot_roc, roc_curves

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
        ci = bootstrap_auc_ci(labels, probs, n_resamples=self.n_resamples, seed=self.seed, level=CI_LEVEL,
                              groups=test.groups)  # patients: whole cases resampled
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
        pooled = self._pooled(result)
        if pooled is not None:  # k-fold: the pooled out-of-fold predictions' curves too (roc_pooled.png)
            lo, hi = pooled.ci
            plot_roc([(_escape(name), {name: c}) for name, c in pooled.curves.items() if name not in ("macro", "micro")]
                     + [("macro average: AUC {auc:.2f}" + f" (95% CI {lo:.2f}–{hi:.2f})",
                         {"macro": pooled.curves["macro"]})],
                     Path(result.stage_dir) / "roc_pooled.png",
                     f"ROC, stage {result.name} (pooled out-of-fold, n = {len(pooled.test.labels)})")

    def _pooled(self, result: StageResult) -> _StageRoc | None:
        """The ROC analysis of a k-fold stage's pooled out-of-fold predictions (None for other stages)."""
        from mltl import read_predictions

        oof = StageFiles(Path(result.stage_dir)).oof_predictions
        if not (result.metrics.get("protocol") or {}).get("pooled") or not oof.is_file():
            return None
        pooled = read_predictions(oof, "test", tuple(result.classes))
        return self._analyse(StageResult(name=f"{result.name} (pooled out-of-fold)", stage_dir=result.stage_dir,
                                         classes=result.classes, test=pooled, metrics=result.metrics))

    def run_finished(self, results: list[StageResult], run_dir: Path) -> None:
        """Write ``run_dir/roc_stages.png``: each stage's macro ROC on its own test split (a k-fold stage: on its
        pooled out-of-fold predictions)."""
        entries = []
        for result in results:
            pooled = self._pooled(result)  # a k-fold stage: its pooled out-of-fold predictions
            done = pooled or self._analyse(result)
            if done is None:
                continue
            lo, hi = done.ci
            label = (_escape(result.name) + (" (pooled out-of-fold)" if pooled else "") + ": AUC {auc:.2f}"
                     + f" [{lo:.2f}, {hi:.2f}]")
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


# ------------------------------------------------------------------------------ evaluation reporter


def _histories(stage_dir: Path, metrics: dict[str, Any], selection: dict[str, Any] | None
               ) -> tuple[dict[str, list], str]:
    """Every trained variant's history (label -> rows) and the selected label. A repeated stage's
    variants are those of its representative repeat (whose model the stage keeps)."""
    stage = base = StageFiles(stage_dir)
    proto = metrics.get("protocol") or {}
    if proto.get("representative") and stage.repeat(proto["representative"]).root.is_dir():
        base = stage.repeat(proto["representative"])
    histories: dict[str, list] = {}
    if selection:
        for variant in base.variants():
            try:
                label = json.loads(variant.variant_record.read_text())["candidate"]["variant"]
                histories[label] = json.loads(variant.history.read_text())
            except (OSError, ValueError, KeyError):
                continue
        selected = selection.get("selected", "")
        if selected in histories:
            # the selected one last, so it is drawn on top
            histories[selected] = histories.pop(selected)
            return histories, selected
    try:
        return {"": json.loads(stage.history.read_text())}, ""
    except (OSError, ValueError):
        return {}, ""


class EvaluationReporter:
    """Reporter writing each stage's full test evaluation, recomputed from its predictions.

    Files per stage: ``evaluation.json`` (AUC macro / micro / per class with the bootstrap CI of the
    macro AUC, accuracy, balanced accuracy, sensitivity / specificity / PPV per class, confusion matrix;
    and, when the domain has patient / study groups, the same at case level), ``calibration.json`` and
    ``calibration.png`` (reliability diagram, ECE, Brier score), ``training.png`` (loss and validation AUC
    per epoch of every sweep variant, the selected one bold) and, for a stage repeated over training
    fractions, ``learning_curve.png``.

    ``evaluation.json`` also holds ``operating_points``: sensitivity, specificity and balanced accuracy on the
    test split at a threshold chosen on the stage's **validation** predictions (``predictions.csv``, split
    "val"), for the second class of a binary target and one-vs-rest for each class otherwise
    (:func:`mltl_roc.evaluation.operating_points`); the test split never chooses it.

    Options: ``case_aggregate`` ("mean" or "max": how a case's image probabilities become the case's),
    ``n_resamples`` and ``seed`` (bootstrap CIs), ``calibration_bins`` (equal-width bins, default 10),
    ``operating_point`` (how the validation split chooses the threshold: ``"youden"``, the default, or
    ``"sensitivity:X"``, the most specific threshold reaching sensitivity X on validation).
    """

    def __init__(self, *, case_aggregate: str = "mean", n_resamples: int = 1000, seed: int = 0,
                 calibration_bins: int = 10, operating_point: str = "youden"):
        from .evaluation import CASE_AGGREGATES, parse_operating_point

        if not isinstance(operating_point, str):
            raise UserError(f'operating_point must be a string, "youden" or "sensitivity:0.9", got {operating_point!r}')
        try:
            parse_operating_point(operating_point)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        self.operating_point = operating_point
        if case_aggregate not in CASE_AGGREGATES:
            raise UserError(f'case_aggregate must be "mean" or "max", got {case_aggregate!r}')
        if isinstance(n_resamples, bool) or not isinstance(n_resamples, int) or n_resamples < 1:
            raise UserError(f"n_resamples must be a positive integer, got {n_resamples!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise UserError(f"seed must be a non-negative integer, got {seed!r}")
        if isinstance(calibration_bins, bool) or not isinstance(calibration_bins, int) or calibration_bins < 2:
            raise UserError(f"calibration_bins must be an integer of at least 2, got {calibration_bins!r}")
        self.case_aggregate = case_aggregate
        self.n_resamples = n_resamples
        self.seed = seed
        self.calibration_bins = calibration_bins

    def _levels(self, test: Predictions) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Image-level metrics (with the bootstrap CI of the macro AUC) and case-level ones (None without groups)."""
        from .evaluation import case_level, image_metrics

        labels, probs = np.asarray(test.labels), np.asarray(test.probs, dtype=np.float64)
        image = image_metrics(labels, probs, test.classes)
        if len(image["classes_present"]) >= 2:
            lo, hi = bootstrap_auc_ci(labels, probs, n_resamples=self.n_resamples, seed=self.seed, level=CI_LEVEL,
                                      groups=test.groups)  # patients: whole cases resampled
        else:
            lo = hi = math.nan
        image["auc_macro_ci95"] = [lo, hi]
        case = None
        if test.groups is not None and len(test):
            case = case_level(test.groups, labels, probs, test.classes, aggregate=self.case_aggregate,
                              n_resamples=self.n_resamples, seed=self.seed)
        return image, case

    def evaluate(self, result: StageResult) -> dict[str, Any]:
        """The content of ``evaluation.json`` for one stage."""
        from mltl import read_predictions

        test = result.test
        image, case = self._levels(test)
        out: dict[str, Any] = {
            "stage": result.name, "split": test.split, "source": "predictions.csv (test rows)",
            "ci_method": "stratified bootstrap, percentile", "n_resamples": self.n_resamples, "seed": self.seed,
            "image": image, "case": case,
        }
        if case is None:
            out["case_note"] = "the domain has no patient / study groups: every image is its own case"
        out["operating_points"] = self._operating_points(result)
        oof = StageFiles(Path(result.stage_dir)).oof_predictions
        if oof.is_file():  # k-fold: every image tested once, by the fold model that never saw it
            pooled = read_predictions(oof, "test", tuple(test.classes))
            p_image, p_case = self._levels(pooled)
            out["pooled_out_of_fold"] = {"source": oof.name, "image": p_image, "case": p_case}
        return out

    def _operating_points(self, result: StageResult) -> dict[str, Any]:
        """Thresholds chosen on the stage's validation predictions, applied to its test predictions."""
        from mltl import read_predictions

        from .evaluation import operating_points

        test = result.test
        path = StageFiles(Path(result.stage_dir)).predictions
        try:
            val = read_predictions(path, "val", tuple(test.classes))
        except (OSError, KeyError, ValueError) as exc:
            return {"rule": self.operating_point, "skipped": f"no validation predictions to choose a threshold "
                                                             f"on ({path.name}: {exc})"}
        if not len(val) or not len(test):
            return {"rule": self.operating_point,
                    "skipped": f"no {'validation' if not len(val) else 'test'} predictions in {path.name}"}
        out = operating_points(val.labels, val.probs, test.labels, test.probs, test.classes, self.operating_point)
        out["source"] = f"{path.name}: thresholds from the val rows, metrics on the {test.split} predictions"
        return out

    def stage_finished(self, result: StageResult) -> None:
        from .evaluation import calibration
        from .figures import plot_learning_curve, plot_reliability, plot_training_curves

        stage_dir = Path(result.stage_dir)
        test = result.test
        write_json_atomic(stage_dir / "evaluation.json", _json_safe(self.evaluate(result)))
        if len(test):
            cal = calibration(test.labels, test.probs, test.classes, n_bins=self.calibration_bins)
            cal["stage"] = result.name
            cal["split"] = test.split
            write_json_atomic(stage_dir / "calibration.json", _json_safe(cal))
            plot_reliability(cal, stage_dir / "calibration.png",
                             f"Reliability, stage {result.name} ({test.split} split, n = {len(test)})")
        histories, selected = _histories(stage_dir, result.metrics, result.selection)
        if histories:
            plot_training_curves(histories, selected, stage_dir / "training.png",
                                 f"Training curves, stage {result.name}", best_epoch=result.metrics.get("best_epoch"))
        repeats = StageFiles(stage_dir).repeats_json
        if repeats.is_file():
            try:
                rows = json.loads(repeats.read_text())["rows"]
            except (OSError, ValueError, KeyError) as exc:
                log.warning("stage %r: %s is damaged (%s); no learning curve", result.name, repeats, exc)
                return
            if any(r.get("fraction") is not None for r in rows):
                plot_learning_curve(rows, stage_dir / "learning_curve.png",
                                    f"Learning curve, stage {result.name}")


# -------------------------------------------------------------------------------- Grad-CAM reporter


class GradCamReporter:
    """Reporter writing ``gradcam.png`` per stage: Grad-CAM overlays (captum ``LayerGradCam`` at the last
    convolutional layer group) of the most confident correct and wrong test images of each class.

    The test images are rebuilt from the stage directory (``model.json``'s domain, ``predictions.csv``'s
    ids), see :mod:`mltl_roc.gradcam`. Options: ``per_class`` (correct and wrong images per class, default
    2; 0 turns the figure off). Without captum the reporter writes ``gradcam.json`` saying so and nothing
    else.
    """

    def __init__(self, *, per_class: int = 2):
        if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 0:
            raise UserError(f"per_class must be a non-negative integer, got {per_class!r}")
        self.per_class = per_class

    def stage_finished(self, result: StageResult) -> None:
        from .gradcam import stage_gradcam

        if self.per_class == 0:
            return
        stage_dir = Path(result.stage_dir)
        try:
            record = stage_gradcam(stage_dir, per_class=self.per_class)
        except UserError as exc:  # captum missing, a network without convolutions
            log.warning("stage %r: no Grad-CAM figure: %s", result.name, exc)
            write_json_atomic(stage_dir / "gradcam.json", {"stage": result.name, "skipped": str(exc)})
            (stage_dir / "gradcam.png").unlink(missing_ok=True)
            return
        if "skipped" in record:
            log.warning("stage %r: no Grad-CAM figure: %s", result.name, record["skipped"])
            (stage_dir / "gradcam.png").unlink(missing_ok=True)


# ------------------------------------------------------------------------------- metrics log reporter


class MetricsLogReporter:
    """Reporter appending one JSON line per training epoch to ``RUN_DIR/metrics.jsonl``:
    ``{"time", "stage", "variant", "epoch", "metrics"}``, where ``metrics`` is what the training loop
    reports (training loss, learning rate, validation loss / AUC / accuracy, seconds). Each line is
    written and flushed on its own, so ``tail -f`` follows a run; a resumed run appends to the same file
    (epochs redone after a checkpoint then appear twice, with their times). Undefined values are null.
    """

    def __init__(self, *, file: str = "metrics.jsonl"):
        if not file or Path(file).name != file or file in (".", ".."):
            raise UserError(f"file must be a plain file name inside the run directory (no folder, no ..), "
                            f"got {file!r}; e.g. metrics.jsonl")
        if RunFiles.is_own_name(file):
            raise UserError(f"file {file!r} is one of the run directory's own files, which the log would "
                            f"overwrite; choose another name, e.g. metrics.jsonl")
        self.file = file
        self.path: Path | None = None

    def stage_started(self, stage_name: str, stage_dir: Path) -> None:
        self.path = Path(stage_dir).parent / self.file

    def epoch_ended(self, stage_name: str, variant: str, epoch: int, metrics: dict[str, Any]) -> None:
        if self.path is None:
            return
        import time

        row = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "stage": stage_name,
               "variant": variant or None, "epoch": int(epoch), "metrics": metrics}
        line = json.dumps(_json_safe(_plain(row)), allow_nan=False)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()


def _plain(value: Any) -> Any:
    """numpy / torch scalars as Python numbers (for json)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and not isinstance(value, (str, bytes)):
        try:
            return value.item()
        except (TypeError, ValueError):
            return str(value)
    return value
