"""The opt-in MLflow reporter: one MLflow run per mltl run, read back with MLflow's own client."""

import json
import os
import sys
from pathlib import Path

import pytest

import mltl

SETS = ["stages.source.backbone=gfe-1", "stages.intermediate.freeze=C1"]  # the tiny chain, one variant per stage


@pytest.mark.slow
def test_an_mlflow_run_holds_the_config_the_curves_the_test_metrics_and_the_report(tmp_path, tiny_config,
                                                                                   monkeypatch):
    pytest.importorskip("mlflow", reason="the mlflow reporter needs mlflow-skinny (requirements-dev.txt)")
    from mlflow.tracking import MlflowClient

    from mltl.evaluation.reporting import make_reporters
    from mltl.plugins import get_registry

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    cfg = mltl.load_config(tiny_config(), SETS)
    assert "MlflowReporter" not in [type(r).__name__ for r in make_reporters(cfg, get_registry())]  # opt-in
    cfg = mltl.load_config(tiny_config(), [*SETS, 'stages.intermediate.freeze={ sweep = ["C1", "C1-C2"] }',
                                           'run.reporters=["roc", "mlflow"]'])
    result = mltl.run(cfg, out=tmp_path / "run", device="cpu")
    run_dir = result.run_dir
    assert "MLFLOW_ALLOW_FILE_STORE" not in os.environ  # set around the reporter's own calls only

    store = run_dir / "mlruns"
    assert store.is_dir() and not (Path.cwd() / "mlruns").exists()
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for it to read a file store
    client = MlflowClient(tracking_uri=store.as_uri())
    experiment = client.get_experiment_by_name("tiny")  # default: the run's name
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.tags["mltl.run_dir"] == str(run_dir.resolve())

    params = run.data.params
    assert params["stages.target.train.lr"] == "0.001"
    assert params["stages.target.train.epochs"] == "3"
    assert params["stages.target.train.optimizer"] == "adamw"
    assert params["stages.target.split.protocol"] == "holdout"
    assert params["stages.target.domain.plugin"] == "ct-phantom"
    assert params["stages.target.domain.classes"] == '["normal", "caroli-focal", "caroli-diffuse"]'
    assert params["input.size"] == "56" and params["run.seed"] == "3"
    assert params["stages.source.backbone.name"] == "gfe-1"
    assert params["stages.intermediate.freeze"] == '["C1", "C1-C2"]'  # a sweep: its values
    assert params["stages.intermediate.swept"] == '["freeze"]'
    assert params["stages.target.train.momentum"] == "0.9"  # a default the TOML does not set

    history = json.loads((run_dir / "target" / "history.json").read_text())
    loss = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "target/loss")]
    assert sorted(loss) == [(row["epoch"], pytest.approx(row["loss"])) for row in history]
    auc = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "target/val_auc"))
    assert [v for _, v in auc] == pytest.approx([row["val_auc"] for row in history])
    for variant in ("freeze:C1", "freeze:C1-C2"):  # each variant of a sweep its own curve
        assert len(client.get_metric_history(run.info.run_id, f"intermediate/{variant}/loss")) == 2
    test_auc = client.get_metric_history(run.info.run_id, "target/test/auc_macro")
    assert [m.value for m in test_auc] == [pytest.approx(result.stage("target").metrics["auc_macro"])]

    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.md", "report.html", "config", "figures"} <= top
    assert {a.path for a in client.list_artifacts(run.info.run_id, "config")} >= {
        "config/config.toml", "config/environment.json"}
    assert "figures/target/roc.png" in {a.path for a in client.list_artifacts(run.info.run_id, "figures/target")}
    report = Path(client.download_artifacts(run.info.run_id, "report.md", str(tmp_path / "down")))
    assert "target" in report.read_text() and report.read_text().startswith("#")


def test_a_store_inside_the_run_directory_keeps_long_values_within_mlflows_limit(tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="the mlflow reporter needs mlflow-skinny (requirements-dev.txt)")
    from mlflow.tracking import MlflowClient

    from mltl_roc.mlflow_reporter import MlflowReporter

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    path = tmp_path / "c.toml"
    path.write_text('[run]\nname = "long"\n[[stages]]\nname = "only"\nbackbone = "gfe-1"\n'
                    f'domain = {{ plugin = "fractal", note = "{"x" * 7000}", '
                    'url = "https://someone:secret@example.org/data" }\n')
    cfg = mltl.load_config(path)
    reporter = MlflowReporter(experiment="exp", run_name="first")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    reporter.run_started(cfg, run_dir)
    reporter.epoch_ended("only", "", 1, {"epoch": 1, "loss": 0.5, "val_auc": float("nan"), "epochs": 1})
    reporter.run_finished([], run_dir)

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(run_dir / "mlruns").as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("exp").experiment_id])
    assert run.info.run_name == "first"
    note = run.data.params["stages.only.domain.note"]
    assert 0 < len(note) <= reporter.max_param_length < 7000 and set(note) == {"x"}
    assert run.data.params["stages.only.domain.url"] == "https://***@example.org/data"  # no credentials logged
    assert [m.value for m in client.get_metric_history(run.info.run_id, "only/loss")] == [0.5]
    assert client.get_metric_history(run.info.run_id, "only/val_auc") == []  # not scored that epoch


def test_without_mlflow_the_reporter_names_the_install_in_one_line(tmp_path, tiny_config, monkeypatch):
    from mltl_roc.mlflow_reporter import MlflowReporter

    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if it were not installed
    with pytest.raises(mltl.UserError, match="pip install mlflow-skinny"):
        MlflowReporter()
    cfg = mltl.load_config(tiny_config(), [*SETS, 'run.reporters=["mlflow"]'])
    with pytest.raises(mltl.UserError, match="pip install mlflow-skinny") as caught:
        mltl.validate(cfg)
    assert "\n" not in str(caught.value)


def test_bad_options_are_refused():
    from mltl_roc.mlflow_reporter import MlflowReporter

    with pytest.raises(ValueError, match="store must be one of"):
        MlflowReporter(store="postgres")
    with pytest.raises(ValueError, match="tracking_uri must not be empty"):
        MlflowReporter(tracking_uri=" ")


def test_a_sqlite_store_inside_the_run_directory(tmp_path, tiny_config):
    pytest.importorskip("mlflow", reason="the mlflow reporter needs mlflow-skinny (requirements-dev.txt)")
    pytest.importorskip("sqlalchemy", reason='store = "sqlite" needs sqlalchemy and alembic')
    pytest.importorskip("alembic", reason='store = "sqlite" needs sqlalchemy and alembic')
    from mlflow.tracking import MlflowClient

    from mltl_roc.mlflow_reporter import MlflowReporter

    cfg = mltl.load_config(tiny_config(), SETS)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "report.md").write_text("# tiny\n")
    reporter = MlflowReporter(store="sqlite")
    reporter.run_started(cfg, run_dir)
    reporter.epoch_ended("target", "", 2, {"loss": 0.25})
    reporter.run_finished([], run_dir)

    client = MlflowClient(tracking_uri=f"sqlite:///{(run_dir / 'mlflow.db').as_posix()}")
    (run,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert run.data.params["stages.target.train.lr"] == "0.001"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "target/loss")] == [(2, 0.25)]
    assert (run_dir / "mlruns").is_dir() and not (Path.cwd() / "mlartifacts").exists()
    report = client.download_artifacts(run.info.run_id, "report.md", str(tmp_path / "down"))
    assert Path(report).read_text() == "# tiny\n"


def test_a_resumed_run_continues_its_mlflow_run(tmp_path, tiny_config, monkeypatch):
    pytest.importorskip("mlflow", reason="the mlflow reporter needs mlflow-skinny (requirements-dev.txt)")
    from mlflow.tracking import MlflowClient

    from mltl_roc.mlflow_reporter import MlflowReporter

    cfg = mltl.load_config(tiny_config(), SETS)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    first = MlflowReporter()
    first.run_started(cfg, run_dir)
    first.epoch_ended("source", "", 1, {"loss": 0.9})  # then the process is killed: no run_finished
    second = MlflowReporter()  # mltl run --resume
    second.run_started(cfg, run_dir)
    assert second.run_id == first.run_id
    second.epoch_ended("source", "", 2, {"loss": 0.8})
    second.run_finished([], run_dir)

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(run_dir / "mlruns").as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert run.info.status == "FINISHED"
    assert sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "source/loss")) == [
        (1, 0.9), (2, 0.8)]


def test_no_stage_may_take_the_name_of_the_store_folder(tiny_config):
    pytest.importorskip("mlflow", reason="the mlflow reporter needs mlflow-skinny (requirements-dev.txt)")
    cfg = mltl.load_config(tiny_config(), [*SETS, "stages.target.name=mlruns", 'run.reporters=["mlflow"]'])
    with pytest.raises(mltl.ConfigError, match='stage name "mlruns" is also the name of what a reporter writes'):
        mltl.validate(cfg)
