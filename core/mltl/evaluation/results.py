"""What a finished stage hands to reporters and to library users.

These are plain value objects: the chain runner fills them, reporters and scripts read them.
Everything here is also on disk in the stage directory (``predictions.csv``, ``metrics.json``),
so a result can be rebuilt from a run directory without the process that trained it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import attrs
import numpy as np


@attrs.frozen(eq=False)
class Predictions:
    """Class probabilities of one model on one split.

    ``probs[i, k]`` is the probability of ``classes[k]`` for image ``ids[i]``, whose true class index
    is ``labels[i]``. Rows sum to one. ``groups[i]`` is the case (patient / study) of image ``i`` as a
    salted hash (:func:`group_keys`), or ``None`` for a domain without groups.
    """

    ids: tuple[str, ...]
    split: str
    labels: np.ndarray  # (N,) int64
    probs: np.ndarray  # (N, C) float64
    classes: tuple[str, ...]
    groups: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return len(self.ids)


_PSEUDONYM = re.compile(r"p-[0-9a-f]{16}")


def group_keys(groups: Any) -> tuple[str, ...] | None:
    """Case ids safe to write next to predictions (``None`` in, ``None`` out).

    A group that is already a salted pseudonym (``p-`` + 16 hex digits, as the manifest and DICOM domains
    make them with :func:`mltl.data.privacy.pseudonym`) is kept; any other value (a third-party domain's raw
    patient id) is pseudonymised here with the same per-user salt (:func:`mltl.data.privacy.resolve_salt`).
    So a raw id never reaches ``predictions.csv``, and equal ids still give equal keys for case-level
    aggregation.
    """
    if groups is None:
        return None
    groups = [str(g) for g in groups]
    if all(_PSEUDONYM.fullmatch(g) for g in groups):
        return tuple(groups)
    from ..data.privacy import pseudonym, resolve_salt

    salt = resolve_salt(None)
    return tuple(g if _PSEUDONYM.fullmatch(g) else pseudonym(g, salt) for g in groups)


@attrs.frozen(eq=False)
class StageResult:
    """The selected model of one stage, evaluated on that stage's untouched test split."""

    name: str
    stage_dir: Path
    classes: tuple[str, ...]
    test: Predictions
    metrics: dict[str, Any]
    selection: dict[str, Any] | None = None


@attrs.frozen(eq=False)
class Candidate:
    """One variant of a stage's sweep: how it scored on validation, or why it was skipped.

    ``selection.json`` lists every candidate of a sweep (losers are never evaluated on test)."""

    variant: str
    selection_value: float | None = None
    val: dict[str, Any] | None = None  # validation metrics (mltl.evaluation.metrics.classification_metrics)
    best_epoch: int | None = None
    epochs_run: int | None = None
    frozen: tuple[str, ...] = ()
    train_seconds: float | None = None
    skipped: str | None = None  # e.g. "C1-C3" on a network with two convolutions

    def to_json(self) -> dict[str, Any]:
        if self.skipped is not None:
            return {"variant": self.variant, "skipped": self.skipped}
        return {"variant": self.variant, "selection_value": self.selection_value, "val": self.val,
                "best_epoch": self.best_epoch, "epochs_run": self.epochs_run, "frozen": list(self.frozen),
                "train_seconds": self.train_seconds}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Candidate:
        if "skipped" in d:
            return cls(variant=d["variant"], skipped=d["skipped"])
        return cls(variant=d["variant"], selection_value=d["selection_value"], val=d["val"],
                   best_epoch=d["best_epoch"], epochs_run=d["epochs_run"], frozen=tuple(d["frozen"]),
                   train_seconds=d["train_seconds"])


def selection_record(stage: Any, selected: Candidate, candidates: list[Candidate]) -> dict[str, Any]:
    """``selection.json`` of a sweep: every candidate's validation score, the rule, the winner."""
    return {"select_by": stage.select_by, "split": "val", "swept": list(stage.swept),
            "selected": selected.variant, "candidates": [c.to_json() for c in candidates],
            "rule": f"highest validation {stage.select_by}" if stage.select_by != "loss" else "lowest validation loss",
            "ties": "the first listed variant wins"}


def stage_metrics(stage: Any, selected: Candidate, test: dict[str, Any], *, classes: tuple[str, ...], domain: str,
                  start: str, note: str, trainable: int, n_images: dict[str, int], class_counts: Any,
                  repeat: dict[str, Any] | None = None) -> dict[str, Any]:
    """``metrics.json`` of a stage (or one repeat): the selected variant's test metrics (``test``, from
    :func:`mltl.evaluation.metrics.classification_metrics`), its validation score and how it was made."""
    metrics = {
        "stage": stage.name, "split": "test",
        "auc_macro": test["auc_macro"], "accuracy": test["accuracy"], "balanced_accuracy": test["balanced_accuracy"],
        "n_test": test["n"], "loss": test["loss"], "auc_per_class": test["auc_per_class"],
        "confusion_matrix": test["confusion_matrix"], "classes": list(classes),
        "val": {**selected.val, "selection_value": selected.selection_value}, "select_by": stage.select_by,
        "selected_variant": selected.variant or None, "domain": domain, "start": start, "inherited": note,
        "frozen": list(selected.frozen), "trainable_parameters": trainable, "best_epoch": selected.best_epoch,
        "epochs_run": selected.epochs_run, "train_seconds": selected.train_seconds, "n_images": n_images,
        "class_counts": class_counts,
    }
    if repeat is not None:
        metrics["repeat"] = repeat
    return metrics
