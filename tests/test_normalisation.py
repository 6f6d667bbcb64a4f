"""The chain's input normalisation: one value or one per channel, the backbone's own unless the config says
otherwise (mltl.running.preflight.resolve_input), and the same numbers in training, prediction and export."""

import numpy as np
import pytest
import torch
from torch import nn

import mltl
from mltl import hookimpl
from mltl.config import InputConfig, load_config
from mltl.running.preflight import prepare
from mltl.training.train import normalisation, normalise

IMAGENET = mltl.Preprocessing(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), input_size=224,
                              source="test ImageNet backbone")


def _tiny_trunk(in_chans: int, image_size: int, preprocessing=None) -> mltl.Trunk:
    module = nn.Sequential()
    module.add_module("conv", nn.Conv2d(in_chans, 4, 3, padding=1))
    module.add_module("pool", nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()))
    return mltl.Trunk(module=module, feature_dim=4, groups={"C1": ("conv",)}, preprocessing=preprocessing)


class _Backbones:
    @hookimpl
    def register_backbones(self, register):
        register("imagenet-like", lambda *, in_chans, image_size: _tiny_trunk(in_chans, image_size, IMAGENET))
        register("other-pretrained", lambda *, in_chans, image_size: _tiny_trunk(
            in_chans, image_size, mltl.Preprocessing(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), source="other")))
        register("scratch-like", lambda *, in_chans, image_size: _tiny_trunk(in_chans, image_size))

    @hookimpl
    def register_domains(self, register):
        def colours(n: int = 12) -> mltl.Domain:
            rng = np.random.default_rng(0)
            images = rng.integers(0, 256, (2 * n, 3, 8, 8), dtype=np.uint8)
            return mltl.Domain(classes=("a", "b"), images=images, labels=[0] * n + [1] * n,
                               ids=[f"i{i}" for i in range(2 * n)])

        register("colours", colours)


@pytest.fixture
def backbones(fresh_plugins):
    mltl.register_plugin(_Backbones(), name="test-backbones")
    yield fresh_plugins.get_registry()


def _config(tmp_path, backbone: str, extra_input: str = "", channels: int = 3, second: str | None = None):
    stages = f"""
[[stages]]
name = "target"
domain = {{ plugin = "colours" }}
backbone = {{ name = "{backbone}" }}
split = {{ protocol = "holdout", val = 0.25, test = 0.25 }}
train = {{ epochs = 1, batch_size = 4 }}
"""
    if second:
        stages = stages.replace('name = "target"', 'name = "first"') + f"""
[[stages]]
name = "target"
domain = {{ plugin = "colours" }}
backbone = {{ name = "{second}" }}
split = {{ protocol = "holdout", val = 0.25, test = 0.25, allow_leakage = true }}  # the same images again
train = {{ epochs = 1, batch_size = 4 }}
"""
    path = tmp_path / "c.toml"
    path.write_text(f'[run]\nname = "n"\n\n[input]\nsize = 8\nchannels = {channels}\n{extra_input}\n{stages}')
    return load_config(path)


def test_per_channel_normalise_matches_the_formula():
    x = torch.randint(0, 256, (2, 3, 5, 5), dtype=torch.uint8)
    inp = InputConfig(size=5, channels=3, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    expected = (x.float() / 255 - torch.tensor(inp.mean).view(1, 3, 1, 1)) / torch.tensor(inp.std).view(1, 3, 1, 1)
    torch.testing.assert_close(normalise(x, inp), expected, rtol=1e-5, atol=1e-5)


def test_one_value_stays_the_old_scalar_default():
    x = torch.randint(0, 256, (2, 1, 5, 5), dtype=torch.uint8)
    torch.testing.assert_close(normalise(x, InputConfig(size=5)), (x.float() / 255 - 0.5) / 0.25)
    assert normalisation(InputConfig(size=5)) == ((0.5,), (0.25,))
    assert InputConfig(size=5, mean=0.4).mean == (0.4,)


def test_grey_input_averages_per_channel_values():
    mean, std = normalisation(InputConfig(size=5, channels=1, mean=[0.2, 0.4, 0.6], std=[0.1, 0.2, 0.3]))
    assert mean == pytest.approx((0.4,)) and std == pytest.approx((0.2,))


def test_the_backbones_own_normalisation_is_used_and_recorded(tmp_path, backbones):
    chain = prepare(_config(tmp_path, "imagenet-like"), backbones)
    assert chain.config.input.mean == IMAGENET.mean and chain.config.input.std == IMAGENET.std
    assert "test ImageNet backbone" in chain.input_note and "224 px" in chain.input_note


def test_the_config_overrides_the_backbone(tmp_path, backbones):
    chain = prepare(_config(tmp_path, "imagenet-like", "mean = 0.5\nstd = [0.2, 0.3, 0.4]"), backbones)
    assert chain.config.input.mean == (0.5,) and chain.config.input.std == (0.2, 0.3, 0.4)
    assert "[input] mean and std of the config" in chain.input_note


def test_a_backbone_without_preprocessing_keeps_the_default(tmp_path, backbones):
    chain = prepare(_config(tmp_path, "scratch-like"), backbones)
    assert normalisation(chain.config.input) == ((0.5,), (0.25,))


def test_grey_chain_on_an_rgb_pretrained_backbone_says_so(tmp_path, backbones):
    chain = prepare(_config(tmp_path, "imagenet-like", channels=1), backbones)
    assert "averaged" in chain.input_note and "summed" in chain.input_note


def test_backbones_that_disagree_must_be_settled_by_the_config(tmp_path, backbones):
    with pytest.raises(mltl.ConfigError, match=r"set \[input\] mean and std"):
        prepare(_config(tmp_path, "imagenet-like", second="other-pretrained"), backbones)
    settled = prepare(_config(tmp_path, "imagenet-like", "mean = 0.5\nstd = 0.5", second="other-pretrained"),
                      backbones)
    assert settled.config.input.mean == (0.5,)


@pytest.mark.parametrize("bad, message", [("mean = [0.1, 0.2]", "one per channel"),
                                          ('mean = "imagenet"', "expected"),
                                          ("std = [0.2, 0.0, 0.2]", "greater than 0")])
def test_bad_normalisation_values_are_config_errors(tmp_path, bad, message):
    path = tmp_path / "bad.toml"
    path.write_text(f'[run]\nname = "n"\n[input]\n{bad}\n[[stages]]\nname = "t"\ndomain = {{ plugin = "fractal" }}\n'
                    f'backbone = {{ name = "gfe-1" }}\n')
    with pytest.raises(mltl.ConfigError, match=message):
        load_config(path)


@pytest.mark.slow
def test_a_trained_stage_predicts_and_exports_with_its_normalisation(tmp_path, backbones):
    result = mltl.run(_config(tmp_path, "imagenet-like"), out=tmp_path / "run")
    stage = mltl.load_stage(result.run_dir / "target")
    assert stage.input.mean == IMAGENET.mean
    exported = mltl.export(result.run_dir / "target", "torchscript", out=tmp_path / "m.pt")
    assert exported.metadata["input"]["mean"] == list(IMAGENET.mean)
    model = torch.jit.load(str(exported.path))
    x = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    with torch.no_grad():
        expected = torch.softmax(stage.network.eval()(normalise(x, stage.input)), dim=1)
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
