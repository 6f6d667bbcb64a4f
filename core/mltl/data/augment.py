"""On-device batch augmentation with a separate random draw for every image (``train.augment``).

A stage's ``train.augment`` is a list of items, each ``NAME`` or ``NAME:VALUE``:

=================  ===============================================================================
``hflip``          mirror left-right with probability 1/2
``vflip``          mirror top-bottom with probability 1/2
``rotate:DEG``     rotate by a uniform angle in [-DEG, DEG] degrees (0 < DEG <= 180)
``crop:S``         random resized crop: a window of a uniform fraction [S, 1] of the image's area, aspect
                   ratio log-uniform in [3/4, 4/3], at a uniform position, resized back to the input size
                   (0 < S < 1)
``shift[:F]``      translate by up to F of the image size each way, uniform per axis (0 < F <= 0.5;
                   plain ``shift`` is ``shift:0.0625``, the translation of mltl's first ``shift``)
``brightness:F``   multiply the intensities by a uniform factor in [1-F, 1+F] (0 < F < 1)
``contrast:F``     blend with the image's mean grey level by a uniform factor in [1-F, 1+F] (0 < F < 1)
``intensity:F``    both ``brightness:F`` and ``contrast:F``
``noise:STD``      add Gaussian noise of standard deviation STD (in units of the full intensity range,
                   0 < STD <= 1)
=================  ===============================================================================

Each image of a batch gets its own flip, angle, crop, shift and factors: the geometric ones are composed
into one affine matrix per image and applied in one ``grid_sample`` pass (bilinear, zeros outside), the
intensity ones by broadcasting per-image factors; the results agree with torchvision's
``transforms.v2.functional`` (``horizontal_flip``, ``rotate``, ``affine``, ``adjust_brightness``,
``adjust_contrast``) applied image by image (``tests/test_augment.py``). The order is flips, rotation,
crop, shift (one resampling), then brightness, contrast, noise; values are clamped to [0, 255].

All random numbers except the noise pixels are drawn at the start of an epoch, for every position of the
epoch's order, from the training loop's seeded CPU generator (:func:`draw`), and copied to the device
once; a batch then slices them (:func:`apply`), so the training loop never waits for the host, a resumed
run draws exactly what the uninterrupted one drew, and under DistributedDataParallel each rank applies to
its share of a global batch exactly what one process would. Noise pixels come from a device generator
seeded per position of the global batch from the same draws.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import attrs
import torch
import torch.nn.functional as F

NAMES = ("hflip", "vflip", "rotate", "crop", "shift", "brightness", "contrast", "intensity", "noise")
DEFAULT_SHIFT = 0.0625
_NEEDS_VALUE = {"rotate", "crop", "brightness", "contrast", "intensity", "noise"}
_LUMA = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights (used by adjust_contrast)


@attrs.frozen
class AugmentSpec:
    hflip: bool = False
    vflip: bool = False
    rotate: float = 0.0  # degrees
    crop: float = 1.0  # smallest area fraction; 1 = off
    shift: float = 0.0  # fraction of the size
    brightness: float = 0.0
    contrast: float = 0.0
    noise: float = 0.0  # std in units of the range

    @property
    def geometric(self) -> bool:
        return self.rotate > 0 or self.crop < 1 or self.shift > 0

    @property
    def active(self) -> bool:
        return self != AugmentSpec()


def _value(item: str, name: str, text: str, low: float, high: float, closed_high: bool) -> float:
    try:
        v = float(text)
    except ValueError:
        raise ValueError(f'contains "{item}": "{text}" is not a number') from None
    ok = low < v <= high if closed_high else low < v < high
    if not ok or not math.isfinite(v):
        raise ValueError(f'contains "{item}": {name} must be above {low:g} and '
                         f'{"at most" if closed_high else "below"} {high:g}')
    return v


def parse(items: Iterable[str]) -> AugmentSpec:
    """The spec of a ``train.augment`` list; ValueError with a one-line message on a bad item."""
    from ..errors import did_you_mean

    kw: dict[str, float | bool] = {}
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"contains {item!r}: items are strings such as \"hflip\" or \"rotate:10\"")
        name, sep, text = item.strip().partition(":")
        if name not in NAMES:
            raise ValueError(f'contains the unknown augmentation "{item}"{did_you_mean(name, NAMES)} '
                             f"(items: hflip, vflip, rotate:DEG, crop:MIN_AREA, shift[:F], brightness:F, "
                             f"contrast:F, intensity:F, noise:STD)")
        if name in ("hflip", "vflip"):
            if sep:
                raise ValueError(f'contains "{item}": {name} takes no value')
            kw[name] = True
            continue
        if not sep and name in _NEEDS_VALUE:
            example = {"rotate": "rotate:10", "crop": "crop:0.8", "noise": "noise:0.02"}.get(name, f"{name}:0.1")
            raise ValueError(f'contains "{item}", which needs a value, e.g. "{example}"')
        if name == "rotate":
            kw["rotate"] = _value(item, "the angle", text, 0, 180, True)
        elif name == "crop":
            kw["crop"] = _value(item, "the smallest area fraction", text, 0, 1, False)
        elif name == "shift":
            kw["shift"] = _value(item, "the shift", text, 0, 0.5, True) if sep else DEFAULT_SHIFT
        elif name == "noise":
            kw["noise"] = _value(item, "the noise standard deviation", text, 0, 1, True)
        else:
            v = _value(item, "the factor range", text, 0, 1, False)
            for key in (("brightness", "contrast") if name == "intensity" else (name,)):
                kw[key] = v
    return AugmentSpec(**kw)  # type: ignore[arg-type]


def validate_items(instance, attribute, value) -> None:
    """attrs validator for ``TrainConfig.augment``."""
    parse(value)


def draw(spec: AugmentSpec, n: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Random parameters for ``n`` positions (one epoch), from the CPU generator ``gen``, in a fixed order."""
    out: dict[str, torch.Tensor] = {}
    if spec.hflip:
        out["hflip"] = torch.rand(n, generator=gen) < 0.5
    if spec.vflip:
        out["vflip"] = torch.rand(n, generator=gen) < 0.5
    if spec.rotate > 0:
        out["angle"] = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(spec.rotate)
    if spec.crop < 1:
        area = spec.crop + (1 - spec.crop) * torch.rand(n, generator=gen)
        log_r = (torch.rand(n, generator=gen) * 2 - 1) * math.log(4 / 3)
        ratio = torch.exp(log_r)
        half_w = torch.sqrt(area * ratio).clamp(max=1.0)  # half-extent in normalised coordinates [-1, 1]
        half_h = torch.sqrt(area / ratio).clamp(max=1.0)
        centre = (torch.rand(n, 2, generator=gen) * 2 - 1) * (1 - torch.stack([half_w, half_h], 1))
        out["crop"] = torch.cat([torch.stack([half_w, half_h], 1), centre], 1)  # (n, 4)
    if spec.shift > 0:
        out["shift"] = (torch.rand(n, 2, generator=gen) * 2 - 1) * (2 * spec.shift)
    if spec.brightness > 0:
        out["brightness"] = 1 + (torch.rand(n, generator=gen) * 2 - 1) * spec.brightness
    if spec.contrast > 0:
        out["contrast"] = 1 + (torch.rand(n, generator=gen) * 2 - 1) * spec.contrast
    if spec.noise > 0:
        out["noise_seed"] = torch.randint(0, 2**62, (n,), generator=gen)
    return out


def to_device(params: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The epoch's parameters on the device (the noise seeds stay on the host: they seed a generator)."""
    return {k: (v if k == "noise_seed" else v.to(device)) for k, v in params.items()}


def _theta(p: dict[str, torch.Tensor], rows: slice, n: int, device: torch.device) -> torch.Tensor:
    """Per-image affine maps from output to input normalised coordinates, ``(n, 2, 3)``.

    The forward order is flip, rotation, crop, shift; this is its inverse, built from the shift back.
    """
    a = torch.eye(2, device=device).expand(n, 2, 2)
    t = -p["shift"][rows] if "shift" in p else torch.zeros(n, 2, device=device)
    if "crop" in p:  # the output spans the crop window: q -> centre + half * q
        c = p["crop"][rows]
        a = torch.diag_embed(c[:, :2])
        t = c[:, 2:] + c[:, :2] * t
    if "angle" in p:  # rotation about the image centre, counter-clockwise on screen (as TF.rotate)
        ang = p["angle"][rows]
        cos, sin = torch.cos(ang), torch.sin(ang)
        r = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)
        a = r @ a
        t = (r @ t.unsqueeze(-1)).squeeze(-1)
    if "hflip" in p or "vflip" in p:
        sx = 1 - 2 * p["hflip"][rows].float() if "hflip" in p else torch.ones(n, device=device)
        sy = 1 - 2 * p["vflip"][rows].float() if "vflip" in p else torch.ones(n, device=device)
        f = torch.stack([sx, sy], 1)
        a = f.unsqueeze(-1) * a
        t = f * t
    return torch.cat([a, t.unsqueeze(-1)], 2)


def apply(x: torch.Tensor, spec: AugmentSpec, params: dict[str, torch.Tensor], rows: slice,
          noise_rows: tuple[slice, slice] | None = None) -> torch.Tensor:
    """Augment the float batch ``x`` (pixel units 0..255) with the parameters of epoch positions ``rows``.

    ``noise_rows``: (the global batch's positions, this rank's rows within it) when the batch is one rank's
    share of a global batch, so the noise equals what one process would add; default: ``x`` is the batch.
    """
    n, dev = x.shape[0], x.device
    if spec.geometric:
        theta = _theta(params, rows, n, dev)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    else:
        if "hflip" in params:
            x = torch.where(params["hflip"][rows].view(-1, 1, 1, 1), x.flip(-1), x)
        if "vflip" in params:
            x = torch.where(params["vflip"][rows].view(-1, 1, 1, 1), x.flip(-2), x)
    if "brightness" in params:
        x = (x * params["brightness"][rows].view(-1, 1, 1, 1)).clamp_(0, 255)
    if "contrast" in params:
        grey = x if x.shape[1] == 1 else (x * x.new_tensor(_LUMA).view(1, 3, 1, 1)).sum(1, keepdim=True)
        mean = grey.mean(dim=(1, 2, 3), keepdim=True)
        f = params["contrast"][rows].view(-1, 1, 1, 1)
        x = (x * f + mean * (1 - f)).clamp_(0, 255)
    if "noise_seed" in params:
        x = x + _noise(x, spec, params["noise_seed"], rows, noise_rows)
        x = x.clamp_(0, 255)
    return x


def _noise(x: torch.Tensor, spec: AugmentSpec, seeds: torch.Tensor, rows: slice,
           noise_rows: tuple[slice, slice] | None) -> torch.Tensor:
    """Gaussian noise from a device generator seeded by the first position of the global batch (host ints)."""
    glob, mine = noise_rows if noise_rows is not None else (rows, slice(None))
    positions = range(*glob.indices(len(seeds)))
    gen = torch.Generator(device=x.device)
    gen.manual_seed(int(seeds[positions[0]]))
    full = torch.randn((len(positions), *x.shape[1:]), generator=gen, device=x.device)
    return full[mine].mul_(spec.noise * 255.0)
