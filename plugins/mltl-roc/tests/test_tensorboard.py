"""The opt-in TensorBoard reporter writes the training curves and test metrics that history.json holds, and the
run's configuration as hyper-parameters with its final metrics."""

import json

import pytest

import mltl

pytest.importorskip("tensorboard", reason="the tensorboard reporter needs the tensorboard package")


@pytest.mark.slow
def test_tensorboard_scalars_match_the_history(tmp_path, tiny_config):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mltl.evaluation.reporting import make_reporters
    from mltl.plugins import get_registry

    cfg = mltl.load_config(tiny_config(), ["stages.source.backbone=gfe-1", "stages.intermediate.freeze=C1"])
    assert "TensorBoardReporter" not in [type(r).__name__ for r in make_reporters(cfg, get_registry())]  # opt-in
    cfg = mltl.load_config(tiny_config(), ["stages.source.backbone=gfe-1", "stages.intermediate.freeze=C1",
                                           'run.reporters=["roc", "tensorboard"]'])
    result = mltl.run(cfg, out=tmp_path / "run", device="cpu")
    history = json.loads((result.run_dir / "target" / "history.json").read_text())
    events = EventAccumulator(str(result.run_dir / "tensorboard" / "target"))
    events.Reload()
    loss = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert loss == [(row["epoch"], pytest.approx(row["loss"], rel=1e-6)) for row in history]
    auc = [e.value for e in events.Scalars("val/auc")]
    assert auc == pytest.approx([row["val_auc"] for row in history], rel=1e-6)
    test_auc = events.Scalars("test/auc_macro")
    assert len(test_auc) == 1 and test_auc[0].value == pytest.approx(result.stage("target").metrics["auc_macro"])


    # the hyper-parameters: the flattened config, with each stage's final metrics, for the HPARAMS tab
    from tensorboard.plugins.hparams import plugin_data_pb2

    hp = EventAccumulator(str(result.run_dir / "tensorboard" / "_hparams"))
    hp.Reload()
    content = hp.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    values = start.session_start_info.hparams
    assert values["stages.target.train.lr"].number_value == pytest.approx(0.001)
    assert values["stages.target.train.epochs"].number_value == 3
    assert values["stages.target.train.optimizer"].string_value == "adamw"
    assert values["stages.source.backbone.name"].string_value == "gfe-1"
    assert values["input.size"].number_value == 56
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    metric_tags = {m.name.tag for m in experiment.metric_infos}
    assert {f"final/{s}/auc_macro" for s in ("source", "intermediate", "target")} <= metric_tags
    final = hp.Scalars("final/target/auc_macro")
    assert [e.value for e in final] == [pytest.approx(result.stage("target").metrics["auc_macro"])]


def test_a_bad_log_dir_is_one_line():
    from mltl_roc.tensorboard import TensorBoardReporter

    with pytest.raises(mltl.UserError, match="log_dir must be a plain folder name"):
        TensorBoardReporter(log_dir="../elsewhere")
