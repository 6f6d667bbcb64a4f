"""The library API: a tiny chain with an in-process domain plugin, using only names under `mltl.`."""

import inspect

import numpy as np
from PIL import Image

import mltl


def test_public_names_have_docstrings_and_type_hints():
    for name in ("load_config", "run", "compare", "validate", "predict", "load_stage", "export", "register_plugin"):
        fn = getattr(mltl, name)
        assert callable(fn) and inspect.getdoc(fn), name
        assert inspect.signature(fn).return_annotation is not inspect.Signature.empty, name
    for name in ("Domain", "Trunk", "Network", "FreezePolicy", "Stage", "StageResult", "RunResult", "Predictions"):
        assert inspect.isclass(getattr(mltl, name)) and getattr(mltl, name).__doc__, name
    assert set(mltl.__all__) <= set(dir(mltl))


def test_a_chain_with_an_in_process_plugin_through_the_library(fresh_plugins, tmp_path):
    rng = np.random.default_rng(1)

    def blobs(n: int = 12, *, image_size: int = 64) -> mltl.Domain:
        """Dark or bright discs on noise."""
        yy, xx = np.mgrid[:image_size, :image_size]
        disc = (yy - image_size / 2) ** 2 + (xx - image_size / 2) ** 2 < (image_size / 4) ** 2
        images = rng.normal(100, 20, (2 * n, image_size, image_size))
        images[:n][:, disc] -= 60
        images[n:][:, disc] += 60
        return mltl.Domain(classes=("dark", "bright"), images=np.clip(images, 0, 255).astype(np.uint8),
                           labels=[0] * n + [1] * n, ids=[f"blob{i}" for i in range(2 * n)])

    class Blobs:
        @mltl.hookimpl
        def register_domains(self, register):
            register("blobs", blobs)

    mltl.register_plugin(Blobs(), name="blobs-plugin")
    try:
        config_path = tmp_path / "chain.toml"
        config_path.write_text("""
[run]
name = "api"
reporters = []
[input]
size = 32
[[stages]]
name = "first"
domain = { plugin = "blobs", n = 10 }
backbone = "gfe-1"
train = { epochs = 2, batch_size = 8 }
[[stages]]
name = "second"
init = "first"
domain = { plugin = "blobs", n = 8 }
freeze = "C1"
train = { epochs = 1, batch_size = 8 }
""")
        config = mltl.load_config(config_path, ["stages.first.train.epochs=1"])
        assert isinstance(config, mltl.Config) and [s.name for s in config.stages] == ["first", "second"]
        mltl.validate(config)
        result = mltl.run(config, out=tmp_path / "run", device="cpu")
        assert isinstance(result, mltl.RunResult)
        second = result.stage("second")
        assert isinstance(second, mltl.StageResult) and isinstance(second.test, mltl.Predictions)
        assert second.metrics["frozen"] == ["C1"] and 0 <= second.metrics["auc_macro"] <= 1
        np.testing.assert_allclose(second.test.probs.sum(axis=1), 1, atol=1e-6)

        # predictions for new files, through the same API
        for i in range(3):
            Image.fromarray(blobs(1, image_size=32).images[1]).save(tmp_path / f"new{i}.png")
        stage = mltl.load_stage(result.run_dir)  # the run's last stage
        assert isinstance(stage, mltl.TrainedStage) and stage.classes == ("dark", "bright")
        rows = list(mltl.predict(stage, [tmp_path / f"new{i}.png" for i in range(3)]))
        assert len(rows) == 3 and all(p.shape == (2,) and abs(p.sum() - 1) < 1e-6 for _, p in rows)
        exported = mltl.export(stage, "torchscript", tmp_path / "m.pt")
        assert isinstance(exported, mltl.ExportResult) and exported.metadata["classes"] == ["dark", "bright"]
    finally:
        mltl.unregister_plugin("blobs-plugin")
    assert "blobs" not in mltl.get_registry().names("domain")
