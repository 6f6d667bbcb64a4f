"""`mltl config show CONFIG [--set ...]`: the resolved configuration as TOML (issue 17)."""

import subprocess
import sys
import tomllib
from pathlib import Path

from mltl.cli import commands as cli
from mltl.config import dump_toml, load_config

ROOT = Path(__file__).resolve().parents[1]
LIVER = ROOT / "examples" / "rare_liver.toml"
OVERRIDE = "stages.target.train.epochs=3"


def _stage(doc, name):
    return next(s for s in doc["stages"] if s["name"] == name)


def test_config_show_prints_the_resolved_toml_as_a_user_runs_it():
    proc = subprocess.run([sys.executable, "-m", "mltl", "config", "show", "examples/rare_liver.toml",
                           "--set", OVERRIDE], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    doc = tomllib.loads(proc.stdout)
    target = _stage(doc, "target")
    assert target["train"]["epochs"] == 3
    assert "epochs = 3" in proc.stdout.split('name = "target"')[1]
    # defaults are filled in: keys the file leaves out, at every level
    assert doc["run"]["device"] == "auto" and doc["run"]["keep"] == "selected"
    assert "mean" not in doc["input"]  # unset: the backbone's own (a pretrained one's), else 0.5; no TOML null
    assert target["freeze"] == "none" and target["train"]["momentum"] == 0.9
    assert target["split"]["protocol"] == "auto" and target["split"]["val"] == 0.25  # the file's value wins
    # sweeps are kept as written
    assert _stage(doc, "source")["backbone"] == {"sweep": ["gfe-1", "gfe-2"]}


def test_config_show_output_is_the_same_config(tmp_path, capsys):
    assert cli.main(["config", "show", str(LIVER), "--set", OVERRIDE]) == 0
    resolved = tmp_path / "resolved.toml"
    resolved.write_text(capsys.readouterr().out)
    again, original = load_config(resolved), load_config(LIVER, [OVERRIDE])
    assert (again.run, again.input, again.stages) == (original.run, original.input, original.stages)


def test_config_show_without_defaults_is_the_file_and_its_overrides(capsys):
    assert cli.main(["config", "show", str(LIVER), "--set", OVERRIDE, "--no-defaults"]) == 0
    out = capsys.readouterr().out
    assert out == dump_toml(load_config(LIVER, [OVERRIDE]).raw)
    assert "momentum" not in out and _stage(tomllib.loads(out), "target")["train"]["epochs"] == 3


def test_config_show_user_errors_are_one_line(tmp_path, capsys):
    assert cli.main(["config", "show", str(LIVER), "--set", "stages.taget.train.epochs=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and 'no stage "taget"' in err
    assert cli.main(["config", "show", str(tmp_path / "none.toml")]) == 2
    assert "config file not found" in capsys.readouterr().err
