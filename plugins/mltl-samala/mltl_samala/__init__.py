"""The Samala et al. (2019, IEEE TMI 38(3)) baseline: torchvision's AlexNet with named layer groups.

Groups: ``C1``..``C5`` (each convolution with its ReLU, and the max-pooling after C1, C2 and C5), then
``F1`` and ``F2`` (AlexNet's fc6 and fc7 with their dropout and ReLU). AlexNet's fc8 is the stage's
``classifier`` (new for each stage's classes). ImageNet weights load from a local torchvision checkpoint
file (``weights = "alexnet-owt-7be5be79.pth"``, or a ``.safetensors`` file): nothing is downloaded.
With ``in_chans = 1`` the first convolution's RGB filters are summed, so grey CT or mammography inputs
keep the pretrained filters' response.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from mltl import Trunk, UserError, hookimpl

# torchvision AlexNet parameter prefix -> ours
TORCHVISION_KEYS = {
    "features.0.": "C1.0.", "features.3.": "C2.0.", "features.6.": "C3.0.", "features.8.": "C4.0.",
    "features.10.": "C5.0.", "classifier.1.": "F1.2.", "classifier.4.": "F2.1.",
}


def build_alexnet(in_chans: int, dropout: float) -> nn.Sequential:
    relu = lambda: nn.ReLU(inplace=True)  # noqa: E731
    return nn.Sequential(OrderedDict(
        C1=nn.Sequential(nn.Conv2d(in_chans, 64, 11, stride=4, padding=2), relu(), nn.MaxPool2d(3, 2)),
        C2=nn.Sequential(nn.Conv2d(64, 192, 5, padding=2), relu(), nn.MaxPool2d(3, 2)),
        C3=nn.Sequential(nn.Conv2d(192, 384, 3, padding=1), relu()),
        C4=nn.Sequential(nn.Conv2d(384, 256, 3, padding=1), relu()),
        C5=nn.Sequential(nn.Conv2d(256, 256, 3, padding=1), relu(), nn.MaxPool2d(3, 2)),
        pool=nn.AdaptiveAvgPool2d((6, 6)),
        F1=nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(256 * 6 * 6, 4096), relu()),
        F2=nn.Sequential(nn.Dropout(dropout), nn.Linear(4096, 4096), relu()),
    ))


def load_torchvision_weights(module: nn.Sequential, path: str, in_chans: int) -> None:
    """Load a torchvision AlexNet state dict (``.pth`` via ``torch.load(weights_only=True)``, or safetensors)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f'alexnet: weights file "{path}" not found; download torchvision\'s '
                        f"alexnet-owt-7be5be79.pth once and point backbone.weights at it")
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(file))
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"alexnet: cannot load weights from {file}: {exc}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    mapped = {}
    for key, value in state.items():
        for old, new in TORCHVISION_KEYS.items():
            if key.startswith(old):
                mapped[new + key[len(old):]] = value
    expected = {k for k in module.state_dict()}
    if set(mapped) != expected:
        raise UserError(f"alexnet: {file} is not a torchvision AlexNet checkpoint "
                        f"(missing {sorted(expected - set(mapped))[:3]})")
    w = mapped["C1.0.weight"]
    if w.shape[1] != in_chans:
        if in_chans == 1:
            mapped["C1.0.weight"] = w.sum(1, keepdim=True)
        else:
            raise UserError(f"alexnet: the checkpoint has {w.shape[1]} input channels, the chain {in_chans}")
    module.load_state_dict(mapped)


def alexnet(*, in_chans: int, image_size: int, weights: str | None = None, dropout: float = 0.5) -> Trunk:
    """torchvision AlexNet (Samala et al. 2019 baseline); options: weights (local file), dropout."""
    if image_size < 63:
        raise UserError(f"alexnet: input size {image_size} px is too small; use [input] size >= 63")
    module = build_alexnet(in_chans, dropout)
    if weights:
        load_torchvision_weights(module, weights, in_chans)
    groups = {name: (name,) for name in ("C1", "C2", "C3", "C4", "C5")}
    groups["F1"] = ("F1",)
    groups["F2"] = ("F2",)
    return Trunk(module=module, feature_dim=4096, groups=groups)


@hookimpl
def register_backbones(register):
    register("alexnet", alexnet)
