"""The example third-party plugin (examples/plugins/mltl-dermoscopy), installed as a user installs it.

A copy of it is pip-installed (not editable, no build isolation: offline) into this interpreter's
environment, used through `mltl plugins` and `mltl run`, its own tests are run, and it is uninstalled
again whatever happens. The editable installs of mltl and its plugins must survive both steps.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = ROOT / "examples" / "plugins" / "mltl-dermoscopy"


def _pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", *args],
                          capture_output=True, text=True, timeout=300)


def _mltl(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mltl", *args], capture_output=True, text=True, timeout=600,
                          cwd=cwd)


def _core_location() -> str:
    return subprocess.run([sys.executable, "-c", "import mltl, mltl_ct; print(mltl.__file__, mltl_ct.__file__)"],
                          capture_output=True, text=True, check=True).stdout


@pytest.mark.slow
def test_example_plugin_installs_runs_and_uninstalls(tmp_path):
    before = _core_location()
    if _pip("show", "mltl-dermoscopy").returncode == 0:
        pytest.skip("mltl-dermoscopy is already installed in this environment; uninstall it to run this test")
    src = tmp_path / "mltl-dermoscopy"
    shutil.copytree(PLUGIN, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", "runs"))
    installed = _pip("install", "--no-deps", "--no-build-isolation", str(src))
    try:
        assert installed.returncode == 0, installed.stdout + installed.stderr
        listing = _mltl("plugins", cwd=tmp_path)
        assert listing.returncode == 0, listing.stderr
        line = next(ln for ln in listing.stdout.splitlines() if "mltl-dermoscopy" in ln)
        assert "dermoscopy" in line and "0.1.0" in line and "domain skin-lesions" in line

        gen = subprocess.run([sys.executable, "-m", "mltl_dermoscopy.synthetic", "dermoscopy-data",
                              "--lesions-per-class", "5"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert gen.returncode == 0, gen.stderr
        # the plugin's own config, with its relative data path, shortened
        run = _mltl("-q", "run", str(src / "dermoscopy.toml"), "--out", "run", "--device", "cpu",
                    "--set", "stages.source.backbone=gfe-1", "--set", "stages.source.train.epochs=1",
                    "--set", "stages.source.domain.images_per_class=10", "--set", "stages.target.freeze=C1",
                    "--set", "stages.target.train.epochs=2", cwd=tmp_path)
        assert run.returncode == 0, run.stderr
        lesions = json.loads((tmp_path / "run" / "target" / "lesion_metrics.json").read_text())
        metrics = json.loads((tmp_path / "run" / "target" / "metrics.json").read_text())
        assert metrics["domain"] == "skin-lesions" and lesions["n_images"] == metrics["n_test"]

        # its own tests, against the installed copy (the chain test is the run above)
        own = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k",
                              "not example_config", str(src / "tests")],
                             cwd=src, capture_output=True, text=True, timeout=600)
        assert own.returncode == 0, own.stdout[-3000:] + own.stderr[-2000:]
        assert " passed" in own.stdout and "failed" not in own.stdout
    finally:
        removed = _pip("uninstall", "-y", "mltl-dermoscopy")
    assert removed.returncode == 0, removed.stderr
    assert _pip("show", "mltl-dermoscopy").returncode != 0
    assert _core_location() == before  # the editable installs of mltl and mltl-ct are untouched
    assert "mltl-dermoscopy" not in _mltl("plugins", cwd=tmp_path).stdout
