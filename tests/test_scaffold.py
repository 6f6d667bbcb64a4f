"""`mltl new-plugin`: names are checked; the package it writes installs with pip and its own test passes."""

import subprocess
import sys

import pytest

import mltl
from mltl.cli.scaffold import check_name, scaffold


@pytest.mark.parametrize("name, message", [
    ("Hospital", "not a valid plugin name"),
    ("my_xray", "not a valid plugin name"),
    ("2d-xray", "not a valid plugin name"),
    ("x--ray", "not a valid plugin name"),
    ("mltl-xray", 'without the "mltl-" prefix'),
    ("a" * 41, "keep it to 40"),
])
def test_bad_names_are_refused_with_the_rule(name, message):
    with pytest.raises(mltl.UserError, match=message):
        check_name(name)


def test_taken_names_and_existing_folders_are_refused(tmp_path):
    with pytest.raises(mltl.UserError, match='"ct-phantom" is already registered by plugin "ct"'):
        scaffold("ct-phantom", tmp_path)
    with pytest.raises(mltl.UserError, match='"mltl-gfe" is already installed'):
        scaffold("gfe", tmp_path)
    (tmp_path / "mltl-clinic-a").mkdir()
    with pytest.raises(mltl.UserError, match="already exists"):
        scaffold("clinic-a", tmp_path)
    proc = subprocess.run([sys.executable, "-m", "mltl", "new-plugin", "Bad_Name", "--dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "not a valid plugin name" in proc.stderr


@pytest.mark.slow
def test_scaffolded_plugin_installs_and_its_test_passes(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mltl", "new-plugin", "clinic-xray", "--dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    root = tmp_path / "mltl-clinic-xray"
    assert {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} == {
        "pyproject.toml", "README.md", "mltl_clinic_xray/__init__.py", "tests/test_plugin.py"}
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    if subprocess.run(pip + ["show", "mltl-clinic-xray"], capture_output=True).returncode == 0:
        pytest.skip("mltl-clinic-xray is already installed here")
    installed = subprocess.run(pip + ["install", "--no-deps", "--no-build-isolation", str(root)],
                               capture_output=True, text=True, timeout=300)
    try:
        assert installed.returncode == 0, installed.stdout + installed.stderr
        tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(root / "tests")],
                               cwd=root, capture_output=True, text=True, timeout=600)
        assert tests.returncode == 0, tests.stdout[-3000:] + tests.stderr[-2000:]
        assert "5 passed" in tests.stdout
    finally:
        removed = subprocess.run(pip + ["uninstall", "-y", "mltl-clinic-xray"], capture_output=True, text=True)
    assert removed.returncode == 0, removed.stderr


def test_scaffolded_module_registers_its_reader(tmp_path, fresh_plugins, recwarn):
    """The generated hooks, registered in this process: `mltl predict` gets the plugin's reader."""
    import importlib.util

    root = scaffold("clinic-scan", tmp_path)
    spec = importlib.util.spec_from_file_location("mltl_clinic_scan", root / "mltl_clinic_scan" / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    mltl.register_plugin(module, name="clinic_scan")
    item = fresh_plugins.get_registry().get("domain", "clinic-scan")
    assert item.read_file is module.read_file and item.suffixes == {s.lower() for s in module.SUFFIXES}
    assert not [w for w in recwarn if "clinic_scan" in str(w.message)]  # no deprecated attributes
