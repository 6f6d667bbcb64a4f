"""The opt-in W&B reporter: one offline W&B run per mltl run inside the run directory, read back with wandb's own
reader of its transaction log (``wandb leet inspect --json``) and checked by ``wandb sync --dry-run``."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import mltl

# each test starts wandb's background service and trains a tiny chain: in the slow phase of CI
pytestmark = pytest.mark.slow

SETS = ["stages.source.backbone=gfe-1", "stages.intermediate.freeze=C1"]  # the tiny chain, one variant per stage
WANDB_ENV = ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_MODE")


def _wandb(*args: str) -> subprocess.CompletedProcess:
    """wandb's command line, from the interpreter running the tests."""
    return subprocess.run([sys.executable, "-m", "wandb", *args], capture_output=True, text=True, timeout=120,
                          check=True)


def _offline_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def _records(offline_run: Path) -> list[dict]:
    """Every record of the run's ``.wandb`` transaction log, as wandb's own reader prints them."""
    out = _wandb("leet", "inspect", "--json", str(offline_run)).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def _summary(offline_run: Path) -> dict:
    """The run's state, config and summary, as wandb's own reader puts them together."""
    return json.loads(_wandb("leet", "inspect", "--summary", "--json", str(offline_run)).stdout)


def _history(records: list[dict], name: str, x_axis: str) -> list[tuple[int, float]]:
    rows = [r["history"]["item"] for r in records if r["type"] == "history"]
    return [(row[x_axis], row[name]) for row in rows if name in row]


def _saved(records: list[dict]) -> set[str]:
    return {f["path"] for r in records if r["type"] == "files" for f in r["files"]["files"]}


def _wandb_files(home: Path) -> list[Path]:
    """What W&B left in HOME (~/.cache/wandb, ~/.config/wandb, ~/.local/share/wandb, ~/wandb, ~/.netrc); the
    roc reporter's matplotlib keeps its own font cache there."""
    return [p for p in home.rglob("*") if "wandb" in p.name.lower() or p.name == ".netrc"]


@pytest.fixture
def isolated_home(tmp_path, monkeypatch):
    """HOME and the XDG folders in tmp_path, so that anything W&B wrote outside the run directory shows."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for key in ("XDG_CACHE_HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME"):
        monkeypatch.delenv(key, raising=False)
    for key in WANDB_ENV:
        monkeypatch.delenv(key, raising=False)
    return home


def test_a_wandb_run_holds_the_config_the_curves_the_test_metrics_and_the_report(tmp_path, tiny_config,
                                                                                 isolated_home):
    pytest.importorskip("wandb", reason="the wandb reporter needs wandb (requirements-dev.txt)")
    from mltl.evaluation.reporting import make_reporters
    from mltl.plugins import get_registry

    cfg = mltl.load_config(tiny_config(), SETS)
    assert "WandbReporter" not in [type(r).__name__ for r in make_reporters(cfg, get_registry())]  # opt-in
    cfg = mltl.load_config(tiny_config(), [*SETS, 'stages.intermediate.freeze={ sweep = ["C1", "C1-C2"] }',
                                           'run.reporters=["roc", "wandb"]'])
    result = mltl.run(cfg, out=tmp_path / "run", device="cpu")
    run_dir = result.run_dir
    assert not [k for k in WANDB_ENV if k in os.environ]  # set around the reporter's own calls only
    assert _wandb_files(isolated_home) == [] and not (Path.cwd() / "wandb").exists()  # all in the run dir
    assert (run_dir / "wandb" / ".cache").is_dir()  # W&B's own debug logs: RUN_DIR/wandb/.cache, not ~/.cache

    (offline,) = _offline_runs(run_dir)  # the default mode: offline, one W&B run
    summary = _summary(offline)
    assert summary["state"] == "finished" and summary["project"] == "tiny" and summary["name"] == "run"
    params = summary["config"]
    assert params["stages.target.train.lr"] == 0.001 and params["stages.target.train.epochs"] == 3
    assert params["stages.target.train.optimizer"] == "adamw"
    assert params["stages.target.domain.plugin"] == "ct-phantom"
    assert params["stages.target.domain.classes"] == ["normal", "caroli-focal", "caroli-diffuse"]
    assert params["input.size"] == 56 and params["run.seed"] == 3
    assert params["stages.intermediate.freeze"] == ["C1", "C1-C2"]  # a sweep: its values
    assert params["stages.intermediate.swept"] == ["freeze"]
    assert params["stages.target.train.momentum"] == 0.9  # a default the TOML does not set
    assert params["mltl.run_dir"] == str(run_dir.resolve()) and params["mltl.version"] == mltl.__version__
    assert summary["summary"]["target/test/auc_macro"] == pytest.approx(result.stage("target").metrics["auc_macro"])

    records = _records(offline)
    history = json.loads((run_dir / "target" / "history.json").read_text())
    assert _history(records, "target/loss", "target/epoch") == [
        (row["epoch"], pytest.approx(row["loss"])) for row in history]
    auc = _history(records, "target/val_auc", "target/epoch")
    assert [v for _, v in auc] == pytest.approx([row["val_auc"] for row in history])
    for variant in ("freeze:C1", "freeze:C1-C2"):  # each variant of a sweep its own curve and x-axis
        assert [e for e, _ in _history(records, f"intermediate/{variant}/loss", f"intermediate/{variant}/epoch")] \
               == [1, 2]
    axes = {r["metric"]["name"]: r["metric"]["step_metric"] for r in records if r["type"] == "metric"}
    assert axes["target/loss"] == "target/epoch"

    saved = _saved(records)
    assert {"report.md", "report.html", "config/config.toml", "config/environment.json",
            "figures/target/roc.png"} <= saved
    assert (offline / "files" / "report.md").read_text().startswith("#")
    assert "target" in (offline / "files" / "report.md").read_text()
    # and wandb itself takes the folder for a run to upload
    sync = _wandb("sync", "--dry-run", str(offline))
    assert "Would sync 1 run" in sync.stdout + sync.stderr


def test_long_values_credentials_and_unscored_epochs(tmp_path, isolated_home):
    pytest.importorskip("wandb", reason="the wandb reporter needs wandb (requirements-dev.txt)")
    from mltl_roc.wandb_reporter import WandbReporter

    path = tmp_path / "c.toml"
    path.write_text('[run]\nname = "long"\n[[stages]]\nname = "only"\nbackbone = "gfe-1"\n'
                    f'domain = {{ plugin = "fractal", note = "{"x" * 7000}", '
                    'url = "https://someone:secret@example.org/data" }\n')
    cfg = mltl.load_config(path)
    reporter = WandbReporter(project="exp", run_name="first")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    reporter.run_started(cfg, run_dir)
    reporter.epoch_ended("only", "", 1, {"epoch": 1, "loss": 0.5, "val_auc": float("nan"), "epochs": 1})
    reporter.run_finished([], run_dir)

    (offline,) = _offline_runs(run_dir)
    summary = _summary(offline)
    assert summary["project"] == "exp" and summary["name"] == "first"
    assert summary["config"]["stages.only.domain.note"] == "x" * 7000  # W&B has no short length limit
    assert summary["config"]["stages.only.domain.url"] == "https://***@example.org/data"  # no credentials logged
    records = _records(offline)
    assert _history(records, "only/loss", "only/epoch") == [(1, 0.5)]
    assert _history(records, "only/val_auc", "only/epoch") == []  # not scored that epoch
    assert _wandb_files(isolated_home) == []


def test_a_resumed_run_continues_its_wandb_run(tmp_path, tiny_config, isolated_home):
    pytest.importorskip("wandb", reason="the wandb reporter needs wandb (requirements-dev.txt)")
    import wandb

    from mltl_roc.wandb_reporter import WandbReporter

    cfg = mltl.load_config(tiny_config(), SETS)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    first = WandbReporter()
    first.run_started(cfg, run_dir)
    first.epoch_ended("source", "", 1, {"loss": 0.9})
    first_id = first.run.id
    wandb.teardown()  # then the process dies: no run_finished
    second = WandbReporter()  # mltl run --resume
    second.run_started(cfg, run_dir)
    assert second.run.id == first_id
    second.epoch_ended("source", "", 2, {"loss": 0.8})
    second.run_finished([], run_dir)

    before, after = _offline_runs(run_dir)  # one file per process, one W&B run: wandb sync uploads them in turn
    assert _summary(before)["run_id"] == _summary(after)["run_id"] == first_id
    rows = [r["history"] for offline in (before, after) for r in _records(offline) if r["type"] == "history"]
    assert [(row["step"]["num"], row["item"]["source/epoch"], row["item"]["source/loss"]) for row in rows] == [
        (0, 1, 0.9), (1, 2, 0.8)]  # the steps go on, so the resumed rows are not dropped on upload
    assert _wandb_files(isolated_home) == []


def test_without_wandb_the_reporter_names_the_install_in_one_line(tiny_config, monkeypatch):
    from mltl_roc.wandb_reporter import WandbReporter

    monkeypatch.setitem(sys.modules, "wandb", None)  # as if it were not installed
    with pytest.raises(mltl.UserError, match="pip install wandb"):
        WandbReporter()
    cfg = mltl.load_config(tiny_config(), [*SETS, 'run.reporters=["wandb"]'])
    with pytest.raises(mltl.UserError, match="pip install wandb") as caught:
        mltl.validate(cfg)
    assert "\n" not in str(caught.value)


def test_bad_options_are_refused():
    from mltl_roc.wandb_reporter import WandbReporter

    with pytest.raises(ValueError, match="mode must be one of 'offline', 'online'"):
        WandbReporter(mode="disabled")
    with pytest.raises(ValueError, match="project must not be empty"):
        WandbReporter(project=" ")


def test_no_stage_may_take_the_name_of_the_wandb_folder(tiny_config):
    pytest.importorskip("wandb", reason="the wandb reporter needs wandb (requirements-dev.txt)")
    cfg = mltl.load_config(tiny_config(), [*SETS, "stages.target.name=wandb", 'run.reporters=["wandb"]'])
    with pytest.raises(mltl.ConfigError, match='stage name "wandb" is also the name of what a reporter writes'):
        mltl.validate(cfg)
