"""The `mltl` command as a user runs it: exit codes and one-line messages, no tracebacks."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GOOD = """
[run]
name = "cli"

[input]
size = 56

[[stages]]
name = "source"
domain = { plugin = "fractal", classes = 3, images_per_class = 10, channels = 1 }
backbone = "gfe-1"
train = { epochs = 1, batch_size = 16 }

[[stages]]
name = "target"
init = "source"
domain = { plugin = "ct-phantom", classes = ["normal", "cyst", "calculi"], images_per_class = 10, seed = 5 }
train = { epochs = 1, batch_size = 16 }
"""


def mltl(*args, cwd=None, env=None):
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "mltl", *args], capture_output=True, text=True, cwd=cwd,
                          env=full_env, timeout=300)


def user_error(proc):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.mark.parametrize("edit, expected", [
    (('train = { epochs = 1, batch_size = 16 }\n\n[[stages]]', 'freze = "C1"\ntrain = { epochs = 1, batch_size = 16 }\n\n[[stages]]'),
     'stages[0].freze: unknown key, did you mean "freeze"?'),
    (('plugin = "ct-phantom"', 'plugin = "ct-phantom2"'), 'stages[1].domain.plugin: unknown domain "ct-phantom2", did you mean "ct-phantom"?'),
    pytest.param(('init = "source"', 'init = "srouce"'), 'stages[1].init: "srouce" names no earlier stage; earlier stages: source', marks=pytest.mark.slow),
    pytest.param(('backbone = "gfe-1"', 'backbone = "gfe-3"'), 'unknown backbone "gfe-3"', marks=pytest.mark.slow),
    pytest.param(('domain = { plugin = "ct-phantom", classes = ["normal", "cyst", "calculi"], images_per_class = 10, seed = 5 }',
                  'domain = { plugin = "image-folder", root = "no/such/folder" }'),
                 'stages[1].domain: image-folder: root "no/such/folder" is not a folder', marks=pytest.mark.slow),
    pytest.param(('images_per_class = 10, seed = 5', 'images_per_clas = 10, seed = 5'),
                 'stages[1].domain.images_per_clas: unknown option, did you mean "images_per_class"?', marks=pytest.mark.slow),
])
def test_user_mistakes_exit_2_with_one_line(tmp_path, edit, expected):
    cfg = tmp_path / "bad.toml"
    assert edit[0] in GOOD
    cfg.write_text(GOOD.replace(edit[0], edit[1]))
    for command in ("validate", "run"):
        line = user_error(mltl(command, str(cfg), cwd=tmp_path))
        assert expected in line and str(cfg) in line
    assert not (tmp_path / "runs").exists()  # nothing written for a config that cannot run


def test_bad_override_and_missing_file(tmp_path):
    assert "no such" not in user_error(mltl("run", str(tmp_path / "none.toml")))
    cfg = tmp_path / "c.toml"
    cfg.write_text(GOOD)
    line = user_error(mltl("validate", str(cfg), "--set", "stages.target.train.epochs=-3"))
    assert "stages[1].train.epochs: -3 must be greater than 0" in line


@pytest.mark.slow
def test_run_writes_a_run_directory(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(GOOD)
    proc = mltl("run", str(cfg), "--set", "stages.target.train.epochs=2", "--device", "cpu", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    run_dir = tmp_path / "runs" / "cli"
    assert proc.stdout.strip() == str(Path("runs") / "cli")
    assert (run_dir / "target" / "metrics.json").is_file()
    assert 'epochs = 2' in (run_dir / "config.toml").read_text()
    again = mltl("run", str(cfg), "--device", "cpu", cwd=tmp_path)  # a second run never reuses the directory
    assert again.returncode == 0 and again.stdout.strip() == str(Path("runs") / "cli-2")


def test_plugins_lists_each_from_its_distribution():
    proc = mltl("plugins")
    assert proc.returncode == 0, proc.stderr
    for plugin, dist in (("gfe", "mltl-gfe"), ("ct", "mltl-ct"), ("samala", "mltl-samala"), ("roc", "mltl-roc")):
        line = next(l for l in proc.stdout.splitlines() if f" {plugin} " in l)
        assert dist in line


def test_load_plugins_env_restricts_distributions():
    proc = mltl("plugins", env={"MLTL_LOAD_PLUGINS": "mltl-gfe"})
    assert "mltl-gfe" in proc.stdout and "mltl-ct" not in proc.stdout and "mltl.builtins" in proc.stdout


@pytest.mark.slow  # four CLI start-ups; the quick phase starts the CLI in the tests above
def test_version_and_help():
    assert mltl("--version").stdout.startswith("mltl 0.1.0")
    for cmd in ("run", "validate", "plugins"):
        proc = mltl(cmd, "--help")
        assert proc.returncode == 0 and "example" in proc.stdout
