"""The timm backbone plugin (mltl-timm): stages as layer groups, training in a chain with frozen stages kept
bit-identical, weights from a local file (offline), in_chans 1 and 3, and clear errors. Pretrained weights from
the Hugging Face cache, ViTs and torchvision models: test_pretrained.py and test_torchvision.py."""

import os
import subprocess
import sys

import pytest
import torch

from mltl import ConfigError, get_registry
from mltl.networks.network import HeadSpec, build_network, make_spec

timm = pytest.importorskip("timm")


def build(options, in_chans=3, size=32, classes=("a", "b")):
    return build_network(make_spec("timm", options, in_chans, size, HeadSpec(), classes), get_registry())


def test_resnet18_stages_are_groups_c1_to_c5():
    net = build({"model": "resnet18"}, in_chans=1)
    assert net.group_names() == ["C1", "C2", "C3", "C4", "C5", "classifier"]
    assert net.groups["C1"] == ("trunk.conv1", "trunk.bn1")
    assert [net.groups[f"C{i}"] for i in range(2, 6)] == [(f"trunk.layer{i}",) for i in range(1, 5)]
    # every trunk parameter is in exactly one group
    grouped = [id(p) for g in net.trunk_groups for p in net.group_parameters(g)]
    assert sorted(grouped) == sorted(id(p) for p in net.trunk.parameters())
    assert net.head.classifier.in_features == 512
    assert net(torch.zeros(2, 1, 32, 32)).shape == (2, 2)


CHAIN = """
[run]
name = "timm-tiny"
seed = 1

[input]
size = 32
channels = 1

[[stages]]
name = "source"
domain = {{ plugin = "fractal", classes = 3, images_per_class = 12, seed = 1, channels = 1 }}
backbone = {{ name = "timm", model = "resnet18"{weights} }}
train = {{ epochs = 2, batch_size = 12, optimizer = "adamw", lr = 0.002 }}

[[stages]]
name = "target"
init = "source"
domain = {{ plugin = "ct-phantom", classes = ["normal", "cyst", "tumour"], images_per_class = 10, seed = 3 }}
freeze = "C1-C3"
train = {{ epochs = 2, batch_size = 8, optimizer = "sgd", lr = 0.01, lr_decay = 0.5 }}
"""


@pytest.mark.slow
def test_resnet18_trains_in_a_chain_and_frozen_stages_stay_bit_identical(tmp_path):
    import mltl
    from mltl.running.rundir import load_weights

    cfg = tmp_path / "c.toml"
    cfg.write_text(CHAIN.format(weights=""))
    result = mltl.run(cfg, out=tmp_path / "run", device="cpu")
    source, _ = load_weights(result.run_dir / "source" / "model.safetensors")
    target, _ = load_weights(result.run_dir / "target" / "model.safetensors")
    frozen = ("trunk.conv1.", "trunk.bn1.", "trunk.layer1.", "trunk.layer2.")  # C1-C3
    checked = 0
    for k, v in source.items():
        if k.startswith(frozen):  # weights and BatchNorm running statistics alike
            assert torch.equal(v, target[k]), k
            checked += 1
        elif k.startswith("trunk.layer3.") and k.endswith("conv1.weight"):
            assert not torch.equal(v, target[k]), f"trainable {k} did not change"
    assert checked > 20
    assert result.stage("target").metrics["frozen"] == ["C1", "C2", "C3"]


def test_local_weights_file_is_loaded_offline_for_one_and_three_channels(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(3)
    ref = timm.create_model("resnet18")  # random weights stand in for ImageNet's
    st = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(st))
    pth = tmp_path / "resnet18.pth"
    torch.save(ref.state_dict(), pth)
    for path in (st, pth):
        rgb = build({"model": "resnet18", "weights": str(path)}, in_chans=3)
        for k, v in ref.state_dict().items():
            if not k.startswith("fc."):
                assert torch.equal(rgb.trunk.state_dict()[k], v), (path.suffix, k)
        assert not any(k.startswith("fc.") for k in rgb.trunk.state_dict())
    grey = build({"model": "resnet18", "weights": str(st)}, in_chans=1)
    assert torch.allclose(grey.trunk.conv1.weight, ref.conv1.weight.sum(1, keepdim=True))
    assert torch.equal(grey.trunk.layer4[1].conv2.weight, ref.layer4[1].conv2.weight)
    # a grey image replicated to RGB gives the same first-layer response in both
    x = torch.rand(1, 1, 32, 32)
    assert torch.allclose(rgb.trunk.conv1(x.expand(-1, 3, -1, -1)), grey.trunk.conv1(x), atol=1e-5)


def test_weights_of_another_model_and_a_malicious_pickle_are_refused(tmp_path):
    import pickle

    other = tmp_path / "convnext.pth"
    torch.save(timm.create_model("convnext_atto").state_dict(), other)
    with pytest.raises(ConfigError, match=r"timm resnet18: cannot load weights from .*convnext\.pth"):
        build({"model": "resnet18", "weights": str(other)})

    class Boom:
        def __reduce__(self):
            return (exec, ("open('%s', 'w').write('pwned')" % (tmp_path / "pwned"),))

    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"conv1.weight": Boom()}))
    with pytest.raises(ConfigError, match="cannot load weights from"):
        build({"model": "resnet18", "weights": str(evil)})
    assert not (tmp_path / "pwned").exists()
    with pytest.raises(ConfigError, match=r'weights file "nope.pth" not found'):
        build({"model": "resnet18", "weights": "nope.pth"})


def test_unknown_model_and_tag_are_clear_errors():
    with pytest.raises(ConfigError, match=r'timm: unknown model "resnet81", did you mean "resnet18"\?'):
        build({"model": "resnet81"})
    with pytest.raises(ConfigError, match=r'no pretrained weights "resnet18.a1_in1kk", did you mean "resnet18.a1_in1k"'):
        build({"model": "resnet18.a1_in1kk", "pretrained": True})
    with pytest.raises(ConfigError, match=r'write model = "hf-hub:acme/nothing"'):
        build({"model": "acme/nothing"})
    with pytest.raises(ConfigError, match=r"drop_rate and drop_path_rate must be at least 0"):
        build({"model": "resnet18", "drop_rate": 1.0})


@pytest.mark.slow
def test_a_failed_download_offline_is_one_line_not_a_hang(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(CHAIN.format(weights=", pretrained = true, allow_download = true"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "th")}
    env.pop("HF_HUB_CACHE", None)
    env.pop("MLTL_OFFLINE", None)
    proc = subprocess.run([sys.executable, "-m", "mltl", "validate", str(cfg)], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    repo = tmp_path / "hf" / "hub" / "models--timm--resnet18.a1_in1k"
    assert (f"stages[0].backbone: timm resnet18: model.safetensors or pytorch_model.bin of timm/resnet18.a1_in1k "
            f"not found in the Hugging Face cache {repo} (HF_HUB_OFFLINE is set, so no download)") in lines[0]
    assert "set backbone.weights" in lines[0]
