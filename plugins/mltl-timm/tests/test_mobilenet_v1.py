"""The MobileNetV1 x0.25 backbone (mltl-timm, "mobilenet-v1") on the real ImageNet-1k checkpoint of
Pytorch_Retinaface (../shared/data/weights/mobilenetV1X0.25_pretrain.tar): ImageNet accuracy through mltl's
own normalisation, layer groups that freeze, one input channel, clear errors for a wrong file, and the
ImageNet normalisation recorded by a run."""

import json

import mltl
import numpy as np
import pytest
import torch
from mltl import UserError, get_registry
from mltl.networks.network import HeadSpec, build_network, make_spec
from mltl_timm.mobilenet_v1 import IMAGENET, MobileNetV1, mobilenet_v1_backbone, read_checkpoint
from torch import nn

WEIGHTS = "weights/mobilenetV1X0.25_pretrain.tar"


@pytest.fixture
def weights(shared_data) -> str:
    path = shared_data / WEIGHTS
    if not path.is_file():
        pytest.fail(f"shared data present but {path} is missing")
    return str(path)


def _imagenet_subset(folder, every: int):
    """Every ``every``-th image of imagenet_sample_1000 (one per class, named WNID_name.jpg) as uint8
    (N, 3, 224, 224): shorter side to 256 (antialiased bilinear), centre crop 224; labels in sorted-wnid order."""
    from PIL import Image

    files = sorted(folder.glob("*.jpg"))
    assert len(files) == 1000
    index = {w: i for i, w in enumerate(sorted({f.name.split("_")[0] for f in files}))}
    assert len(index) == 1000
    images, labels = [], []
    for f in files[::every]:
        im = Image.open(f).convert("RGB")
        w, h = im.size
        s = 256 / min(w, h)
        im = im.resize((max(256, round(w * s)), max(256, round(h * s))), Image.BILINEAR, reducing_gap=None)
        w, h = im.size
        left, top = (w - 224) // 2, (h - 224) // 2
        images.append(np.asarray(im.crop((left, top, left + 224, top + 224))))
        labels.append(index[f.name.split("_")[0]])
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), torch.tensor(labels)


@pytest.mark.slow
def test_imagenet_accuracy_of_the_real_checkpoint_through_mltl_normalise(shared_data, weights):
    """Top-1/top-5 on 334 of the 1000 sample images (every third), the checkpoint's own fc as the classifier.

    Measured: 0.500 / 0.728 here (all 1000 images: 0.457 / 0.692; the file records 46.58% on ImageNet val).
    The floors fail for a wrong pipeline, measured on the same images: BGR channel order 0.299 / 0.515, no
    normalisation (pixel / 255) 0.093 / 0.183, plain ReLU instead of LeakyReLU(0.1) 0.012 / 0.075. (mltl's
    from-scratch default mean 0.5 / std 0.25 is close to ImageNet's and costs little: 0.464 / 0.713.)"""
    x, y = _imagenet_subset(shared_data / "imagenet_sample_1000" / "images", every=3)
    trunk = mobilenet_v1_backbone(in_chans=3, image_size=224, weights=weights)
    assert trunk.preprocessing == IMAGENET and trunk.feature_dim == 256
    _, state = read_checkpoint(weights)
    fc = nn.Linear(256, 1000)
    fc.load_state_dict({"weight": state["fc.weight"], "bias": state["fc.bias"]})
    net = nn.Sequential(trunk.module, fc).eval()
    pre = trunk.preprocessing
    inp = mltl.InputConfig(size=224, channels=3, mean=pre.mean, std=pre.std)
    with torch.no_grad():
        logits = torch.cat([net(mltl.normalise(x[i:i + 64], inp)) for i in range(0, len(x), 64)])
    top5 = logits.topk(5, dim=1).indices
    top1_acc = (top5[:, 0] == y).float().mean().item()
    top5_acc = (top5 == y[:, None]).any(dim=1).float().mean().item()
    assert top1_acc >= 0.42, f"top-1 {top1_acc:.3f} (expected about 0.49)"
    assert top5_acc >= 0.65, f"top-5 {top5_acc:.3f} (expected about 0.73)"


def test_groups_are_the_three_stages_and_a_frozen_c1_stays_unchanged(weights):
    net = build_network(make_spec("mobilenet-v1", {"weights": weights}, 3, 32, HeadSpec(), ("a", "b")),
                        get_registry())
    assert net.group_names() == ["C1", "C2", "C3", "classifier"]
    assert [net.groups[g] for g in ("C1", "C2", "C3")] == [("trunk.stage1",), ("trunk.stage2",), ("trunk.stage3",)]
    grouped = [id(p) for g in net.trunk_groups for p in net.group_parameters(g)]
    assert sorted(grouped) == sorted(id(p) for p in net.trunk.parameters())
    assert net.preprocessing == IMAGENET
    # the checkpoint's tensors are in the network
    _, state = read_checkpoint(weights)
    assert torch.equal(net.trunk.stage3[1][3].weight, state["stage3.1.3.weight"])

    net.set_frozen(frozenset({"C1"}))
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    gen = torch.Generator().manual_seed(0)
    loss = nn.functional.cross_entropy(net(torch.randn(4, 3, 32, 32, generator=gen)), torch.tensor([0, 1, 0, 1]))
    loss.backward()
    opt.step()
    after = net.state_dict()
    c1 = [k for k in before if k.startswith("trunk.stage1.")]
    assert len(c1) == 66  # weights and BatchNorm running statistics alike
    for k in c1:
        assert torch.equal(before[k], after[k]), k
    assert not torch.equal(before["trunk.stage2.0.3.weight"], after["trunk.stage2.0.3.weight"])
    assert not torch.equal(before["trunk.stage2.0.4.running_mean"], after["trunk.stage2.0.4.running_mean"])


def test_one_input_channel_sums_the_rgb_filters(weights):
    grey = mobilenet_v1_backbone(in_chans=1, image_size=64, weights=weights)
    rgb = mobilenet_v1_backbone(in_chans=3, image_size=64, weights=weights)
    assert grey.module.stage1[0][0].weight.shape == (8, 1, 3, 3)
    assert torch.allclose(grey.module.stage1[0][0].weight, rgb.module.stage1[0][0].weight.sum(1, keepdim=True))
    x = torch.randn(2, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        f1 = grey.module.eval()(x)
        f3 = rgb.module.eval()(x.repeat(1, 3, 1, 1))
    assert f1.shape == (2, 256)
    assert torch.allclose(f1, f3, atol=1e-4)


def test_without_weights_there_is_no_preprocessing_and_width_scales():
    trunk = mobilenet_v1_backbone(in_chans=3, image_size=32)
    assert trunk.preprocessing is None
    assert trunk.module.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 256)
    wide = mobilenet_v1_backbone(in_chans=1, image_size=32, width=1.0)
    assert wide.feature_dim == 1024 and wide.module.eval()(torch.zeros(1, 1, 32, 32)).shape == (1, 1024)
    with pytest.raises(UserError, match="width"):
        mobilenet_v1_backbone(in_chans=3, image_size=32, width=0)


def _one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg
    return msg


def test_a_wrong_file_is_a_one_line_error_naming_the_file_and_keys(tmp_path, weights):
    _, state = read_checkpoint(weights)

    lacking = tmp_path / "lacking.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items() if not k.startswith("stage3.")}}, lacking)
    with pytest.raises(UserError) as exc:
        mobilenet_v1_backbone(in_chans=3, image_size=64, weights=str(lacking))
    msg = _one_line(exc)
    assert str(lacking) in msg and "lacks 24 tensors" in msg and "stage3.0.0.weight" in msg

    extra = tmp_path / "extra.pth"
    torch.save({**state, "stage4.0.weight": torch.zeros(3)}, extra)  # a bare state dict is read too
    with pytest.raises(UserError) as exc:
        mobilenet_v1_backbone(in_chans=3, image_size=64, weights=str(extra))
    assert "unexpected" in _one_line(exc) and "stage4.0.weight" in str(exc.value)

    wider = tmp_path / "wider.pth"
    torch.save(MobileNetV1(width=0.5).state_dict(), wider)
    with pytest.raises(UserError) as exc:
        mobilenet_v1_backbone(in_chans=3, image_size=64, weights=str(wider))
    msg = _one_line(exc)
    assert str(wider) in msg and "wrong shape" in msg and "expected (" in msg

    with pytest.raises(UserError) as exc:
        mobilenet_v1_backbone(in_chans=3, image_size=64, weights=str(tmp_path / "nope.tar"))
    assert "not found" in _one_line(exc) and "nope.tar" in str(exc.value)

    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError) as exc:
        mobilenet_v1_backbone(in_chans=3, image_size=64, weights=str(junk))
    assert "junk.tar" in _one_line(exc)


CHAIN = """
[run]
name = "mobilenet-tiny"
seed = 1

[input]
size = 32
channels = 3

[[stages]]
name = "source"
domain = {{ plugin = "fractal", classes = 2, images_per_class = 6, seed = 1, channels = 3 }}
backbone = {{ name = "mobilenet-v1", weights = "{weights}" }}
split = {{ protocol = "holdout" }}
train = {{ epochs = 1, batch_size = 8 }}

[[stages]]
name = "target"
init = "source"
domain = {{ plugin = "ct-phantom", classes = ["normal", "cyst"], images_per_class = 6, seed = 3 }}
freeze = "C1-C2"
split = {{ protocol = "holdout" }}
train = {{ epochs = 1, batch_size = 8 }}
"""


@pytest.mark.slow  # a whole two-stage run: about 15 s of CPU
def test_a_run_records_the_imagenet_normalisation_in_model_json(tmp_path, weights):
    cfg = tmp_path / "c.toml"
    cfg.write_text(CHAIN.format(weights=weights))
    result = mltl.run(cfg, out=tmp_path / "run", device="cpu")
    for stage in ("source", "target"):
        info = json.loads((result.run_dir / stage / "model.json").read_text())
        assert info["input"]["mean"] == [0.485, 0.456, 0.406], stage
        assert info["input"]["std"] == [0.229, 0.224, 0.225], stage
        assert info["spec"]["backbone"] == "mobilenet-v1"
    assert result.stage("target").metrics["frozen"] == ["C1", "C2"]
