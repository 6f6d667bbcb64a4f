"""torchvision models as backbones (mltl_timm.tv): weights from the torch hub cache (a test-made checkpoint under
the file name torchvision expects) or a local file, preprocessing from the weights enum, one-line offline errors,
and layer groups per family."""

import pytest
import torch

from mltl import ConfigError, get_registry
from mltl.networks.network import HeadSpec, build_network, make_spec

torchvision = pytest.importorskip("torchvision")
models = torchvision.models


def build(options, in_chans=3, size=32):
    return build_network(make_spec("torchvision", options, in_chans, size, HeadSpec(), ("a", "b")), get_registry())


def made_up_resnet18() -> dict[str, torch.Tensor]:
    torch.manual_seed(5)
    state = {k: v.clone() for k, v in models.resnet18().state_dict().items()}
    state["conv1.weight"] = torch.linspace(-1, 1, state["conv1.weight"].numel()).reshape(state["conv1.weight"].shape)
    return state


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """An empty torch hub cache (TORCH_HOME) and MLTL_OFFLINE: nothing is downloaded."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("MLTL_OFFLINE", "1")
    return tmp_path / "torch" / "hub" / "checkpoints"


def test_pretrained_resnet18_from_the_torch_hub_cache_with_the_enums_preprocessing(torch_home):
    weights = models.ResNet18_Weights.DEFAULT
    torch_home.mkdir(parents=True)
    state = made_up_resnet18()
    torch.save(state, torch_home / weights.url.rsplit("/", 1)[-1])  # resnet18-f37072fd.pth
    for options in ({"model": "resnet18", "pretrained": True}, {"model": "resnet18", "weights": "IMAGENET1K_V1"}):
        net = build(options)
        assert torch.equal(net.trunk.conv1.weight, state["conv1.weight"])
        assert torch.equal(net.trunk.layer3[0].downsample[1].running_mean, state["layer3.0.downsample.1.running_mean"])
        assert isinstance(net.trunk.fc, torch.nn.Identity) and net.feature_dim == 512
        pre = net.preprocessing
        t = weights.transforms()
        assert (list(pre.mean), list(pre.std), pre.input_size) == (list(t.mean), list(t.std), t.crop_size[0])
        assert pre.source == "torchvision ResNet18_Weights.IMAGENET1K_V1 transforms (resize 256, crop 224)"
    assert net.group_names() == ["C1", "C2", "C3", "C4", "C5", "classifier"]
    assert net.groups["C1"] == ("trunk.conv1", "trunk.bn1") and net.groups["C5"] == ("trunk.layer4",)
    grey = build({"model": "resnet18", "pretrained": True}, in_chans=1)
    assert torch.allclose(grey.trunk.conv1.weight, state["conv1.weight"].sum(1, keepdim=True))
    x = torch.rand(2, 1, 32, 32)  # a grey image as one channel or replicated to RGB: the same features
    with torch.no_grad():
        torch.testing.assert_close(grey.trunk.conv1(x), net.trunk.conv1(x.expand(-1, 3, -1, -1)), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(grey.eval().trunk(x), net.eval().trunk(x.expand(-1, 3, -1, -1)), rtol=0, atol=1e-3)
    scratch = build({"model": "resnet18"})
    assert scratch.preprocessing is None and not torch.equal(scratch.trunk.conv1.weight, state["conv1.weight"])


def test_weights_from_a_local_file(tmp_path, torch_home):
    from safetensors.torch import save_file

    state = made_up_resnet18()
    path = tmp_path / "mine.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    net = build({"model": "resnet18", "weights": str(path)})
    assert torch.equal(net.trunk.conv1.weight, state["conv1.weight"])
    assert net.preprocessing.source.startswith("torchvision ResNet18_Weights.IMAGENET1K_V1 transforms")
    del state["fc.weight"], state["fc.bias"]  # a trunk without the ImageNet classifier loads too
    torch.save(state, tmp_path / "trunk.pth")
    assert torch.equal(build({"model": "resnet18", "weights": str(tmp_path / "trunk.pth")}).trunk.conv1.weight,
                       state["conv1.weight"])
    del state["layer4.1.conv2.weight"]
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(ConfigError, match=r"cannot load weights from .*broken\.pth: it lacks 1 of the model's tensors "
                                          r"\(layer4\.1\.conv2\.weight, \.\.\.\); is it a checkpoint of resnet18\?"):
        build({"model": "resnet18", "weights": str(tmp_path / "broken.pth")})


def test_offline_without_the_file_is_one_line_naming_the_path(torch_home):
    with pytest.raises(ConfigError) as err:
        build({"model": "resnet18", "pretrained": True})
    message = str(err.value)
    assert "\n" not in message
    assert (f"torchvision resnet18: {torch_home / 'resnet18-f37072fd.pth'} not found (MLTL_OFFLINE is set, so no "
            f"download); put resnet18-f37072fd.pth (from https://download.pytorch.org/models/resnet18-f37072fd.pth) "
            f"at {torch_home / 'resnet18-f37072fd.pth'}") in message


def test_on_the_meta_device_nothing_is_fetched(torch_home):
    with torch.device("meta"):
        net = build({"model": "resnet18", "pretrained": True})
    assert net.trunk.conv1.weight.is_meta and net.preprocessing.source.startswith("torchvision ResNet18_Weights")
    assert not torch_home.exists()


def test_unknown_names_are_clear_errors(torch_home):
    with pytest.raises(ConfigError, match=r'torchvision: unknown model "resnet81", did you mean "resnet18"\?'):
        build({"model": "resnet81"})
    with pytest.raises(ConfigError, match=r'weights "IMAGENET1K_V9" is neither a file nor one of resnet18\'s weights '
                                          r"\(IMAGENET1K_V1\)"):
        build({"model": "resnet18", "weights": "IMAGENET1K_V9"})
    with pytest.raises(ConfigError, match=r"squeezenet1_1: the model has no final linear layer"):
        build({"model": "squeezenet1_1"})


@pytest.mark.parametrize("model, groups, last", [
    ("mobilenet_v3_small", 8, ("trunk.classifier",)),  # stem, 5 stages, 1x1 conv; its 576 -> 1024 linear layer last
    ("efficientnet_b0", 9, ("trunk.features.8",)),  # stem, seven stages, the 1x1 head convolution
])
def test_groups_of_sequential_feature_families(torch_home, model, groups, last):
    net = build({"model": model}, in_chans=1, size=64)
    trunk = [g for g in net.group_names() if g != "classifier"]
    assert len(trunk) == groups and net.groups["C1"] == ("trunk.features.0",) and net.groups[trunk[-1]] == last
    grouped = [id(p) for g in net.trunk_groups for p in net.group_parameters(g)]
    assert sorted(grouped) == sorted(id(p) for p in net.trunk.parameters())  # each parameter in one group
    assert net(torch.zeros(2, 1, 64, 64)).shape == (2, 2)


@pytest.mark.slow
def test_groups_of_densenet_convnext_and_vit_and_densenets_old_key_names(tmp_path, torch_home):
    torch.manual_seed(0)
    ref = models.densenet121()
    state = ref.state_dict()
    old = {k.replace("norm1.", "norm.1.").replace("conv2.", "conv.2."): v for k, v in state.items()
           if not k.endswith("num_batches_tracked")}  # the names of torchvision's file, which predates that counter
    assert old.keys() != state.keys()
    torch.save(old, tmp_path / "densenet121-a639ec97.pth")
    net = build({"model": "densenet121", "weights": str(tmp_path / "densenet121-a639ec97.pth")})
    assert torch.equal(net.trunk.features.denseblock2.denselayer3.norm1.weight,
                       state["features.denseblock2.denselayer3.norm1.weight"])
    assert net.groups["C2"] == ("trunk.features.denseblock1", "trunk.features.transition1")
    assert net.groups["C5"] == ("trunk.features.denseblock4", "trunk.features.norm5")
    assert net.preprocessing.source.startswith("torchvision DenseNet121_Weights.IMAGENET1K_V1")

    convnext = build({"model": "convnext_tiny"})
    assert [convnext.groups[f"C{i}"] for i in (1, 3, 6)] == [
        ("trunk.features.0",), ("trunk.features.2", "trunk.features.3"), ("trunk.classifier",)]

    vit = build({"model": "vit_b_16"}, size=32)
    assert vit.loose == {"C1": ("trunk.class_token", "trunk.encoder.pos_embedding")}
    assert vit.groups["C2"] == ("trunk.encoder.layers.encoder_layer_0",) and vit.groups["C14"] == ("trunk.encoder.ln",)
    vit.set_frozen(frozenset({"C1"}))
    assert not vit.trunk.class_token.requires_grad and not vit.trunk.encoder.pos_embedding.requires_grad


def test_a_missing_file_is_downloaded_into_the_torch_hub_cache_and_hash_checked(tmp_path, torch_home, monkeypatch):
    """mltl_timm.fetch.torch_hub_file against a local web server: the file lands under its URL's name, and one
    whose content does not match the hash prefix in its name is refused and not kept."""
    import functools
    import hashlib
    import http.server
    import threading

    from mltl import UserError
    from mltl_timm.fetch import torch_hub_file

    monkeypatch.delenv("MLTL_OFFLINE")
    served = tmp_path / "served"
    served.mkdir()
    data = b"made-up weights"
    good = f"net-{hashlib.sha256(data).hexdigest()[:8]}.pth"
    (served / good).write_bytes(data)
    (served / "net-00000000.pth").write_bytes(data)  # a name whose hash prefix the content does not have
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        path = torch_hub_file(f"{url}/{good}", what="torchvision net", allow_download=True)
        assert path == torch_home / good and path.read_bytes() == data
        with pytest.raises(UserError, match=r"net-00000000\.pth not found and it could not be downloaded \("):
            torch_hub_file(f"{url}/net-00000000.pth", what="torchvision net", allow_download=True)
        assert not (torch_home / "net-00000000.pth").exists()
        with pytest.raises(UserError, match=r"allow_download = false is set, so no download"):
            torch_hub_file(f"{url}/other-12345678.pth", what="torchvision net", allow_download=False)
    finally:
        server.shutdown()
