"""Backbones and the networks built from them.

A backbone plugin returns a :class:`Trunk`: a feature extractor whose layers are named in groups
(``C1``..``C5`` for convolutions, ``F1``.. for dense layers, in input-to-output order). mltl wraps it in a
:class:`Network` with a head: optional new dense layers ``N1``, ``N2``.. (ReLU and dropout) and a final
linear layer, the group ``classifier``. Freeze policies and layer-wise settings address these group names.

A network is described by a plain, JSON-serialisable *spec* (backbone name and options, input, head,
classes), stored next to its weights, so a later stage or ``mltl predict`` rebuilds it without
unpickling anything.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any

import attrs
import torch
from torch import nn

from ..errors import ConfigError

CLASSIFIER = "classifier"


@attrs.frozen
class Preprocessing:
    """How a backbone's weights expect their input: what a pretrained model was trained on.

    ``mean`` and ``std`` are per channel, on pixels scaled to [0, 1] (ImageNet: (0.485, 0.456, 0.406) and
    (0.229, 0.224, 0.225)). A chain uses them unless its ``[input] mean`` / ``std`` say otherwise
    (:func:`mltl.running.preflight.resolve_input`); ``input_size``, ``channels`` and ``interpolation`` are
    recorded, and a chain that feeds another size or channel count says so in its run record.
    ``source`` says where the numbers come from (e.g. "timm pretrained_cfg of resnet18.a1_in1k").
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_size: int | None = None
    channels: int = 3
    interpolation: str = "bilinear"
    source: str = ""

    def __attrs_post_init__(self) -> None:
        if len(self.mean) != len(self.std) or len(self.mean) not in (1, 3) or any(s <= 0 for s in self.std):
            raise ValueError(f"preprocessing mean {self.mean} and std {self.std}: one or three values each, std > 0")


@attrs.frozen(eq=False)
class Trunk:
    """What a backbone plugin builds: a module mapping images ``(B, C, H, W)`` to features ``(B, feature_dim)``.

    ``groups`` maps each layer-group name to the dotted paths of its submodules inside ``module``, in
    input-to-output order (a dict keeps its insertion order). ``loose`` assigns parameters that a module
    holds itself rather than through a submodule (a ViT's ``cls_token`` and ``pos_embed``) to a group, by
    dotted parameter name, so that freezing the group freezes them too. ``preprocessing`` is the input the
    weights expect (a pretrained model's mean and std), or None for a network trained from scratch.
    """

    module: nn.Module
    feature_dim: int
    groups: dict[str, tuple[str, ...]]
    preprocessing: Preprocessing | None = None
    loose: dict[str, tuple[str, ...]] = attrs.field(factory=dict)

    def __attrs_post_init__(self) -> None:
        names = dict(self.module.named_modules())
        for group, paths in self.groups.items():
            for path in paths:
                if path not in names:
                    raise ValueError(f"backbone group {group!r} names {path!r}, which is not a submodule")
            if group == CLASSIFIER or group.startswith("N") and group[1:].isdigit():
                raise ValueError(f"backbone group name {group!r} is reserved for the head")
        params = dict(self.module.named_parameters())
        for group, names_ in self.loose.items():
            if group not in self.groups:
                raise ValueError(f"loose parameters name group {group!r}, which is not one of the backbone's groups")
            for name in names_:
                if name not in params:
                    raise ValueError(f"backbone group {group!r}: loose parameter {name!r} is not a parameter")


def _widths(instance, attribute, value) -> None:
    if any(w <= 0 for w in value):
        raise ValueError("layer widths must be greater than 0")


def _dropout(instance, attribute, value) -> None:
    if not 0 <= value < 1:
        raise ValueError("must be at least 0 and below 1")


@attrs.frozen
class HeadSpec:
    """New dense layers (widths, each followed by ReLU and dropout), then a linear classifier."""

    dense: tuple[int, ...] = attrs.field(default=(), validator=_widths,
                                         metadata={"doc": "Widths of the new dense layers N1, N2, ..."})
    dropout: float = attrs.field(default=0.0, validator=_dropout,
                                 metadata={"doc": "Dropout after each new dense layer."})


def build_head(in_dim: int, num_classes: int, spec: HeadSpec) -> nn.Sequential:
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    width = in_dim
    for i, out in enumerate(spec.dense, start=1):
        block = [nn.Linear(width, out), nn.ReLU(inplace=True)]
        if spec.dropout > 0:
            block.append(nn.Dropout(spec.dropout))
        layers[f"N{i}"] = nn.Sequential(*block)
        width = out
    layers[CLASSIFIER] = nn.Linear(width, num_classes)
    return nn.Sequential(layers)


class Network(nn.Module):
    """A trunk and a head, with named layer groups and frozen-group bookkeeping.

    ``frozen`` groups have ``requires_grad=False`` and their BatchNorm layers stay in eval mode (running
    statistics untouched), also after every ``train()`` call.
    """

    def __init__(self, trunk: Trunk, head: nn.Sequential, spec: dict[str, Any]) -> None:
        super().__init__()
        self.trunk = trunk.module
        self.head = head
        self.spec = spec
        self.feature_dim = trunk.feature_dim
        groups: OrderedDict[str, tuple[str, ...]] = OrderedDict()
        for name, paths in trunk.groups.items():
            groups[name] = tuple(f"trunk.{p}" for p in paths)
        for name, _ in head.named_children():
            groups[name] = (f"head.{name}",)
        self.groups = groups
        self.loose = {g: tuple(f"trunk.{n}" for n in names) for g, names in trunk.loose.items()}
        self.preprocessing = trunk.preprocessing
        self.trunk_groups = tuple(trunk.groups)
        self.frozen: frozenset[str] = frozenset()
        self.inherited: frozenset[str] = frozenset()  # groups whose weights came from an earlier stage

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.spec["classes"])

    def group_names(self) -> list[str]:
        return list(self.groups)

    def group_modules(self, group: str) -> list[nn.Module]:
        return [self.get_submodule(p) for p in self.groups[group]]

    def group_parameters(self, group: str) -> list[nn.Parameter]:
        seen: dict[int, nn.Parameter] = {}
        for module in self.group_modules(group):
            for p in module.parameters():
                seen.setdefault(id(p), p)
        for name in self.loose.get(group, ()):
            p = self.get_parameter(name)
            seen.setdefault(id(p), p)
        return list(seen.values())

    def set_frozen(self, groups: frozenset[str]) -> None:
        unknown = set(groups) - set(self.groups)
        if unknown:
            raise ValueError(f"unknown layer groups {sorted(unknown)}")
        self.frozen = frozenset(groups)
        for p in self.parameters():
            p.requires_grad_(True)
        for group in self.frozen:
            for p in self.group_parameters(group):
                p.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> Network:
        super().train(mode)
        for group in self.frozen:
            for module in self.group_modules(group):
                for m in module.modules():
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        m.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


def make_spec(backbone: str, options: dict[str, Any], in_chans: int, image_size: int, head: HeadSpec,
              classes: tuple[str, ...]) -> dict[str, Any]:
    return {
        "backbone": backbone,
        "options": dict(options),
        "in_chans": in_chans,
        "image_size": image_size,
        "head": {"dense": list(head.dense), "dropout": head.dropout},
        "classes": list(classes),
    }


def build_network(spec: dict[str, Any], registry, *, key: str = "", source: str = "") -> Network:
    """Build a freshly initialised network from its spec (backbone from the registry)."""
    trunk = registry.create(
        "backbone", spec["backbone"], spec["options"], key=key, source=source,
        extra={"in_chans": spec["in_chans"], "image_size": spec["image_size"]},
    )
    if not isinstance(trunk, Trunk):
        raise TypeError(f"backbone {spec['backbone']!r} returned {type(trunk).__name__}, not mltl.Trunk")
    head = HeadSpec(dense=tuple(spec["head"]["dense"]), dropout=float(spec["head"]["dropout"]))
    return Network(trunk, build_head(trunk.feature_dim, len(spec["classes"]), head), spec)


def derive(parent: Network, registry, *, classes: tuple[str, ...], head: HeadSpec | None,
           in_chans: int, image_size: int, key: str = "", source: str = "") -> tuple[Network, str]:
    """A network for the next stage that starts from ``parent``'s weights.

    The trunk is always inherited. The head: a new ``head`` spec replaces it whole (new ``N`` layers and
    classifier); otherwise the ``N`` layers are kept and the classifier is kept only when the class names
    are the same, in the same order. Returns the network and a sentence saying what was inherited.
    """
    if (in_chans, image_size) != (parent.spec["in_chans"], parent.spec["image_size"]):
        raise ConfigError(
            f"the input ({in_chans} channels, {image_size} px) differs from the earlier stage's "
            f"({parent.spec['in_chans']} channels, {parent.spec['image_size']} px); weights cannot be handed "
            f"down: use the same [input] for the whole chain", key=key, source=source,
        )
    spec = copy.deepcopy(parent.spec)
    spec["classes"] = list(classes)
    if head is not None:
        spec["head"] = {"dense": list(head.dense), "dropout": head.dropout}
    child = build_network(spec, registry, key=key, source=source)
    state = parent.state_dict()
    keep = {g for g in parent.groups if g in parent.trunk_groups}
    if head is None:
        keep |= {g for g in parent.groups if g.startswith("N")}
        if tuple(parent.spec["classes"]) == tuple(classes):
            keep.add(CLASSIFIER)
    prefixes = tuple(p + "." for g in keep for p in parent.groups[g])
    # trunk buffers and parameters outside any group (e.g. a final norm) are inherited with the trunk
    inherited = {k: v for k, v in state.items() if k.startswith(prefixes) or k.startswith("trunk.")}
    missing, unexpected = child.load_state_dict(inherited, strict=False)
    assert not unexpected, unexpected
    child.inherited = frozenset(keep)
    if head is not None:
        what = "trunk inherited; new head " + (f"N1-N{len(head.dense)} + classifier" if head.dense else "classifier")
    elif CLASSIFIER in keep:
        what = "whole network inherited (same classes)"
    else:
        what = "trunk and head layers inherited; new classifier for the new classes"
    return child, what

