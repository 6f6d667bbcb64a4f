"""Pretrained timm models as users expect them (issue 14), without a network: ``pretrained = true`` reads the
Hugging Face cache (a test-made one here, in timm's hub layout, with made-up weights), ``hf-hub:ORG/NAME`` and
local-folder model names work, offline without the file is a one-line error naming the cache folder, ViTs get
their tokens into freeze group C1, and a chain normalises its input with the model's own mean and std."""

import json

import numpy as np
import pytest
import torch

import mltl
from mltl import ConfigError, get_registry, hookimpl
from mltl.networks.network import HeadSpec, build_network, make_spec

timm = pytest.importorskip("timm")
safetensors_torch = pytest.importorskip("safetensors.torch")

COMMIT = "0123456789abcdef0123456789abcdef01234567"
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def build(options, in_chans=3, size=32):
    return build_network(make_spec("timm", options, in_chans, size, HeadSpec(), ("a", "b")), get_registry())


def made_up_weights(arch: str, **kwargs) -> dict[str, torch.Tensor]:
    """A fresh model's state dict with a recognisable first tensor (a ramp no initialiser draws)."""
    torch.manual_seed(7)
    state = {k: v.clone().contiguous() for k, v in timm.create_model(arch, **kwargs).state_dict().items()}
    first = next(k for k, v in state.items() if v.is_floating_point() and v.ndim == 4)
    state[first] = torch.linspace(-1, 1, state[first].numel()).reshape(state[first].shape)
    return state


def hub_repo(cache, repo_id: str, state: dict, config: dict | None = None):
    """``repo_id`` in the Hugging Face cache layout: snapshots/<commit>/{config.json, model.safetensors}, refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    safetensors_torch.save_file(state, str(snapshot / "model.safetensors"))
    if config is not None:
        (snapshot / "config.json").write_text(json.dumps(config))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache and no network: HF_HUB_OFFLINE=1."""
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("MLTL_OFFLINE", raising=False)
    return cache


def config_json(arch: str, mean, std, size=224):
    return {"architecture": arch, "num_classes": 1000, "num_features": 512,
            "pretrained_cfg": {"tag": "test", "custom_load": False, "input_size": [3, size, size],
                               "fixed_input_size": False, "interpolation": "bicubic", "crop_pct": 0.9,
                               "mean": list(mean), "std": list(std), "num_classes": 1000,
                               "first_conv": "conv1", "classifier": "fc"}}


def test_pretrained_true_loads_the_cached_weights_and_their_preprocessing(hf_cache):
    state = made_up_weights("resnet18")
    hub_repo(hf_cache, "timm/resnet18.a1_in1k", state, config_json("resnet18", *IMAGENET))
    net = build({"model": "resnet18", "pretrained": True})
    assert torch.equal(net.trunk.conv1.weight, state["conv1.weight"])
    assert torch.equal(net.trunk.layer4[1].bn2.running_var, state["layer4.1.bn2.running_var"])
    pre = net.preprocessing
    cfg = timm.models.get_pretrained_cfg("resnet18")  # the model's own pretrained_cfg: resnet18.a1_in1k
    assert (pre.mean, pre.std, pre.input_size, pre.interpolation) == (cfg.mean, cfg.std, 224, cfg.interpolation)
    assert pre.source == "timm pretrained_cfg of resnet18.a1_in1k"
    grey = build({"model": "resnet18", "pretrained": True}, in_chans=1)
    assert torch.allclose(grey.trunk.conv1.weight, state["conv1.weight"].sum(1, keepdim=True))
    assert build({"model": "resnet18"}).preprocessing is None  # from scratch: no preprocessing
    assert not torch.equal(build({"model": "resnet18"}).trunk.conv1.weight, state["conv1.weight"])


@pytest.mark.parametrize("env", ["HF_HUB_OFFLINE", "MLTL_OFFLINE", "allow_download"])
def test_offline_without_the_file_is_one_line_naming_the_cache_folder(hf_cache, monkeypatch, env):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    options = {"model": "resnet18", "pretrained": True}
    if env == "allow_download":
        options["allow_download"] = False
    else:
        monkeypatch.setenv(env, "1")
    with pytest.raises(ConfigError) as err:
        build(options)
    message = str(err.value)
    wanted = env if env != "allow_download" else "allow_download = false"
    assert "\n" not in message
    assert (f"timm resnet18: model.safetensors or pytorch_model.bin of timm/resnet18.a1_in1k not found in the "
            f"Hugging Face cache {hf_cache / 'models--timm--resnet18.a1_in1k'} ({wanted} is set, so no download)"
            in message)
    assert "hf download timm/resnet18.a1_in1k" in message and "or set backbone.weights" in message


def test_on_the_meta_device_nothing_is_fetched(hf_cache):
    """mltl counts parameters on "meta" (and a saved network can be rebuilt there to receive its own weights):
    an empty cache offline is no error there, and the preprocessing is the model's all the same."""
    with torch.device("meta"):
        net = build({"model": "resnet18", "pretrained": True})
    assert net.trunk.conv1.weight.is_meta and net.preprocessing.source == "timm pretrained_cfg of resnet18.a1_in1k"
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE is set, so no download"):
        build({"model": "resnet18", "pretrained": True})


def test_a_failed_download_is_one_line_naming_the_cache_folder(hf_cache, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # whatever the session started with
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: the connection is refused
    with pytest.raises(ConfigError) as err:
        build({"model": "hf-hub:acme/resnet-test"})
    message = str(err.value)
    assert "\n" not in message
    assert (f"timm hf-hub:acme/resnet-test: config.json of acme/resnet-test not found in the Hugging Face cache "
            f"{hf_cache / 'models--acme--resnet-test'} and it could not be downloaded (") in message
    assert not any(p.is_file() for p in hf_cache.rglob("*"))  # nothing half-downloaded left behind


@pytest.mark.parametrize("form", ["hf-hub", "folder", "local-dir"])
def test_hub_repository_and_local_folder_names(hf_cache, tmp_path, form):
    state = made_up_weights("resnet18")
    mean, std = (0.1, 0.2, 0.3), (0.4, 0.5, 0.6)  # the config.json's own, not ImageNet's
    snapshot = hub_repo(hf_cache, "acme/resnet-test", state, config_json("resnet18", mean, std, size=160))
    model = {"hf-hub": "hf-hub:acme/resnet-test", "folder": str(snapshot), "local-dir": f"local-dir:{snapshot}"}[form]
    net = build({"model": model}, in_chans=1)  # pretrained is the default for these names
    assert torch.allclose(net.trunk.conv1.weight, state["conv1.weight"].sum(1, keepdim=True))
    assert net.group_names()[:5] == ["C1", "C2", "C3", "C4", "C5"]
    pre = net.preprocessing
    assert (pre.mean, pre.std, pre.input_size, pre.interpolation) == (mean, std, 160, "bicubic")
    assert pre.source.startswith("timm pretrained_cfg of ")
    assert ("hf-hub:acme/resnet-test" if form == "hf-hub" else "config.json") in pre.source
    scratch = build({"model": model, "pretrained": False})
    assert scratch.preprocessing is None and not torch.equal(scratch.trunk.conv1.weight, state["conv1.weight"])


def test_a_folder_without_weights_or_config_is_a_clear_error(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    with pytest.raises(ConfigError, match=r"config.json not found; a local model is a folder in timm's hub layout"):
        build({"model": str(folder)})
    (folder / "config.json").write_text(json.dumps(config_json("resnet18", *IMAGENET)))
    with pytest.raises(ConfigError, match=r"has config.json but no weights \(model.safetensors or pytorch_model.bin\)"):
        build({"model": str(folder)})
    with pytest.raises(ConfigError, match=r'no folder .*nowhere exists; a local model is a folder'):
        build({"model": str(tmp_path / "nowhere")})


def test_vit_tokens_are_in_group_c1_and_frozen_with_it(hf_cache):
    state = made_up_weights("vit_tiny_patch16_224")
    state["cls_token"] = torch.linspace(0, 1, state["cls_token"].numel()).reshape(state["cls_token"].shape)
    cfg = timm.models.get_pretrained_cfg("vit_tiny_patch16_224")
    hub_repo(hf_cache, cfg.hf_hub_id, state)
    net = build({"model": "vit_tiny_patch16_224", "pretrained": True}, in_chans=3, size=32)
    assert torch.equal(net.trunk.cls_token, state["cls_token"])
    assert torch.equal(net.trunk.patch_embed.proj.weight, state["patch_embed.proj.weight"])
    assert net.trunk.pos_embed.shape == (1, 1 + 2 * 2, 192)  # resampled from 14 x 14 patches to 2 x 2
    assert net.preprocessing.mean == cfg.mean and net.preprocessing.input_size == 224
    assert net.groups["C1"] == ("trunk.patch_embed",)
    assert net.loose == {"C1": ("trunk.cls_token", "trunk.pos_embed")}
    assert net.groups["C2"] == ("trunk.blocks.0",) and net.groups["C13"] == ("trunk.blocks.11", "trunk.norm")
    grouped = [id(p) for g in net.trunk_groups for p in net.group_parameters(g)]
    assert sorted(grouped) == sorted(id(p) for p in net.trunk.parameters())  # each parameter in one group

    net.set_frozen(frozenset({"C1"}))
    assert not net.trunk.cls_token.requires_grad and not net.trunk.pos_embed.requires_grad
    assert not net.trunk.patch_embed.proj.weight.requires_grad and net.trunk.blocks[0].attn.qkv.weight.requires_grad
    before = {k: v.detach().clone() for k, v in net.named_parameters()}
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.5)
    torch.manual_seed(0)
    loss = torch.nn.functional.cross_entropy(net(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 0, 1]))
    loss.backward()
    opt.step()
    after = dict(net.named_parameters())
    for name in ("trunk.cls_token", "trunk.pos_embed", "trunk.patch_embed.proj.weight"):
        assert torch.equal(after[name], before[name]), name
    assert not torch.equal(after["trunk.blocks.0.attn.qkv.weight"], before["trunk.blocks.0.attn.qkv.weight"])


def test_vit_trains_from_scratch_at_64_px():
    net = build({"model": "vit_tiny_patch16_224"}, in_chans=1, size=64)
    assert net.preprocessing is None and net.trunk.pos_embed.shape == (1, 1 + 4 * 4, 192)
    assert net(torch.zeros(2, 1, 64, 64)).shape == (2, 2)


class _Pixels:
    """A domain of 3-channel uint8 images at the chain's input size (nothing resamples them)."""

    @hookimpl
    def register_domains(self, register):
        def pixels(n: int = 8) -> mltl.Domain:
            rng = np.random.default_rng(0)
            images = rng.integers(0, 256, (2 * n, 3, 16, 16), dtype=np.uint8)
            return mltl.Domain(classes=("a", "b"), images=images, labels=[0] * n + [1] * n,
                               ids=[f"i{i}" for i in range(2 * n)])

        register("pixels", pixels)


@pytest.mark.slow
def test_a_chain_feeds_the_network_with_the_models_own_mean_and_std(hf_cache, tmp_path, fresh_plugins):
    """Issue 14's "done when": the tensor entering the pretrained trunk is (pixel/255 - mean_c) / std_c with
    that model's pretrained_cfg, and the weights are the cache's."""
    state = made_up_weights("resnet18")
    hub_repo(hf_cache, "timm/resnet18.a1_in1k", state)
    mltl.register_plugin(_Pixels(), name="test-pixels")
    path = tmp_path / "c.toml"
    path.write_text('[run]\nname = "n"\n\n[input]\nsize = 16\nchannels = 3\n\n[[stages]]\nname = "target"\n'
                    'domain = { plugin = "pixels" }\n'
                    'backbone = { name = "timm", model = "resnet18", pretrained = true }\nfreeze = "C1-C5"\n'
                    'split = { protocol = "holdout", val = 0.25, test = 0.25 }\n'
                    'train = { epochs = 1, batch_size = 4 }\n')
    seen = []

    def record(module, args):
        x = args[0]
        if isinstance(module, timm.models.ResNet) and not module.training and x.device.type == "cpu" and x.any():
            # evaluation (no augmentation); not a probe of the output shape (zeros, or on the meta device)
            seen.append(x.detach().clone())

    handle = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        result = mltl.run(mltl.load_config(path), out=tmp_path / "run", device="cpu")
    finally:
        handle.remove()
    cfg = timm.models.get_pretrained_cfg("resnet18")
    mean = torch.tensor(cfg.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std).view(1, 3, 1, 1)
    x = torch.cat(seen)
    pixels = (x * std + mean) * 255
    assert len(x) >= 8 and torch.allclose(pixels, pixels.round(), atol=2e-3)  # integral only with these values
    domain = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (16, 3, 16, 16), dtype=np.uint8))
    for image in pixels.round().to(torch.uint8):
        assert any(torch.equal(image, d) for d in domain)  # exactly one of the domain's images, per channel
    expected = (pixels.round() / 255 - mean) / std
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-5)
    wrong = (x * 0.25 + 0.5) * 255  # mltl's scratch default would not give whole pixels
    assert not torch.allclose(wrong, wrong.round(), atol=2e-3)

    record_json = json.loads((result.run_dir / "target" / "model.json").read_text())
    assert tuple(record_json["input"]["mean"]) == cfg.mean and tuple(record_json["input"]["std"]) == cfg.std
    assert "timm pretrained_cfg of resnet18.a1_in1k" in record_json["input_note"]
    trained = mltl.load_stage(result.run_dir / "target").network
    assert torch.equal(trained.trunk.conv1.weight, state["conv1.weight"])  # frozen C1-C5: the cache's weights
