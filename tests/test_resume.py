"""Nothing lost: a killed run resumes to the same result; locks; damaged files are repaired or named."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import TINY

pytestmark = pytest.mark.slow


def start(cfg, out, *extra, env=None):
    e = {**os.environ, "MLTL_CHECKPOINT_SECONDS": "0", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "mltl", "run", str(cfg), "--out", str(out), "--device", "cpu",
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=e)


def finish(proc, timeout=300):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def wait_for(path_glob: str, root: Path, timeout=240):
    t0 = time.time()
    while time.time() - t0 < timeout:
        hits = list(root.glob(path_glob))
        if hits:
            return hits[0]
        time.sleep(0.05)
    raise AssertionError(f"{path_glob} never appeared under {root}")


def outputs(run_dir: Path) -> dict:
    """Everything that must be identical between an uninterrupted and a resumed run."""
    out = {}
    for stage in ("source", "intermediate", "target"):
        m = json.loads((run_dir / stage / "metrics.json").read_text())
        # trainable_parameters and frozen: a sweep winner finished before the interruption is reloaded with
        # its frozen groups (it once counted every parameter as trainable)
        out[stage] = {k: m[k] for k in ("auc_macro", "accuracy", "selected_variant", "best_epoch", "epochs_run",
                                        "trainable_parameters", "frozen")}
        out[stage]["predictions"] = (run_dir / stage / "predictions.csv").read_text()
    return out


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume")
    cfg = d / "tiny.toml"
    cfg.write_text(TINY.format(target_freeze="C1").replace("epochs = 3, batch_size = 8", "epochs = 12, batch_size = 8"))
    return cfg


@pytest.fixture(scope="module")
def reference_dir(config, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    code, _, err = finish(start(config, out))
    assert code == 0, err
    return out


@pytest.fixture(scope="module")
def reference(reference_dir):
    return outputs(reference_dir)


@pytest.fixture
def finished_copy(reference_dir, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference_dir, out)
    return out


def test_sigkill_mid_stage_then_resume_gives_the_same_result(config, reference, tmp_path):
    out = tmp_path / "run"
    proc = start(config, out)
    wait_for("target/checkpoint.pt", out)  # the last stage is training and has saved at least one epoch
    proc.kill()
    proc.wait()
    assert json.loads((out / "state.json").read_text())["state"] == "running"  # killed: no chance to say more
    assert (out / "intermediate" / "metrics.json").is_file() and not (out / "target" / "metrics.json").exists()
    os.utime(out / "config.toml")
    code, _, err = finish(start(config, out, "--resume"))
    assert code == 0, err
    assert outputs(out) == reference  # exact on CPU: weights, optimizer, scheduler and RNG states restored
    assert json.loads((out / "state.json").read_text())["state"] == "finished"
    assert not list(out.rglob("checkpoint.pt"))


def test_sigterm_saves_a_checkpoint_and_resume_finishes_it(config, reference, tmp_path):
    out = tmp_path / "run"
    proc = start(config, out, env={"MLTL_CHECKPOINT_SECONDS": "3600"})  # only the signal makes a checkpoint
    wait_for("intermediate/variants/*/history.json", out)
    proc.send_signal(signal.SIGTERM)
    code, _, err = finish(proc)
    assert code == 130, err
    assert "--resume" in err and "Traceback" not in err
    state = json.loads((out / "state.json").read_text())
    assert state["state"] == "interrupted" and Path(state["checkpoint"]).is_file()
    code, _, err = finish(start(config, out, "--resume"))
    assert code == 0, err
    assert outputs(out) == reference


def test_a_second_run_on_a_locked_directory_is_refused(config, tmp_path):
    out = tmp_path / "run"
    first = start(config, out)
    try:
        wait_for(".lock", out)
        second = subprocess.run([sys.executable, "-m", "mltl", "run", str(config), "--out", str(out), "--resume"],
                                capture_output=True, text=True, timeout=120)
    finally:
        first.kill()
        first.wait()
    assert second.returncode == 2 and "is in use by process" in second.stderr
    assert "Traceback" not in second.stderr


def test_a_stale_lock_is_taken_over(tmp_path):
    from mltl.running.rundir import RunLock

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import platform

    (tmp_path / ".lock").write_text(f"{platform.node()} {dead.pid}")
    with RunLock(tmp_path):
        assert (tmp_path / ".lock").read_text() == f"{platform.node()} {os.getpid()}"
        with pytest.raises(Exception, match="in use by process"):
            RunLock(tmp_path).__enter__()
    assert not (tmp_path / ".lock").exists()


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_damaged_files_are_repaired_by_resume(config, reference, finished_copy):
    """Each kind of file of a finished run, cut in half (a crash mid-write without atomic writes, a full
    disk, a bad copy): --resume repairs it from what is intact, to the same result, or names it."""
    out = finished_copy
    cut = ["report.md", "environment.json", "state.json", "source/metrics.json", "intermediate/selection.json",
           "intermediate/history.json", "target/splits.csv", "target/history.json", "target/roc.json"]
    for name in cut:
        _truncate(out / name)
    code, _, err = finish(start(config, out, "--resume"))
    assert code == 0, err
    assert outputs(out) == reference
    for name in cut:
        if name.endswith(".json"):
            json.loads((out / name).read_text())  # whole again
    assert (out / "target/splits.csv").read_text().count("\n") == 37  # header + 36 images
    assert "## Stage `target`" in (out / "report.md").read_text()

    # weights, predictions and the records of finished variants: re-finished or retrained, same result
    cut = ["intermediate/model.safetensors", "target/predictions.csv", "target/model.json", "target/metrics.json",
           next(iter(sorted((out / "intermediate" / "variants").glob("*/variant.json")))).relative_to(out)]
    for name in cut:
        _truncate(out / name)
    (out / "intermediate" / "metrics.json").unlink()
    code, _, err = finish(start(config, out, "--resume"))
    assert code == 0, err
    assert outputs(out) == reference


def test_damaged_files_that_cannot_be_repaired_are_named(config, finished_copy):
    out = finished_copy
    (out / "target" / "metrics.json").unlink()
    ckpt = out / "target" / "checkpoint.pt"
    ckpt.write_bytes(b"PK\x03\x04 not a whole checkpoint")
    (out / "target" / "variant.json").unlink()  # the target is unfinished: its checkpoint would be resumed
    code, _, err = finish(start(config, out, "--resume"))
    assert code == 2 and "checkpoint.pt" in err and "delete it" in err and "Traceback" not in err
    _truncate(out / "config.toml")
    code, _, err = finish(start(config, out, "--resume"))
    assert code == 2 and "config.toml" in err and "Traceback" not in err


def test_resume_refuses_a_changed_config(config, finished_copy):
    code, _, err = finish(start(config, finished_copy, "--resume", "--set", "stages.target.train.lr=0.5"))
    assert code == 2 and "config differs" in err and "stages" in err


def test_reuse_copies_the_stages_an_earlier_run_made_from_the_same_settings(config, reference_dir, reference,
                                                                               tmp_path):
    """--reuse: a stage is copied from an earlier run only when it and every stage above it were made from
    the same settings and split; a changed stage and everything below it are trained."""
    out = tmp_path / "changed"
    code, _, err = finish(start(config, out, "--reuse", str(reference_dir),
                                "--set", "stages.intermediate.train.lr=0.003"))
    assert code == 0, err
    assert json.loads((out / "reused.json").read_text()) == {"source": str(reference_dir / "source")}
    assert outputs(out)["source"] == reference["source"]
    hist = json.loads((out / "intermediate" / "history.json").read_text())
    ref_hist = json.loads((reference_dir / "intermediate" / "history.json").read_text())
    assert hist != ref_hist  # trained again, with the new learning rate
    assert not list(out.glob(".*reuse-tmp"))

    same = tmp_path / "same"
    code, _, err = finish(start(config, same, "--reuse", str(out), "--reuse", str(reference_dir)))
    assert code == 0, err
    # the first run that qualifies: `out` for the source only (its intermediate differs), then the reference
    assert json.loads((same / "reused.json").read_text()) == {
        "source": str(out / "source"), "intermediate": str(reference_dir / "intermediate"),
        "target": str(reference_dir / "target")}
    assert outputs(same) == reference

    code, _, err = finish(start(config, tmp_path / "bad", "--reuse", str(tmp_path / "nowhere")))
    assert code == 2 and "--reuse" in err and "nowhere" in err and "Traceback" not in err


def test_reuse_never_copies_a_stage_built_on_other_weights_than_this_runs(config, reference_dir, tmp_path):
    """Same settings are not enough: when an earlier stage is trained here (its saved split no longer
    matches) and the earlier run's copy of it holds other weights, the stages after it are trained too."""
    from mltl.running.rundir import load_weights, save_weights_atomic

    earlier = tmp_path / "earlier"
    shutil.copytree(reference_dir, earlier)
    splits = earlier / "source" / "splits.csv"
    splits.write_text(splits.read_text().replace(",train\n", ",val\n", 1))  # as if made from other data
    state, meta = load_weights(earlier / "source" / "model.safetensors")
    name = next(iter(state))
    state[name] = state[name] + 0.5  # and the model its later stages were built on is not this run's
    save_weights_atomic(earlier / "source" / "model.safetensors", state, meta)
    out = tmp_path / "run"
    code, _, err = finish(start(config, out, "--reuse", str(earlier)))
    assert code == 0, err
    assert not (out / "reused.json").exists()  # source retrained, so neither intermediate nor target copied
