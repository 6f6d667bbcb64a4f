"""The paper's generalized-feature-extraction networks (Aswiga et al. 2021, Table 1).

``gfe-1`` (Structure-I): conv 3x3 -> 16, pool 2, conv 3x3 -> 64, pool 2, dense 512.
``gfe-2`` (Structure-II): conv 11x11 -> 32, pool 2, conv 5x5 -> 64, pool 2, conv 3x3 -> 128, conv 3x3 -> 192,
conv 3x3 -> 256, pool 2, dense 384, dense 512.

All convolutions have stride 1 and no padding, every conv and dense layer is followed by ReLU, and the
pooling is 2x2 max pooling with stride 2: the table's feature-map sizes (148, 74, 72, 36 for Structure-I;
140, 70, 66, 33, 31, 29, 27, 13 for Structure-II at 150x150) only work out with 2x2 pooling, although
the text mentions 5x5. The flatten size is computed from the input size, so other resolutions work
(Structure-II at 150x150: 13 x 13 x 256 = 43,264; the table's 43,294 is a typo).

Layer groups for freezing: ``C1``.. (each conv with its ReLU and the pooling after it) and ``F1``..
(each dense layer with its ReLU). The classifier and any new dense layers (the MedCNN head) are added by
mltl from the stage's ``head`` table.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from mltl import Trunk, UserError, hookimpl

STRUCTURES = {
    # (out channels, kernel, pool after) per conv layer; widths of the dense layers
    "gfe-1": ([(16, 3, True), (64, 3, True)], [512]),
    "gfe-2": ([(32, 11, True), (64, 5, True), (128, 3, False), (192, 3, False), (256, 3, True)], [384, 512]),
}


def _build(name: str, in_chans: int, image_size: int, batch_norm: bool, dropout: float) -> Trunk:
    convs, dense = STRUCTURES[name]
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    channels, side = in_chans, image_size
    for i, (out, kernel, pool) in enumerate(convs, start=1):
        side = side - kernel + 1
        block: list[nn.Module] = [nn.Conv2d(channels, out, kernel)]
        if batch_norm:
            block.append(nn.BatchNorm2d(out))
        block.append(nn.ReLU(inplace=True))
        if pool:
            block.append(nn.MaxPool2d(2))
            side //= 2
        if side < 1:
            raise UserError(f"{name}: input size {image_size} px is too small for layer C{i}; "
                            f"use [input] size >= {_min_size(name)}")
        layers[f"C{i}"] = nn.Sequential(*block)
        channels = out
    width = channels * side * side
    for j, out in enumerate(dense, start=1):
        block = [nn.Flatten()] if j == 1 else []
        block += [nn.Linear(width, out), nn.ReLU(inplace=True)]
        if dropout > 0:
            block.append(nn.Dropout(dropout))
        layers[f"F{j}"] = nn.Sequential(*block)
        width = out
    module = nn.Sequential(layers)
    return Trunk(module=module, feature_dim=width, groups={k: (k,) for k in layers})


def _min_size(name: str) -> int:
    for size in range(8, 512):
        side = size
        for out, kernel, pool in STRUCTURES[name][0]:
            side = side - kernel + 1
            if pool:
                side //= 2
            if side < 1:
                break
        else:
            return size
    return 512


def _factory(name: str):
    def factory(*, in_chans: int, image_size: int, batch_norm: bool = False, dropout: float = 0.0) -> Trunk:
        if not 0 <= dropout < 1:
            raise UserError(f"{name}: dropout must be at least 0 and below 1, got {dropout}")
        return _build(name, in_chans, image_size, batch_norm, dropout)

    factory.__doc__ = f"GFE Structure-{'I' if name == 'gfe-1' else 'II'} (Aswiga et al. 2021); options: batch_norm, dropout."
    return factory


gfe_1 = _factory("gfe-1")
gfe_2 = _factory("gfe-2")


@hookimpl
def register_backbones(register):
    register("gfe-1", gfe_1)
    register("gfe-2", gfe_2)
