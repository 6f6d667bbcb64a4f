"""What a finished stage hands to reporters and to library users.

These are plain value objects: the chain runner fills them, reporters and scripts read them.
Everything here is also on disk in the stage directory (``predictions.csv``, ``metrics.json``),
so a result can be rebuilt from a run directory without the process that trained it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import numpy as np


@attrs.frozen(eq=False)
class Predictions:
    """Class probabilities of one model on one split.

    ``probs[i, k]`` is the probability of ``classes[k]`` for image ``ids[i]``, whose true class index
    is ``labels[i]``. Rows sum to one.
    """

    ids: tuple[str, ...]
    split: str
    labels: np.ndarray  # (N,) int64
    probs: np.ndarray  # (N, C) float64
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.ids)


@attrs.frozen(eq=False)
class StageResult:
    """The selected model of one stage, evaluated on that stage's untouched test split."""

    name: str
    stage_dir: Path
    classes: tuple[str, ...]
    test: Predictions
    metrics: dict[str, Any]
    selection: dict[str, Any] | None = None
