"""The plugin manager: built-ins through the same hooks, entry points, in-process plugins, typos in hooks."""

import numpy as np
import pluggy
import pytest

import mltl
from mltl import Domain, hookimpl


def test_builtins_and_installed_plugins_register(fresh_plugins):
    reg = fresh_plugins.get_registry()
    assert {"fractal", "image-folder", "ct-phantom"} <= set(reg.names("domain"))
    assert {"gfe-1", "gfe-2", "alexnet"} <= set(reg.names("backbone"))
    assert reg.get("domain", "fractal").plugin == "mltl.builtins"
    assert reg.get("backbone", "gfe-2").plugin == "gfe"


def test_misspelled_hook_fails_at_once(fresh_plugins):
    class Typo:
        @hookimpl
        def register_domain(self, register):  # missing "s"
            pass

    with pytest.raises(pluggy.PluginValidationError, match="register_domain"):
        mltl.register_plugin(Typo(), name="typo")


def test_in_process_plugin_domain_is_used_by_name(fresh_plugins):
    def stripes(n: int = 6) -> Domain:
        images = np.zeros((2 * n, 8, 8), np.uint8)
        images[n:, ::2] = 255
        return Domain(classes=("flat", "striped"), images=images, labels=[0] * n + [1] * n,
                      ids=[f"s{i}" for i in range(2 * n)])

    class Plugin:
        @hookimpl
        def register_domains(self, register):
            register("stripes", stripes)

    mltl.register_plugin(Plugin(), name="stripes-plugin")
    reg = fresh_plugins.get_registry()
    dom = reg.create("domain", "stripes", {"n": 4})
    assert len(dom) == 8 and dom.class_counts() == {"flat": 4, "striped": 4}
    with pytest.raises(mltl.ConfigError, match=r'x\.m: unknown option; valid: "n"'):
        reg.create("domain", "stripes", {"m": 4}, key="x")
    with pytest.raises(mltl.ConfigError, match=r"x\.n: expected int, got str"):
        reg.create("domain", "stripes", {"n": "4"}, key="x")


def test_duplicate_names_are_refused(fresh_plugins):
    class Dup:
        @hookimpl
        def register_backbones(self, register):
            register("gfe-1", lambda *, in_chans, image_size: None)

    mltl.register_plugin(Dup(), name="dup")
    with pytest.raises(mltl.UserError, match='backbone "gfe-1" is registered twice, by plugins'):
        fresh_plugins.get_registry()


def test_events_reach_plugins(fresh_plugins, tmp_path, tiny_config):
    seen = []

    class Logger:
        @hookimpl
        def mltl_stage_finished(self, result):
            seen.append(result.name)

        @hookimpl
        def mltl_run_finished(self, results, run_dir):
            seen.append(("done", len(results)))

    mltl.register_plugin(Logger(), name="logger")
    cfg = mltl.load_config(tiny_config(), ["stages.source.backbone=gfe-1", "stages.intermediate.freeze=C1",
                                           "stages.source.train.epochs=1", "stages.intermediate.train.epochs=1",
                                           "stages.target.train.epochs=1", 'run.reporters=[]'])
    mltl.run(cfg, out=tmp_path / "r", device="cpu")
    assert seen == ["source", "intermediate", "target", ("done", 3)]
    assert not (tmp_path / "r" / "target" / "roc.png").exists()  # reporters = [] turned the ROC reporter off
