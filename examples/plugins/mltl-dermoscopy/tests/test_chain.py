"""The plugin's config, run as a user would run it, on synthetic photographs."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import mltl
from mltl_dermoscopy.report import lesion_level

CONFIG = Path(__file__).resolve().parents[1] / "dermoscopy.toml"


def test_lesion_level_averages_each_lesions_photographs():
    ids = ("L1/a", "L1/b", "L2/c", "L3/d")
    labels = np.array([0, 0, 1, 1])
    probs = np.array([[0.9, 0.1], [0.3, 0.7], [0.2, 0.8], [0.7, 0.3]])
    out = lesion_level(ids, labels, probs)
    assert out["n_lesions"] == 3 and out["n_images"] == 4
    assert out["lesions"]["L1"]["probabilities"] == pytest.approx([0.6, 0.4])
    assert out["accuracy"] == pytest.approx(2 / 3)  # L1 right, L2 right, L3 wrong
    assert out["auc_macro"] == pytest.approx(0.5)  # L1 (negative) scores 0.4; the positives 0.8 and 0.3


def test_the_example_config_runs_with_the_plugin(ham_folder, tmp_path):
    if "gfe-1" not in mltl.get_registry().names("backbone"):
        pytest.skip("needs the gfe-1 backbone: pip install mltl-gfe")
    proc = subprocess.run(
        [sys.executable, "-m", "mltl", "-q", "run", str(CONFIG), "--out", str(tmp_path / "run"), "--device", "cpu",
         "--set", f"stages.target.domain.root={ham_folder.as_posix()}", "--set", "stages.source.train.epochs=1",
         "--set", "stages.target.train.epochs=2", "--set", "stages.source.domain.images_per_class=12",
         "--set", "stages.source.backbone=gfe-1", "--set", "stages.target.freeze=C1",
         "--set", "stages.target.split.protocol=holdout"],  # one model made every test prediction
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    stage = tmp_path / "run" / "target"
    metrics = json.loads((stage / "metrics.json").read_text())
    lesions = json.loads((stage / "lesion_metrics.json").read_text())
    assert metrics["domain"] == "skin-lesions" and lesions["n_images"] == metrics["n_test"]
    assert lesions["n_lesions"] <= lesions["n_images"]
    assert set(lesions["classes"]) == {"nv", "mel", "bkl"}

    # predicting the test photographs from their files gives the probabilities the run recorded
    import csv

    with open(stage / "predictions.csv") as f:
        test = {r["id"].split("/")[1]: r for r in csv.DictReader(f) if r["split"] == "test"}
    files = [ham_folder / "images" / f"{image_id}.jpg" for image_id in test]
    got = dict(mltl.predict(stage, files))
    for path, probs in got.items():
        row = test[path.stem]
        np.testing.assert_allclose(probs, [float(row[f"p_{c}"]) for c in metrics["classes"]], atol=1e-5)
