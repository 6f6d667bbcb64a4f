"""The ``lesion-level`` reporter: test metrics per lesion, not per photograph.

A lesion photographed three times counts three times in image-level metrics. Clinically the question is
per lesion, so this reporter averages each lesion's test probabilities (the domain keeps a lesion's
photographs in one split, and its image ids are ``LESION/IMAGE``) and scores those means.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

from mltl import write_json_atomic


def lesion_level(ids: tuple[str, ...], labels: np.ndarray, probs: np.ndarray) -> dict[str, Any]:
    """Per-lesion mean probabilities, and the lesion-level macro AUC (one-vs-rest) and accuracy."""
    rows: dict[str, list[int]] = defaultdict(list)
    for i, image_id in enumerate(ids):
        rows[image_id.split("/", 1)[0]].append(i)
    lesions = sorted(rows)
    mean = np.stack([probs[rows[k]].mean(axis=0) for k in lesions])
    truth = np.array([np.bincount(labels[rows[k]]).argmax() for k in lesions])
    n_classes = probs.shape[1]
    present = np.unique(truth)
    if len(present) < 2:
        auc = None  # undefined with one class among the test lesions
    elif n_classes == 2:
        auc = float(roc_auc_score(truth, mean[:, 1]))
    else:
        aucs = [roc_auc_score(truth == k, mean[:, k]) for k in range(n_classes) if k in present]
        auc = float(np.mean(aucs))
    return {
        "n_lesions": len(lesions),
        "n_images": len(ids),
        "auc_macro": auc,
        "accuracy": float(np.mean(mean.argmax(axis=1) == truth)),
        "lesions": {k: {"label": int(t), "images": len(rows[k]), "probabilities": [float(v) for v in m]}
                    for k, t, m in zip(lesions, truth, mean)},
    }


class LesionLevelReporter:
    """Writes ``STAGE/lesion_metrics.json`` after every stage trained on the ``skin-lesions`` domain."""

    def stage_finished(self, result: Any) -> None:
        if result.metrics.get("domain") != "skin-lesions":
            return
        test = result.test
        out = lesion_level(test.ids, np.asarray(test.labels), np.asarray(test.probs))
        out = {"stage": result.name, "classes": list(result.classes), **out}
        write_json_atomic(Path(result.stage_dir) / "lesion_metrics.json", out)
