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


def _stripes(n: int = 4) -> Domain:
    return Domain(classes=("a", "b"), images=np.zeros((2 * n, 8, 8), np.uint8), labels=[0] * n + [1] * n,
                  ids=[f"s{i}" for i in range(2 * n)])


def _read_stripes(path, *, n: int = 4):
    return np.zeros((8, 8), np.uint8)


class _Reporter:
    pass


def test_registration_arguments_are_kept_on_the_item(fresh_plugins):
    class Plugin:
        @hookimpl
        def register_domains(self, register):
            register("stripes", _stripes, read_file=_read_stripes, suffixes=[".NPY", ""])
            register("plain", _stripes)

        @hookimpl
        def register_reporters(self, register):
            register("quiet", _Reporter, "on request only", opt_in=True)
            register("loud", _Reporter)

    mltl.register_plugin(Plugin(), name="args")
    reg = fresh_plugins.get_registry()
    stripes, plain = reg.get("domain", "stripes"), reg.get("domain", "plain")
    assert stripes.read_file is _read_stripes and stripes.suffixes == frozenset({".npy", ""})
    assert plain.read_file is None and plain.suffixes is None
    assert reg.get("reporter", "quiet").opt_in and not reg.get("reporter", "loud").opt_in
    assert reg.get("reporter", "quiet").description == "on request only"


@pytest.mark.parametrize(("kind_hook", "kwargs", "message"), [
    ("register_backbones", {"opt_in": True}, "opt_in is for reporters only"),
    ("register_reporters", {"read_file": _read_stripes}, "read_file and suffixes are for domains only"),
    ("register_domains", {"suffixes": (".npy",)}, "pass read_file too"),
    ("register_domains", {"read_file": _read_stripes, "suffixes": ".npy"}, "collection of file endings"),
    ("register_domains", {"read_file": "read.py"}, "read_file must be callable"),
])
def test_misused_registration_arguments_name_the_plugin(fresh_plugins, kind_hook, kwargs, message):
    def hook(register):
        register("x", _stripes, **kwargs)

    plugin = type("Plugin", (), {kind_hook: staticmethod(hookimpl(hook))})
    mltl.register_plugin(plugin, name="misused")
    with pytest.raises(TypeError, match=rf"plugin 'misused', \w+ 'x': .*{message}"):
        fresh_plugins.get_registry()


def test_function_attributes_still_work_with_a_deprecation_warning(fresh_plugins):
    def old_domain(n: int = 4) -> Domain:
        return _stripes(n)

    def old_reader(path, *, n: int = 4):
        return np.zeros((8, 8), np.uint8)

    class OldReporter:
        opt_in = True

    old_reader.suffixes = {".NPY"}
    old_domain.read_file = old_reader

    class Plugin:
        @hookimpl
        def register_domains(self, register):
            register("old", old_domain)

        @hookimpl
        def register_reporters(self, register):
            register("old-reporter", OldReporter)

    mltl.register_plugin(Plugin(), name="old-style")
    with pytest.warns(DeprecationWarning) as caught:
        reg = fresh_plugins.get_registry()
    messages = [str(w.message) for w in caught]
    assert any("plugin 'old-style', domain 'old': the 'read_file' attribute is deprecated" in m for m in messages)
    assert any("'suffixes' attribute" in m and "suffixes=(...)" in m for m in messages)
    assert any("reporter 'old-reporter': the 'opt_in' attribute" in m for m in messages)
    assert all(w.filename == __file__ for w in caught if "old-style" in str(w.message))  # points at register()
    item = reg.get("domain", "old")
    assert item.read_file is old_reader and item.suffixes == frozenset({".npy"})
    assert reg.get("reporter", "old-reporter").opt_in


def test_first_party_plugins_use_registration_arguments(fresh_plugins, recwarn):
    fresh_plugins.get_registry()
    assert not [w for w in recwarn if issubclass(w.category, DeprecationWarning) and "attribute" in str(w.message)]
