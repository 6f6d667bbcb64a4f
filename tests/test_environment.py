"""environment.json names every installed mltl plugin and the libraries a result depends on, with versions."""

from importlib import metadata

import torch

from mltl.running.rundir import environment


def _fake_distribution(site, name: str, version: str, entry_points: str | None) -> None:
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    if entry_points is not None:
        (info / "entry_points.txt").write_text(entry_points)


def test_first_party_plugins_and_libraries_appear_with_their_versions():
    env = environment(torch.device("cpu"), seed=7)
    packages = env["packages"]
    for dist in ("mltl", "mltl-gfe", "mltl-roc", "torch", "numpy", "scikit-learn", "pluggy"):
        assert packages[dist] == metadata.version(dist), dist
    for dist in ("mltl-gfe", "mltl-roc", "mltl-ct", "mltl-samala"):  # the first-party plugins installed here
        assert env["plugins"][dist] == metadata.version(dist)
    assert "mltl" not in env["plugins"]  # the core registers its built-ins itself
    for optional in ("timm", "scipy", "pydicom", "nibabel", "safetensors", "Pillow"):
        try:
            assert packages[optional] == metadata.version(optional)
        except metadata.PackageNotFoundError:
            assert optional not in packages
    # the keys and layout kept from before
    assert {"time_utc", "command", "python", "platform", "machine", "cpu_count", "torch_threads", "device",
            "seed", "packages"} <= set(env)
    assert env["seed"] == 7 and env["device"] == "cpu"


def test_a_third_party_plugin_appears_and_a_distribution_without_the_entry_point_does_not(tmp_path, monkeypatch):
    site = tmp_path / "site"
    _fake_distribution(site, "mltl-hospital-archive", "2.3.4", "[mltl]\narchive = mltl_hospital_archive\n")
    _fake_distribution(site, "unrelated-tool", "9.9.9", "[console_scripts]\ntool = unrelated_tool:main\n")
    _fake_distribution(site, "mltl-lookalike", "1.0.0", None)  # named like a plugin, no entry point
    monkeypatch.syspath_prepend(str(site))

    env = environment(torch.device("cpu"), seed=0)

    assert env["packages"]["mltl-hospital-archive"] == "2.3.4"
    assert env["plugins"]["mltl-hospital-archive"] == "2.3.4"
    for name in ("unrelated-tool", "mltl-lookalike"):
        assert name not in env["packages"] and name not in env["plugins"]
