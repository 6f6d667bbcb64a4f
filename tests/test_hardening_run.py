"""Issue 16, runs, training and outputs: batches of one, the run directory's lock, leftover temporaries,
outputs that would overwrite a run's own files, and CSV cells a spreadsheet would execute."""

import inspect
import logging
import os
import platform
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import mltl
from mltl import ConfigError, UserError, get_registry
from mltl.builtins import fractal_domain
from mltl.cli import commands as cli
from mltl.config import InputConfig, TrainConfig
from mltl.data.domain import prepare_images
from mltl.evaluation.results import Predictions
from mltl.networks.network import HeadSpec, build_network, make_spec
from mltl.running import chain, rundir
from mltl.running.rundir import RunLock, is_run_file, predictions_csv, read_predictions, remove_orphan_temporaries
from mltl.training.train import TensorData, fit

SIZE = 56
INP = InputConfig(size=SIZE, channels=1)

RUN = """
[run]
name = "hardening"
seed = 4
reporters = []

[input]
size = 56
channels = 1

[[stages]]
name = "target"
domain = {{ plugin = "ct-phantom", classes = ["normal", "cyst"], images_per_class = 8, seed = 3 }}
backbone = {backbone}
split = {{ val = 0.25, test = 0.25, protocol = "holdout" }}
train = {{ epochs = 1, batch_size = {batch_size}, optimizer = "adamw", lr = 0.001 }}
"""


def network(batch_norm: bool, seed: int = 0):
    torch.manual_seed(seed)
    spec = make_spec("gfe-2", {"batch_norm": batch_norm}, 1, SIZE, HeadSpec(), ("a", "b", "c"))
    return build_network(spec, get_registry())


@pytest.fixture(scope="module")
def images():
    dom = fractal_domain(classes=3, images_per_class=5, seed=7, channels=1, image_size=SIZE)
    return prepare_images(dom.images, size=SIZE, channels=1), torch.from_numpy(dom.labels)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished one-stage run (gfe-1, one epoch)."""
    tmp = tmp_path_factory.mktemp("hardening")
    (tmp / "c.toml").write_text(RUN.format(backbone='"gfe-1"', batch_size=4))
    return mltl.run(tmp / "c.toml", out=tmp / "run", device="cpu").run_dir


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mltl: error: ") and "Traceback" not in err, err
    return err


# ------------------------------------------------------------------ 1: batch_size = 1


def test_batch_size_one_trains_a_network_without_batch_norm(images):
    x, y = images
    net = network(batch_norm=False)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    res = fit(net, TensorData(x, y), TensorData(x, y), TrainConfig(epochs=1, batch_size=1, lr=1e-3), INP,
              classes=("a", "b", "c"), seed=0)
    assert res.history[0]["loss"] > 0  # every image was a batch that trained
    assert any(not torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_batch_size_one_with_batch_norm_is_refused_before_training(images, capsys, tmp_path):
    x, y = images
    net = network(batch_norm=True)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ConfigError, match=r"stages\.target\.train\.batch_size: 1 image per batch cannot train the "
                                          r"network's BatchNorm layers \(trunk\..*set stages\.target\.train\.batch_size "
                                          r"to 2 or more"):
        fit(net, TensorData(x, y), TensorData(x, y), TrainConfig(epochs=1, batch_size=1), INP,
            classes=("a", "b", "c"), seed=0, key="stages.target.train")
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    # BatchNorm layers in frozen groups stay in eval mode: a batch of one trains the rest
    net.set_frozen(frozenset(net.trunk_groups))
    fit(net, TensorData(x, y), TensorData(x, y), TrainConfig(epochs=1, batch_size=1), INP, classes=("a", "b", "c"),
        seed=0)
    # from the command line: one line, exit 2
    (tmp_path / "c.toml").write_text(RUN.format(backbone='{ name = "gfe-1", batch_norm = true }', batch_size=1))
    assert cli.main(["run", str(tmp_path / "c.toml"), "--out", str(tmp_path / "run"), "--device", "cpu"]) == 2
    assert "train.batch_size: 1 image per batch cannot train" in one_line_error(capsys)


def test_a_last_batch_of_one_image_is_noted_once(images, caplog):
    x, y = images
    train = TensorData(x[:13], y[:13])  # 13 = 3 x 4 + 1
    with caplog.at_level(logging.WARNING, logger="mltl"):
        for seed in (0, 1):  # two variants of a stage: one note
            fit(network(batch_norm=True), train, train, TrainConfig(epochs=2, batch_size=4), INP,
                classes=("a", "b", "c"), seed=seed, key="stages.hardening-note.train")
    notes = [r.getMessage() for r in caplog.records if "last batch" in r.getMessage()]
    assert notes == [("stages.hardening-note.train.batch_size = 4: the 13 training images leave a last batch of 1, "
                      "too few to train on (BatchNorm needs 2 or more per process); each epoch leaves it out (the "
                      "order is shuffled, so other images each time)")]


# ------------------------------------------------------------------ 8: the lock


def test_two_racing_takeovers_of_a_stale_lock_give_it_to_exactly_one(tmp_path, monkeypatch):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = tmp_path / ".lock"
    lock.write_text(f"{platform.node()} {dead.pid}")
    # a delay between seeing the stale lock and removing it (where a read-then-unlink takeover races),
    # longer for the second thread, so it acts after the first has taken the lock
    delays = {"first": 0.1, "second": 0.5}
    unlink = Path.unlink

    def slow_unlink(self, *args, **kwargs):
        if self == lock:
            import time

            time.sleep(delays.get(threading.current_thread().name, 0))
        return unlink(self, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", slow_unlink)
    start, attempted = threading.Barrier(2), threading.Barrier(2, timeout=30)
    outcome = {}

    def take(name):
        start.wait()
        try:
            with RunLock(tmp_path):
                outcome[name] = "held"
                attempted.wait()  # hold it until the other has tried
        except UserError as exc:
            outcome[name] = str(exc)
            attempted.wait()

    threads = [threading.Thread(target=take, args=(n,), name=n) for n in ("first", "second")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert list(outcome.values()).count("held") == 1, outcome
    assert "in use by process" in max(outcome.values(), key=len)
    assert not lock.exists()


def test_the_lock_of_a_killed_process_is_taken_over(tmp_path):
    script = (f"import time\nfrom mltl.running.rundir import RunLock\nwith RunLock({str(tmp_path)!r}):\n"
              f"    print('held', flush=True)\n    time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=f"in use by process {holder.pid} on "):
            RunLock(tmp_path).__enter__()
    finally:
        holder.kill()
        holder.wait()
    with RunLock(tmp_path):  # the kernel released the dead holder's lock; its file is still there
        assert (tmp_path / ".lock").read_text() == f"{platform.node()} {os.getpid()}"


# ------------------------------------------------------------------ 10: leftover temporaries


def test_orphan_temporaries_of_atomic_writes_are_removed(tmp_path):
    stage = tmp_path / "target"
    (stage / "variants" / "freeze=C1").mkdir(parents=True)
    # exactly what write_bytes_atomic makes, left behind by a SIGKILL
    orphans = [Path(tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)[1])
               for name, folder in (("checkpoint.pt", stage), ("model.safetensors", stage / "variants" / "freeze=C1"),
                                    ("state.json", tmp_path))]
    (tmp_path / ".source.reuse-tmp").mkdir()
    (tmp_path / ".source.reuse-tmp" / "metrics.json").write_text("{}")
    kept = [stage / "checkpoint.pt", stage / "notes.tmp", tmp_path / ".lock", tmp_path / "config.toml"]
    for path in kept:
        path.write_text("x")
    removed = remove_orphan_temporaries(tmp_path)
    assert sorted(removed) == sorted([*orphans, tmp_path / ".source.reuse-tmp"])
    assert not any(p.exists() for p in removed) and all(p.exists() for p in kept)


@pytest.mark.skipif("remove_orphan_temporaries" not in inspect.getsource(chain),
                    reason="core/mltl/running/chain.py does not call remove_orphan_temporaries yet")
def test_resume_removes_orphan_temporaries(finished_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    orphan = Path(tempfile.mkstemp(prefix=".checkpoint.pt.", suffix=".tmp", dir=run / "target")[1])
    mltl.run(run / "config.toml", out=run, device="cpu", resume=True)
    assert not orphan.exists()


# ------------------------------------------------------------------ 9 and 6: a run's own files


def test_is_run_file_names_a_runs_own_files_only(tmp_path):
    run = tmp_path / "run"
    (run / "target" / "variants" / "lr=0.1").mkdir(parents=True)
    (run / "config.toml").write_text("")
    assert not is_run_file(run / "target" / "model.safetensors")  # no state.json / environment.json: not a run
    (run / "state.json").write_text("{}")
    for own in ("config.toml", "state.json", "report.md", ".lock", "Report.HTML", "environment-resume-1.json",
                "target/model.safetensors", "target/predictions.csv", "target/model.json",
                "target/variants/lr=0.1/history.json", "target/repeats/fold1/metrics.json", "target/../config.toml"):
        assert is_run_file(run / own), own
    for other in ("target/model.onnx", "target/model.onnx.json", "notes.txt", "model.safetensors"):
        assert not is_run_file(run / other), other
    assert not is_run_file(tmp_path / "predictions.csv")
    (tmp_path / "link").symlink_to(run / "target")
    assert is_run_file(tmp_path / "link" / "predictions.csv")


def test_export_and_predict_refuse_to_overwrite_the_runs_own_files(finished_run, capsys):
    from mltl.deploy.predict import check_csv_path, write_predictions_csv

    stage = finished_run / "target"
    weights, record = (stage / "model.safetensors").read_bytes(), (stage / "predictions.csv").read_bytes()
    with pytest.raises(UserError, match="export: --out .*model.safetensors: that is a file of the run in"):
        mltl.export(stage, "torchscript", stage / "model.safetensors")
    with pytest.raises(UserError, match="its metadata file .*model.json: that is a file of the run"):
        mltl.export(stage, "torchscript", stage / "model")  # the sidecar would be model.json
    assert cli.main(["export", str(stage), "--format", "torchscript", "--out", str(stage / "model.safetensors")]) == 2
    assert "model.safetensors: that is a file of the run in" in one_line_error(capsys)
    with pytest.raises(UserError, match="predict: --csv .*predictions.csv: that is a file of the run in"):
        check_csv_path(stage / "predictions.csv")
    with pytest.raises(UserError, match="that is a file of the run in"):
        write_predictions_csv(finished_run / "config.toml", [], ("normal", "cyst"))
    assert (stage / "model.safetensors").read_bytes() == weights and (stage / "predictions.csv").read_bytes() == record
    result = mltl.export(stage, "torchscript")  # the default, STAGE/model.pt, is not one of them
    assert result.path == stage / "model.pt"


def test_metrics_log_file_cannot_be_a_run_file_or_leave_the_run_directory(tmp_path, capsys):
    from mltl_roc.reporter import MetricsLogReporter

    for bad in ("config.toml", "STATE.json", "report.html", ".lock", "environment-resume-x.json",
                ".metrics.jsonl.abcd1234.tmp"):
        with pytest.raises(UserError, match=f"file '{bad}' is one of the run directory's own files"):
            MetricsLogReporter(file=bad)
    for bad in ("..", ".", "../x.jsonl", "/tmp/x.jsonl", "logs/x.jsonl", ""):
        with pytest.raises(UserError, match="file must be a plain file name inside the run directory"):
            MetricsLogReporter(file=bad)
    assert MetricsLogReporter(file="epochs.jsonl").file == "epochs.jsonl"
    config = tmp_path / "c.toml"
    config.write_text(RUN.format(backbone='"gfe-1"', batch_size=4).replace(
        "reporters = []", 'reporters = ["metrics-log"]\nreporter_options = { metrics-log = { file = "config.toml" } }'))
    assert cli.main(["validate", str(config)]) == 2
    assert "file 'config.toml' is one of the run directory's own files" in one_line_error(capsys)


# ------------------------------------------------------------------ CSV injection


FORMULAS = ("=cmd|' /C calc'!A0", "+1", "-x", "@SUM(1)")


def test_predictions_csv_guards_formulas_and_reads_back_every_id(tmp_path):
    ids = (*FORMULAS, "'=quoted", "scans/ordinary.png")
    pred = Predictions(ids=ids, split="test", labels=np.array([0, 1, 0, 1, 0, 1]),
                       probs=np.tile([0.25, 0.75], (6, 1)), classes=("a", "b"), groups=ids[::-1])
    path = tmp_path / "predictions.csv"
    path.write_text(predictions_csv([pred]))
    lines = path.read_text().splitlines()
    assert lines[0] == "id,split,label,group,p_a,p_b"
    assert [line.split(",")[0] for line in lines[1:]][1:4] == ["'+1", "'-x", "'@SUM(1)"]
    assert lines[1].startswith("'=cmd|' /C calc'!A0,test,a,scans/ordinary.png,")
    assert lines[5].startswith("''=quoted,test,a,'+1,")  # a leading ' before a formula gets one more
    assert lines[6] == "scans/ordinary.png,test,b,'=cmd|' /C calc'!A0,0.25,0.75"  # an ordinary id: unchanged
    back = read_predictions(path, "test", ("a", "b"))
    assert back.ids == ids and back.groups == ids[::-1]


def test_predict_csv_guards_formulas_in_paths():
    from mltl.deploy.predict import predictions_csv as predict_csv

    text = predict_csv([(Path(f), np.array([0.5, 0.5])) for f in (*FORMULAS, "ok.png")], ("a", "b"))
    cells = [line.split(",")[0] for line in text.splitlines()[1:]]
    assert cells == ["'=cmd|' /C calc'!A0", "'+1", "'-x", "'@SUM(1)", "ok.png"]
    assert rundir.unguard_csv_cell("'+1") == "+1"


def test_a_run_directory_inside_the_image_folder_is_refused(tmp_path, capsys):
    """The run's PNGs would become training images of the next run: refused before anything is written."""
    import numpy as np
    from PIL import Image

    from mltl import cli

    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (24, 24), dtype=np.uint8)).save(tmp_path / "data" / c / f"{i}.png")
    cfg = tmp_path / "c.toml"
    cfg.write_text(f"""
[run]
name = "inside"
[input]
size = 32
[[stages]]
name = "only"
domain = {{ plugin = "image-folder", root = "{tmp_path / 'data'}" }}
backbone = "gfe-1"
split = {{ protocol = "holdout", val = 0.34, test = 0.34 }}
train = {{ epochs = 1, batch_size = 4 }}
""")
    out = tmp_path / "data" / "runs" / "x"
    assert cli.main(["run", str(cfg), "--out", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "is inside" in err and "stages[0].domain.root" in err and len(err.splitlines()) == 1
    assert not out.exists()
