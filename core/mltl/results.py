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
    make them with :func:`mltl.privacy.pseudonym`) is kept; any other value (a third-party domain's raw
    patient id) is pseudonymised here with the same per-user salt (:func:`mltl.privacy.resolve_salt`).
    So a raw id never reaches ``predictions.csv``, and equal ids still give equal keys for case-level
    aggregation.
    """
    if groups is None:
        return None
    groups = [str(g) for g in groups]
    if all(_PSEUDONYM.fullmatch(g) for g in groups):
        return tuple(groups)
    from .privacy import pseudonym, resolve_salt

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
