import csv
import json

import numpy as np
import pytest

import mltl
from mltl.running.compare import chains, compare


def test_derived_chains(tiny_config):
    cfg = mltl.load_config(tiny_config("inherited"))
    derived = chains(cfg)
    assert list(derived) == ["scratch", "single-stage", "multi-stage"]
    scratch = derived["scratch"]["stages"]
    assert len(scratch) == 1 and "init" not in scratch[0] and scratch[0]["backbone"] == {"sweep": ["gfe-1", "gfe-2"]}
    assert scratch[0]["head"] == {"dense": [32, 16], "dropout": 0.5}  # the head the full chain's target has
    single = derived["single-stage"]["stages"]
    assert [s["name"] for s in single] == ["source", "target"] and single[1]["init"] == "source"
    for name, raw in derived.items():
        mltl.config.parse_config(raw)
        assert raw["stages"][-1]["domain"] == cfg.raw["stages"][-1]["domain"]


@pytest.mark.slow
def test_compare_runs_three_chains_on_the_same_test_images(tmp_path, tiny_config):
    result = compare(tiny_config("C1"), out=tmp_path / "cmp", device="cpu", n_resamples=100)
    names = [r["chain"] for r in result.rows]
    assert names == ["scratch", "single-stage", "multi-stage"]
    ids = set()
    for r in result.rows:
        with open(f"{r['run_dir']}/target/predictions.csv") as f:
            ids.add(tuple(sorted(line.split(",")[0] for line in f if ",test," in line)))
        lo, hi = r["auc_ci95"]
        assert lo <= r["auc_macro"] <= hi or np.isnan(r["auc_macro"])
    assert len(ids) == 1
    assert "p_vs_multi-stage" in result.rows[0] and 0 <= result.rows[0]["p_vs_multi-stage"] <= 1
    table = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "| scratch | target |" in table and "| multi-stage | source -> intermediate -> target |" in table
    assert json.loads((tmp_path / "cmp" / "comparison.json").read_text())["reference"] == "multi-stage"
    # --resume: a finished comparison is read back from its run directories, not trained again
    (tmp_path / "cmp" / "scratch" / "target" / "metrics.json").unlink()  # as if killed before the end
    again = compare(tiny_config("C1"), out=tmp_path / "cmp", device="cpu", n_resamples=100, resume=True)
    assert [(r["chain"], r["auc_macro"], r["auc_ci95"]) for r in again.rows] == \
        [(r["chain"], r["auc_macro"], r["auc_ci95"]) for r in result.rows]
    # --reuse: a new target setting; each chain copies the upstream stages its namesake finished, trains the target
    new = compare(tiny_config("C1"), overrides=["stages.target.train.lr=0.003"], out=tmp_path / "cmp2",
                  device="cpu", n_resamples=100, reuse=tmp_path / "cmp")
    reused = {r["chain"]: json.loads((tmp_path / "cmp2" / r["chain"] / "reused.json").read_text())
              if (tmp_path / "cmp2" / r["chain"] / "reused.json").is_file() else {} for r in new.rows}
    assert reused == {"scratch": {}, "single-stage": {"source": str(tmp_path / "cmp" / "single-stage" / "source")},
                      "multi-stage": {"source": str(tmp_path / "cmp" / "multi-stage" / "source"),
                                      "intermediate": str(tmp_path / "cmp" / "multi-stage" / "intermediate")}}
    for chain in ("single-stage", "multi-stage"):
        assert ((tmp_path / "cmp2" / chain / "source" / "predictions.csv").read_text()
                == (tmp_path / "cmp" / chain / "source" / "predictions.csv").read_text())
        assert ((tmp_path / "cmp2" / chain / "target" / "history.json").read_text()
                != (tmp_path / "cmp" / chain / "target" / "history.json").read_text())  # trained, at the new rate


@pytest.mark.slow
def test_compare_with_a_kfold_target_judges_pooled_out_of_fold_predictions(tmp_path, tiny_config):
    from PIL import Image
    from sklearn.metrics import roc_auc_score

    result = compare(tiny_config("C1"), overrides=["stages.target.split.protocol=kfold", "stages.target.split.folds=3"],
                     out=tmp_path / "cmp", device="cpu", n_resamples=50)
    for r in result.rows:
        assert r["evaluated_on"] == "out-of-fold test" and r["n_test"] == 36  # every target image once
        assert r["repeats"]["protocol"] == "kfold" and r["repeats"]["n"] == 3
        with open(f"{r['run_dir']}/target/oof_predictions.csv") as f:
            rows = list(csv.DictReader(f))
        classes = ("normal", "caroli-focal", "caroli-diffuse")
        y = np.array([classes.index(x["label"]) for x in rows])
        p = np.array([[float(x[f"p_{c}"]) for c in classes] for x in rows])
        assert r["auc_macro"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="macro"), abs=1e-9)
    table = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "(3 folds)" in table and "![roc_chains](roc_chains.png)" in table
    page = (tmp_path / "cmp" / "comparison.html").read_text()
    assert "<td>multi-stage</td>" in page and "data:image/png;base64," in page and 'src="roc_chains' not in page
    with Image.open(tmp_path / "cmp" / "roc_chains.png") as im:
        assert im.size[0] > 300


def test_a_bootstrap_p_of_zero_is_shown_as_below_its_resolution():
    from mltl.running.compare import render

    row = {"chain": "scratch", "stages": ["target"], "train_images": [36], "classes": [3], "auc_macro": 0.6,
           "auc_ci95": [0.5, 0.7], "repeats": None, "accuracy": 0.4, "n_test": 120, "train_seconds": 3.0,
           "evaluated_on": "test", "test": "paired bootstrap of the macro-AUC difference"}
    ref = {**row, "chain": "multi-stage", "stages": ["source", "target"]}
    del ref["test"]
    table = render([{**row, "p_vs_multi-stage": 0.0, "p_resolution": 0.002}, ref], "multi-stage")
    assert "| < 0.002 |" in table and "| 0 |" not in table
    table = render([{**row, "p_vs_multi-stage": 0.0314, "p_resolution": 0.002}, ref], "multi-stage")
    assert "| 0.0314 |" in table
