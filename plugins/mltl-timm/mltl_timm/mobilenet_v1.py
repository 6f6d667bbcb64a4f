"""MobileNetV1 with ImageNet-1k weights: ``backbone = { name = "mobilenet-v1", weights = "PATH" }``.

The network is the MobileNetV1 of biubug6's Pytorch_Retinaface (``models/net.py``), whose ImageNet-1k
backbone checkpoint ``mobilenetV1X0.25_pretrain.tar`` (top-1 46.6% as recorded in the file) is the one real
ImageNet-pretrained network small enough to ship beside a test suite. Layout, at ``width = 0.25``:

- ``stage1``: a 3x3 convolution (stride 2, 8 channels), then five depthwise-separable blocks (16, 32, 32, 64,
  64 channels; strides 1, 2, 1, 2, 1), output stride 8;
- ``stage2``: six depthwise-separable blocks (128 channels; the first with stride 2), output stride 16;
- ``stage3``: two depthwise-separable blocks (256 channels; the first with stride 2), output stride 32;
- global average pooling: features ``(B, 256)`` (``(B, 1024 * width)`` in general).

Every convolution is followed by BatchNorm and LeakyReLU with negative slope 0.1, as in Pytorch_Retinaface
(the checkpoint was trained that way: with plain ReLU its ImageNet top-1 drops, see docs/backbones.md).

**Layer groups.** ``C1`` = ``stage1``, ``C2`` = ``stage2``, ``C3`` = ``stage3``: the file's own three stages,
so ``freeze = "C1-C2"`` keeps everything up to output stride 16.

**Weights.** ``weights = "PATH"`` loads the checkpoint (``torch.load(weights_only=True)``; a dict with
``state_dict``, or a bare state dict), strips the ``module.`` prefix of a DataParallel checkpoint, drops the
ImageNet classifier ``fc.*`` and loads the rest strictly: a file with missing, extra or mis-shaped tensors is
a one-line error. For ``in_chans = 1`` the first convolution's RGB filters are summed (as timm does), so a
grey image replicated to RGB and the same grey image as one channel give the same features. With weights,
the trunk carries the ImageNet normalisation (mean 0.485, 0.456, 0.406; std 0.229, 0.224, 0.225; 224 px),
which a chain uses unless its ``[input]`` sets ``mean``/``std``; without weights there is none.

**Options.** ``width`` (default 0.25) scales every layer's channels (1.0 is the original MobileNetV1, 1024
features); only 0.25 has weights here.
"""

from __future__ import annotations

from pathlib import Path

import torch
from mltl import Preprocessing, Trunk, UserError
from torch import nn

NEGATIVE_SLOPE = 0.1  # Pytorch_Retinaface's LeakyReLU; the checkpoint's accuracy depends on it
IMAGENET = Preprocessing(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), input_size=224, channels=3,
                         interpolation="bilinear", source="ImageNet-1k, MobileNetV1 x0.25 (Pytorch_Retinaface)")

# (output channels at width 1.0, stride) of each depthwise-separable block, per stage
_STAGES = (
    ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1)),
    ((512, 2), (512, 1), (512, 1), (512, 1), (512, 1), (512, 1)),
    ((1024, 2), (1024, 1)),
)
_STEM = 32  # the first convolution's channels at width 1.0


def _conv_bn(inp: int, oup: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inp, oup, 3, stride, 1, bias=False), nn.BatchNorm2d(oup),
                         nn.LeakyReLU(NEGATIVE_SLOPE, inplace=True))


def _conv_dw(inp: int, oup: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False), nn.BatchNorm2d(inp),
        nn.LeakyReLU(NEGATIVE_SLOPE, inplace=True),
        nn.Conv2d(inp, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup),
        nn.LeakyReLU(NEGATIVE_SLOPE, inplace=True),
    )


class MobileNetV1(nn.Module):
    """Pytorch_Retinaface's MobileNetV1 without its classifier: images ``(B, C, H, W)`` to ``(B, features)``."""

    def __init__(self, in_chans: int = 3, width: float = 0.25) -> None:
        super().__init__()
        ch = max(1, round(_STEM * width))
        stages = []
        for i, blocks in enumerate(_STAGES):
            layers = [_conv_bn(in_chans, ch, 2)] if i == 0 else []
            for out, stride in blocks:
                out = max(1, round(out * width))
                layers.append(_conv_dw(ch, out, stride))
                ch = out
            stages.append(nn.Sequential(*layers))
        self.stage1, self.stage2, self.stage3 = stages
        self.avg = nn.AdaptiveAvgPool2d(1)
        self.num_features = ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage3(self.stage2(self.stage1(x)))
        return torch.flatten(self.avg(x), 1)


def read_checkpoint(path: str) -> tuple[Path, dict[str, torch.Tensor]]:
    """The state dict in a Pytorch_Retinaface-style checkpoint, ``module.`` stripped (``fc.*`` kept)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f'mobilenet-v1: weights file "{path}" not found (resolved to {file.resolve()}); point '
                        f"backbone.weights at mobilenetV1X0.25_pretrain.tar or another MobileNetV1 checkpoint")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 -- any unreadable file: one line naming it
        raise UserError(f"mobilenet-v1: cannot load weights from {file}: {str(exc).splitlines()[0]} "
                        f"(expected a torch checkpoint of MobileNetV1)") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"mobilenet-v1: weights file {file} holds no state dict of tensors "
                        f"(a {type(state).__name__}); expected a MobileNetV1 checkpoint")
    return file, {str(k).removeprefix("module."): v for k, v in state.items()}


def _few(keys) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


def load_weights(net: MobileNetV1, path: str, in_chans: int) -> None:
    """Loads ``path`` into ``net`` strictly (``fc.*`` dropped); the first convolution adapted to ``in_chans``."""
    file, state = read_checkpoint(path)
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    first = "stage1.0.0.weight"
    if in_chans == 1 and first in state and state[first].ndim == 4 and state[first].shape[1] == 3:
        state[first] = state[first].sum(dim=1, keepdim=True)
    own = net.state_dict()
    missing = own.keys() - state.keys()
    extra = state.keys() - own.keys()
    shaped = {k for k in own.keys() & state.keys() if own[k].shape != state[k].shape}
    problems = []
    if missing:
        problems.append(f"lacks {len(missing)} tensors ({_few(missing)})")
    if extra:
        problems.append(f"has {len(extra)} unexpected tensors ({_few(extra)})")
    if shaped:
        k = min(shaped)
        problems.append(f"has {len(shaped)} tensors of the wrong shape ({k}: {tuple(state[k].shape)}, "
                        f"expected {tuple(own[k].shape)})")
    if problems:
        raise UserError(f"mobilenet-v1: weights file {file} does not fit MobileNetV1 x{net_width(net)}: "
                        f"it {'; it '.join(problems)}; is it a Pytorch_Retinaface MobileNetV1 checkpoint "
                        f"of that width?")
    if any(p.is_meta for p in net.parameters()):  # built on the meta device to count parameters: no copy
        return
    net.load_state_dict(state, strict=True)


def net_width(net: MobileNetV1) -> float:
    return net.num_features / 1024


def mobilenet_v1_backbone(*, in_chans: int, image_size: int, weights: str | None = None,
                          width: float = 0.25) -> Trunk:
    """MobileNetV1 (Pytorch_Retinaface layout, LeakyReLU 0.1); options: weights (local checkpoint), width."""
    if in_chans not in (1, 3):
        raise UserError(f"mobilenet-v1: in_chans must be 1 or 3, got {in_chans}")
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not 0 < width <= 4:
        raise UserError(f"mobilenet-v1: width must be a number above 0 and at most 4 (0.25 for the "
                        f"ImageNet weights), got {width!r}")
    if image_size < 32:
        raise UserError(f"mobilenet-v1: input size {image_size} px is too small (the network downsamples 32 "
                        f"times); set [input] size to at least 32")
    net = MobileNetV1(in_chans=in_chans, width=float(width))
    if weights:
        load_weights(net, weights, in_chans)
    groups = {"C1": ("stage1",), "C2": ("stage2",), "C3": ("stage3",)}
    return Trunk(module=net, feature_dim=net.num_features, groups=groups,
                 preprocessing=IMAGENET if weights else None)
