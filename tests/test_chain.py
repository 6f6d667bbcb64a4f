"""The chain end to end through the library API, on generated data (a few seconds per run)."""

import csv
import json
import tomllib

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, roc_auc_score

import mltl
from mltl.running import chain as chain_module
from mltl.running.rundir import load_weights


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One tiny three-stage run whose target freezes everything it inherited, with Predictions creation logged."""
    tmp = tmp_path_factory.mktemp("chain")
    from tests.conftest import TINY

    cfg = tmp / "tiny.toml"
    # keep = "all": the losing variants' weights too (a run keeps only the selected ones by default)
    cfg.write_text(TINY.format(target_freeze="inherited").replace("seed = 3", 'seed = 3\nkeep = "all"', 1))
    log = []

    class Spy:
        def epoch_ended(self, stage_name, variant, epoch, metrics):
            log.append(("epoch", stage_name, variant))

    real = chain_module.Predictions

    def spying_predictions(**kw):
        log.append(("predictions", kw["split"], len(kw["ids"])))
        return real(**kw)

    class SpyPlugin:
        @mltl.hookimpl
        def register_reporters(self, register):
            register("spy", Spy)

    mltl.register_plugin(SpyPlugin(), name="spy-plugin")
    mp = pytest.MonkeyPatch()
    mp.setattr(chain_module, "Predictions", spying_predictions)
    try:
        result = mltl.run(cfg, out=tmp / "run", device="cpu")
    finally:
        mp.undo()
        mltl.unregister_plugin("spy-plugin")
    return result, log


def test_run_directory_holds_everything_a_reviewer_needs(finished):
    result, _ = finished
    d = result.run_dir
    for name in ("config.toml", "environment.json", "report.md", "state.json", "roc_stages.png"):
        assert (d / name).is_file(), name
    tomllib.loads((d / "config.toml").read_text())
    env = json.loads((d / "environment.json").read_text())
    assert env["seed"] == 3 and env["device"] == "cpu" and "torch" in env["packages"]
    assert json.loads((d / "state.json").read_text())["state"] == "finished"
    for stage in ("source", "intermediate", "target"):
        for name in ("model.safetensors", "model.json", "metrics.json", "predictions.csv", "splits.csv", "roc.png"):
            assert (d / stage / name).is_file(), f"{stage}/{name}"
        m = json.loads((d / stage / "metrics.json").read_text())
        assert {"auc_macro", "accuracy", "n_test"} <= set(m)
    assert (d / "source" / "selection.json").is_file() and (d / "intermediate" / "selection.json").is_file()
    assert not (d / "target" / "selection.json").exists()
    report = (d / "report.md").read_text()
    assert "| intermediate |" in report and "roc.png" in report


@pytest.mark.parametrize("stage", ["source", "intermediate", "target"])
def test_metrics_equal_sklearn_on_predictions_csv(finished, stage):
    result, _ = finished
    d = result.run_dir / stage
    m = json.loads((d / "metrics.json").read_text())
    with open(d / "predictions.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "test"]
    classes = m["classes"]
    y = np.array([classes.index(r["label"]) for r in rows])
    p = np.array([[float(r[f"p_{c}"]) for c in classes] for r in rows])
    assert m["n_test"] == len(rows)
    assert abs(m["accuracy"] - accuracy_score(y, p.argmax(1))) < 1e-9
    assert abs(m["auc_macro"] - roc_auc_score(y, p, multi_class="ovr", average="macro")) < 1e-9


def test_splits_are_disjoint_and_stratified(finished):
    result, _ = finished
    for stage in ("source", "intermediate", "target"):
        with open(result.run_dir / stage / "splits.csv") as f:
            rows = list(csv.DictReader(f))
        by_split = {}
        for r in rows:
            by_split.setdefault(r["split"], set()).add(r["id"])
        assert set(by_split) == {"train", "val", "test"}
        assert not (by_split["train"] & by_split["test"]) and not (by_split["val"] & by_split["test"])
        assert not (by_split["train"] & by_split["val"])
        for split in ("val", "test"):
            labels = {r["label"] for r in rows if r["split"] == split}
            assert len(labels) == len(json.loads((result.run_dir / stage / "metrics.json").read_text())["classes"])


def test_selection_never_looks_at_the_test_split(finished):
    result, log = finished
    for stage in result.stages:
        n_variants = {"source": 2, "intermediate": 3, "target": 1}[stage.name]
        stage_events = [e for e in log if e[0] == "epoch" and e[1] == stage.name]
        assert len({e[2] for e in stage_events}) == n_variants
    # each stage: every variant's val predictions, then exactly one test prediction, after all its training
    order = [e for e in log if e[0] == "predictions" or e[0] == "epoch"]
    test_positions = [i for i, e in enumerate(order) if e[:2] == ("predictions", "test")]
    assert len(test_positions) == 3
    stage_of_epochs = [e[1] for e in order if e[0] == "epoch"]
    for stage_name, pos in zip(["source", "intermediate", "target"], test_positions):
        later_epochs = [e for e in order[pos:] if e[0] == "epoch" and e[1] == stage_name]
        assert not later_epochs, f"{stage_name} trained after looking at its test split"
    assert stage_of_epochs  # the spy saw training
    sel = json.loads((result.run_dir / "intermediate" / "selection.json").read_text())
    assert sel["split"] == "val"
    for cand in sel["candidates"]:
        assert "test" not in json.dumps(cand)
    best = max(sel["candidates"], key=lambda c: c["selection_value"])
    assert sel["selected"] == best["variant"]


def test_handed_down_weights_are_the_selected_variants(finished):
    result, _ = finished
    d = result.run_dir
    sel = json.loads((d / "intermediate" / "selection.json").read_text())
    winner, _ = load_weights(d / "intermediate" / "model.safetensors")
    variants = {c["variant"]: load_weights(d / "intermediate" / "variants" / c["variant"] / "model.safetensors")[0]
                for c in sel["candidates"]}
    assert all(torch.equal(winner[k], variants[sel["selected"]][k]) for k in winner)
    losers = [v for name, v in variants.items() if name != sel["selected"]]
    assert any(not torch.equal(winner["head.N1.0.weight"], v["head.N1.0.weight"]) for v in losers)
    # the target froze everything it inherited: its trunk and N layers are exactly the intermediate winner's
    target, meta = load_weights(d / "target" / "model.safetensors")
    spec = json.loads(meta["spec"])
    assert spec["classes"] == ["normal", "caroli-focal", "caroli-diffuse"]
    for k, v in winner.items():
        if not k.startswith("head.classifier"):
            assert torch.equal(target[k], v), k
    # and the source winner's trunk is what the intermediate stage started from: its frozen C1 is unchanged
    source_sel = json.loads((d / "source" / "selection.json").read_text())
    source, _ = load_weights(d / "source" / "model.safetensors")
    assert source_sel["selected"].startswith("backbone=")
    for k in source:
        if k.startswith("trunk.C1."):
            assert torch.equal(source[k], winner[k])


@pytest.mark.slow
def test_same_seed_same_result(finished, tmp_path, tiny_config):
    result, _ = finished
    again = mltl.run(tiny_config("inherited"), out=tmp_path / "again", device="cpu")
    for a, b in zip(result.stages, again.stages):
        assert a.metrics["auc_macro"] == b.metrics["auc_macro"] or (np.isnan(a.metrics["auc_macro"]) and np.isnan(b.metrics["auc_macro"]))
        np.testing.assert_array_equal(a.test.probs, b.test.probs)


def test_existing_run_directory_is_never_overwritten(finished):
    result, _ = finished
    with pytest.raises(mltl.UserError, match="already exists and is not empty"):
        mltl.run(result.run_dir / "config.toml", out=result.run_dir, device="cpu")
