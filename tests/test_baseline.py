"""``mltl compare`` trains a stage the chains share once, and states every difference with its paired CI
and a verdict that matches the numbers (a tiny real comparison)."""

import json

import mltl
import numpy as np
import pytest
from mltl.evaluation.stats import delong_test, paired_bootstrap
from mltl.running.compare import compare

TINY3 = """
[run]
name = "shared"
seed = 4
reporters = ["evaluation"]
reporter_options = { evaluation = { n_resamples = 50 } }

[input]
size = 32
channels = 1

[[stages]]
name = "source"
domain = { plugin = "fractal", classes = 2, images_per_class = 10, seed = 1, channels = 1 }
backbone = "gfe-1"
train = { epochs = 2, batch_size = 16, optimizer = "adamw", lr = 0.002 }

[[stages]]
name = "intermediate"
init = "source"
domain = { plugin = "ct-phantom", classes = ["normal", "cyst"], images_per_class = 10, seed = 11 }
train = { epochs = 1, batch_size = 16, optimizer = "adamw", lr = 0.002 }

[[stages]]
name = "target"
init = "intermediate"
domain = { plugin = "ct-phantom", classes = ["normal", "calculi"], images_per_class = 15, seed = 23 }
split = { protocol = "holdout", test = 0.4 }
train = { epochs = 1, batch_size = 8, optimizer = "adamw", lr = 0.001 }
"""


class EpochCounter:
    """Counts the training epochs each stage of every chain reports."""

    def __init__(self):
        self.epochs = {}

    @mltl.hookimpl
    def mltl_epoch_ended(self, stage_name, variant, epoch, metrics):
        self.epochs[stage_name] = self.epochs.get(stage_name, 0) + 1


@pytest.mark.slow
def test_compare_trains_the_shared_first_stage_once_and_states_each_verdict(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(TINY3)
    counter = EpochCounter()
    mltl.register_plugin(counter, name="epoch-counter-test")
    try:
        result = compare(cfg, out=tmp_path / "cmp", device="cpu", n_resamples=100)
    finally:
        mltl.unregister_plugin("epoch-counter-test")
    out = tmp_path / "cmp"
    # source: 2 epochs once (single-stage), copied into multi-stage; the target trains in each of the 3 chains
    assert counter.epochs == {"source": 2, "intermediate": 1, "target": 3}
    assert json.loads((out / "multi-stage" / "reused.json").read_text()) == {
        "source": str(out / "single-stage" / "source")}
    assert ((out / "multi-stage" / "source" / "model.safetensors").read_bytes()
            == (out / "single-stage" / "source" / "model.safetensors").read_bytes())
    md = (out / "comparison.md").read_text()
    ref = mltl.read_predictions(out / "multi-stage" / "target" / "predictions.csv", "test", ("normal", "calculi"))
    for row in result.rows[:2]:  # scratch and single-stage against multi-stage
        pred = mltl.read_predictions(out / row["chain"] / "target" / "predictions.csv", "test", ("normal", "calculi"))
        assert pred.ids == ref.ids
        boot = paired_bootstrap(pred.labels, pred.probs, ref.probs, classes=pred.classes, n_resamples=100, seed=4)
        from sklearn.metrics import roc_auc_score

        diff = roc_auc_score(pred.labels, pred.probs[:, 1]) - roc_auc_score(ref.labels, ref.probs[:, 1])
        lo, hi = boot["diff_ci_low"], boot["diff_ci_high"]
        d = row["diff_vs_reference"]
        assert d["diff"] == pytest.approx(diff, abs=1e-12) and d["diff_ci95"] == pytest.approx([lo, hi], abs=1e-12)
        assert row["p_vs_multi-stage"] == pytest.approx(delong_test(pred.labels, pred.probs[:, 1], ref.probs[:, 1])["p"])
        clear = bool(lo > 0 or hi < 0)
        how = "the same AUC as" if diff == 0 else f"an AUC {abs(diff):.3f} {'higher' if diff > 0 else 'lower'} than"
        expected = (f"{row['chain'][0].upper()}{row['chain'][1:]} reaches {how} multi-stage (95% CI {lo:+.3f} to "
                    f"{hi:+.3f}): {'a clear' if clear else 'no clear'} difference on these {len(ref)} test images")
        assert row["sentence"].startswith(expected) and row["sentence"] in md
    assert np.isfinite(result.rows[0]["auc_macro"])


def test_the_scratch_stage_drops_pretrained_weights():
    from mltl.config import scratch_stage

    stages = [{"name": "s", "backbone": {"name": "mobilenet-v1", "weights": "w.tar"}, "domain": {"plugin": "x"}},
              {"name": "t", "init": "s", "domain": {"plugin": "y"}, "freeze": "C1"}]
    table = scratch_stage(stages)
    assert table["backbone"] == {"name": "mobilenet-v1"} and "init" not in table and "freeze" not in table
    swept = scratch_stage([{**stages[0], "backbone": {"sweep": [{"name": "timm", "model": "resnet18",
                                                                  "pretrained": True}, "gfe-1"]}}, stages[1]])
    assert swept["backbone"] == {"sweep": [{"name": "timm", "model": "resnet18"}, "gfe-1"]}


def test_restrict_to_backbone_keeps_the_selected_backbones_variants():
    from mltl.config import parse_config, restrict_to_backbone, scratch_stage

    stages = [{"name": "s", "domain": {"plugin": "fractal"}, "backbone": {"sweep": [
                   "gfe-1", {"name": "gfe-2", "batch_norm": True}]}},
              {"name": "t", "init": "s", "domain": {"plugin": "fractal"}}]
    raw = {"run": {"name": "r"}, "stages": [scratch_stage(stages)]}
    stage = parse_config(raw).stages[0]
    assert len(stage.variants) == 2
    one = restrict_to_backbone(stage, "gfe-2", {"batch_norm": True, "weights": "w.safetensors"})
    assert one.variants[0][0] == "" and len(one.variants) == 1 and one.swept == ()
    assert one.first.backbone.name == "gfe-2" and one.first.backbone.options == {"batch_norm": True}
    assert restrict_to_backbone(stage, "gfe-2", {}) is stage  # no variant has it: unchanged
    # another sweep stays; only the backbone's values are narrowed
    raw["stages"][0]["train"] = {"lr": {"sweep": [0.01, 0.001]}}
    stage = parse_config(raw).stages[0]
    two = restrict_to_backbone(stage, "gfe-1", {})
    assert [c.train.lr for _, c in two.variants] == [0.01, 0.001]
    assert {c.backbone.name for _, c in two.variants} == {"gfe-1"}


SWEPT = TINY3.replace('backbone = "gfe-1"', 'backbone = { sweep = ["gfe-2", "gfe-1"] }\nselect_by = "loss"').replace("size = 32", "size = 56")


@pytest.mark.slow
def test_the_scratch_baseline_trains_the_backbone_the_first_stage_selected(tmp_path):
    """With a swept first stage, the run's baseline and compare's scratch chain train the network the chain's
    first stage selected, once: the same network as the chain's target, from random weights."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(SWEPT.replace('name = "shared"', 'name = "shared"\nbaseline = "scratch"'))
    counter = EpochCounter()
    mltl.register_plugin(counter, name="epoch-counter-test")
    try:
        result = mltl.run(cfg, out=tmp_path / "run", device="cpu")
    finally:
        mltl.unregister_plugin("epoch-counter-test")
    run = result.run_dir
    chosen = json.loads((run / "source" / "metrics.json").read_text())["selected_variant"]
    spec = json.loads((run / "source" / "model.json").read_text())["spec"]
    assert chosen == f"backbone={spec['backbone']}"
    scratch = json.loads((run / "target-scratch" / "model.json").read_text())["spec"]
    assert scratch["backbone"] == spec["backbone"] and not (run / "target-scratch" / "variants").exists()
    assert counter.epochs["target-scratch"] == 1  # one backbone, one epoch: no sweep
    assert f"selected (`{spec['backbone']}`)" in (run / "report.md").read_text()

    cmp_cfg = tmp_path / "cmp.toml"
    cmp_cfg.write_text(SWEPT)
    compare(cmp_cfg, out=tmp_path / "cmp", device="cpu", n_resamples=50)
    out = tmp_path / "cmp"
    picked = json.loads((out / "single-stage" / "source" / "model.json").read_text())["spec"]["backbone"]
    assert json.loads((out / "scratch" / "target" / "model.json").read_text())["spec"]["backbone"] == picked
    assert 'name = "' + picked + '"' in (out / "scratch" / "config.toml").read_text()
    assert not (out / "scratch" / "target" / "variants").exists()
