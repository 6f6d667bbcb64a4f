"""Augmentation v2 (per-image random geometry and intensity on the device) and the balanced sampler."""

import math

import pytest
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from mltl.data import augment as A
from mltl.config import TrainConfig, parse_config
from mltl.errors import ConfigError


def _batch(n=8, c=1, size=32, seed=0):
    return torch.rand(n, c, size, size, generator=torch.Generator().manual_seed(seed)) * 255


@pytest.mark.parametrize("items", [["rotate:30"], ["shift:0.2"], ["hflip", "vflip"],
                                   ["crop:0.5", "rotate:20", "hflip", "vflip", "shift:0.1"]])
def test_geometry_equals_torchvision_v2_per_image(items):
    """One batched grid_sample per batch gives what torchvision's functional ops give image by image."""
    x = _batch(c=3)
    spec = A.parse(items)
    p = A.draw(spec, len(x), torch.Generator().manual_seed(1))
    if "crop" in p:
        p["crop"][:, 1] = p["crop"][:, 0]  # square windows, comparable with affine's isotropic scale
    y = A.apply(x, spec, p, slice(0, len(x)))
    half = x.shape[-1] / 2
    for i in range(len(x)):
        img = x[i]
        if "hflip" in p and p["hflip"][i]:
            img = TF.horizontal_flip(img)
        if "vflip" in p and p["vflip"][i]:
            img = TF.vertical_flip(img)
        deg = math.degrees(float(p["angle"][i])) if "angle" in p else 0.0
        scale, tx, ty = 1.0, 0.0, 0.0
        if "crop" in p:
            w, _, cx, cy = p["crop"][i].tolist()
            scale, tx, ty = 1 / w, -cx * half / w, -cy * half / w
        if "shift" in p:
            sx, sy = p["shift"][i].tolist()
            tx, ty = tx + sx * half, ty + sy * half
        if deg and scale == 1 and tx == ty == 0:
            ref = TF.rotate(img, deg, interpolation=InterpolationMode.BILINEAR)
        else:
            ref = TF.affine(img, angle=-deg, translate=[tx, ty], scale=scale, shear=[0.0, 0.0],
                            interpolation=InterpolationMode.BILINEAR)
        assert (ref - y[i]).abs().max() < 2e-3, (items, i)


def test_intensity_equals_torchvision_v2_per_image():
    for c in (1, 3):
        x = _batch(c=c)
        spec = A.parse(["brightness:0.3", "contrast:0.4"])
        p = A.draw(spec, len(x), torch.Generator().manual_seed(2))
        y = A.apply(x, spec, p, slice(0, len(x)))
        for i in range(len(x)):
            ref = TF.adjust_contrast(TF.adjust_brightness(x[i] / 255, float(p["brightness"][i])),
                                     float(p["contrast"][i])) * 255
            assert (ref - y[i]).abs().max() < 1e-3


def test_every_image_gets_its_own_draw_and_draws_are_reproducible():
    x = torch.zeros(64, 1, 16, 16)
    x[..., :8] = 255  # left half bright: a horizontal flip is visible
    spec = A.parse(["hflip", "rotate:10", "brightness:0.2", "noise:0.05"])
    p1 = A.draw(spec, 64, torch.Generator().manual_seed(3))
    p2 = A.draw(spec, 64, torch.Generator().manual_seed(3))
    assert all(torch.equal(p1[k], p2[k]) for k in p1)
    y = A.apply(x, spec, p1, slice(0, 64))
    assert torch.equal(y, A.apply(x, spec, p2, slice(0, 64)))
    flipped = y[..., 8:].mean((1, 2, 3)) > y[..., :8].mean((1, 2, 3))
    assert torch.equal(flipped, p1["hflip"]) and 10 < int(flipped.sum()) < 54
    assert len(set(p1["angle"].tolist())) == 64 and len(set(p1["brightness"].tolist())) == 64
    noise = y - A.apply(x, A.parse(["hflip", "rotate:10", "brightness:0.2"]),
                        {k: v for k, v in p1.items() if k != "noise_seed"}, slice(0, 64))
    assert 0.03 * 255 < noise[:, :, 4:12, 4:12].std() < 0.07 * 255  # inside the image, away from clamping


def test_a_ranks_share_of_a_global_batch_gets_what_one_process_gives_it():
    """Under DDP rank r augments positions start+r, start+r+W, ... with the draws one process would use."""
    x = _batch(n=10, c=3)
    spec = A.parse(["hflip", "crop:0.6", "rotate:20", "contrast:0.2", "noise:0.1"])
    p = A.draw(spec, 30, torch.Generator().manual_seed(4))
    start, stop = 10, 20  # the second global batch of the epoch
    whole = A.apply(x, spec, p, slice(start, stop))
    for rank in (0, 1):
        part = A.apply(x[rank::2], spec, p, slice(start + rank, stop, 2), (slice(start, stop), slice(rank, None, 2)))
        assert torch.allclose(part, whole[rank::2], atol=1e-4)


def test_old_and_new_spellings_parse():
    assert A.parse(["hflip", "vflip", "shift"]) == A.AugmentSpec(hflip=True, vflip=True, shift=A.DEFAULT_SHIFT)
    assert A.parse(["intensity:0.1"]) == A.AugmentSpec(brightness=0.1, contrast=0.1)
    assert not A.parse([]).active
    assert TrainConfig(augment=("hflip", "rotate:10", "crop:0.8", "intensity:0.1", "noise:0.02")).augment


@pytest.mark.parametrize("item, message", [
    ("rotat:10", 'contains the unknown augmentation "rotat:10", did you mean "rotate"?'),
    ("rotate", 'contains "rotate", which needs a value, e.g. "rotate:10"'),
    ("rotate:500", 'contains "rotate:500": the angle must be above 0 and at most 180'),
    ("crop:1.5", 'contains "crop:1.5": the smallest area fraction must be above 0 and below 1'),
    ("hflip:1", 'contains "hflip:1": hflip takes no value'),
    ("noise:x", 'contains "noise:x": "x" is not a number'),
])
def test_bad_augmentation_is_a_config_error_naming_the_key(item, message):
    raw = {"run": {"name": "x"}, "stages": [{"name": "s", "domain": {"plugin": "fractal"}, "backbone": "gfe-1",
                                             "train": {"augment": ["hflip", item]}}]}
    with pytest.raises(ConfigError) as err:
        parse_config(raw, "c.toml")
    assert str(err.value).startswith("c.toml: stages[0].train.augment: ") and message in str(err.value)


def test_balanced_sampler_draws_classes_about_equally():
    from mltl.training.train import _epoch_order

    y = torch.tensor([0] * 300 + [1] * 60 + [2] * 20)  # 15 : 3 : 1
    gen = torch.Generator().manual_seed(0)
    order = _epoch_order(TrainConfig(sampler="balanced"), len(y), gen, y)
    assert len(order) == len(y)  # the same epoch length
    freq = torch.bincount(y[order], minlength=3).float() / len(y)
    assert torch.all((freq - 1 / 3).abs() < 0.06), freq  # binomial sd is 0.024 at n = 380
    uniform = _epoch_order(TrainConfig(), len(y), gen, y)
    assert torch.equal(torch.sort(uniform).values, torch.arange(len(y)))  # a permutation
