"""torchvision's classification models as mltl backbones: ``backbone = { name = "torchvision", model = "resnet18" }``.

Any model of ``torchvision.models.list_models(module=torchvision.models)`` (resnet, resnext, wide_resnet,
densenet, efficientnet and efficientnet_v2, mobilenet_v2/v3, convnext, regnet, swin, vit, shufflenet,
mnasnet, vgg, ...), built with ``torchvision.models.get_model``. The last linear layer (the ImageNet
classifier) is replaced by the identity, so the features it read go to mltl's head; a model without one
(squeezenet) is refused.

**Weights.** ``pretrained = true`` loads the model's ``DEFAULT`` weights enum; ``weights = "IMAGENET1K_V2"``
(or ``"ResNet50_Weights.IMAGENET1K_V2"``) another member of it. The file comes from the torch hub cache,
``torch.hub.get_dir()/checkpoints/<the enum URL's file name>`` (``TORCH_HOME/hub/checkpoints``), where
torchvision itself keeps it; when it is missing it is downloaded there (hash checked), unless
``MLTL_OFFLINE`` is set or ``allow_download = false``: then a one-line error names the path to copy it to
(:mod:`mltl_timm.fetch`). ``weights = "PATH"`` loads a local file (``.pth`` with ``weights_only=True``, or
``.safetensors``); it must hold every tensor of the model (the classifier may be absent).

**Input.** For ``[input] channels = 1`` the first convolution's RGB filters are summed (as timm does). A ViT
is built with ``image_size`` = the chain's ``[input] size`` and its position embedding interpolated
(``torchvision.models.vision_transformer.interpolate_embeddings``).

**Preprocessing.** With weights, the trunk carries the enum's ``transforms()``: mean, std and crop size (and
its resize size, in the source text); for a ``PATH`` the enum member whose file name matches, else
``DEFAULT``. googlenet and inception_v3 are built with ``transform_input = False``: their weights expect
``(x - 0.5) / 0.5``, which is their preprocessing here.

**Layer groups.** resnet family: ``C1`` = conv1 + bn1, ``C2``..``C5`` = layer1..layer4. densenet: ``C1`` =
conv0 + norm0, ``C2``..``C5`` = each dense block with the transition after it (the last with norm5).
convnext and swin: ``C1`` = stem, ``C2``..``C5`` = the four stages (each with the downsampling before it),
``C6`` = the final norm. efficientnet, mobilenet, mnasnet, vgg, alexnet: ``C1`` = ``features.0`` (the
stem), then one group per run of blocks with the same output channels (efficientnet: one per stage),
then the head's layers that remain (mobilenet_v3's 1024-wide linear layer, vgg's fc6/fc7). regnet: ``C1`` =
stem, ``C2``.. = trunk_output's blocks. vit: ``C1`` = conv_proj with ``class_token`` and the position
embedding, ``C2``.. = the encoder layers, last = the final norm. Other models: one group per top-level
child with parameters, in order.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mltl import Preprocessing, Trunk, UserError, did_you_mean

from .fetch import read_state_dict, torch_hub_file

_DENSENET_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")
_AUX = ("aux1.", "aux2.", "AuxLogits.")  # googlenet's and inception_v3's auxiliary classifiers, not built here
_TF_INPUT = ("googlenet", "inception_v3")  # their weights expect (x - 0.5) / 0.5 (transform_input folded in)


def _models():
    from torchvision import models

    return models


def _weights_enum(models, model: str, weights: str | None, pretrained: bool, what: str):
    """(the enum member whose file to load or None, the member describing the preprocessing or None, a path)."""
    try:
        enum = models.get_model_weights(model)
    except (ValueError, KeyError):
        enum = None
    members = {m.name: m for m in enum} if enum is not None else {}
    if weights:
        name = weights.split(".", 1)[1] if enum is not None and weights.startswith(enum.__name__ + ".") else weights
        if name in members or name == "DEFAULT" and enum is not None:
            member = enum.DEFAULT if name == "DEFAULT" else members[name]
            return member, member, None
        path = Path(weights).expanduser()
        if not path.is_file() and "/" not in weights and "\\" not in weights and not path.suffix:
            raise UserError(f'{what}: weights "{weights}" is neither a file nor one of {model}\'s weights '
                            f"({', '.join(members) or 'none'}){did_you_mean(name, list(members))}")
        by_file = next((m for m in members.values() if Path(m.url).name == path.name), None)
        return None, by_file or (enum.DEFAULT if enum is not None else None), path
    if pretrained:
        if enum is None:
            raise UserError(f"{what}: torchvision has no pretrained weights for {model}; set pretrained = false or "
                            f"backbone.weights to a local file")
        return enum.DEFAULT, enum.DEFAULT, None
    return None, None, None


def _preprocessing(member, model: str) -> Preprocessing | None:
    if member is None:
        return None
    t = member.transforms()
    crop = next(iter(getattr(t, "crop_size", None) or [None]))
    resize = next(iter(getattr(t, "resize_size", None) or [None]))
    interp = getattr(getattr(t, "interpolation", None), "value", "bilinear")
    source = f"torchvision {type(member).__name__}.{member.name} transforms (resize {resize}, crop {crop})"
    mean, std = tuple(float(v) for v in t.mean), tuple(float(v) for v in t.std)
    if model in _TF_INPUT:
        mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
        source += ", with its transform_input: (x - 0.5) / 0.5"
    return Preprocessing(mean=mean, std=std, input_size=crop, channels=3, interpolation=str(interp), source=source)


def _last_linear(net: nn.Module) -> str | None:
    found = None
    for path, m in net.named_modules():
        if isinstance(m, nn.Linear):
            found = path
    return found


def _sum_first_conv(net: nn.Module) -> None:
    """One input channel: the first 3-channel convolution with its RGB filters summed."""
    for path, m in net.named_modules():
        if isinstance(m, nn.Conv2d) and m.in_channels == 3:
            conv = nn.Conv2d(1, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups,
                             m.bias is not None, m.padding_mode)
            with torch.no_grad():
                conv.weight.copy_(m.weight.sum(1, keepdim=True))
                if m.bias is not None:
                    conv.bias.copy_(m.bias)
            net.set_submodule(path, conv)
            return
    raise UserError("torchvision: the model has no 3-channel first convolution to adapt to [input] channels = 1")


def _load(net: nn.Module, state: dict[str, torch.Tensor], head: str, file: Path, model: str, image_size: int,
          what: str) -> None:
    state = {(_DENSENET_KEY.sub(r"\1\2", k)): v for k, v in state.items() if not k.startswith(_AUX)}
    if "encoder.pos_embedding" in state and hasattr(net, "patch_size"):  # a ViT at another size
        pos = net.encoder.pos_embedding
        if state["encoder.pos_embedding"].shape != pos.shape:
            from torchvision.models.vision_transformer import interpolate_embeddings

            state = dict(interpolate_embeddings(image_size, net.patch_size, state))
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shapes that differ
        text = str(exc).strip().splitlines()
        detail = next((line.strip() for line in text[1:] if line.strip()), text[0] if text else "")
        raise UserError(f"{what}: cannot load weights from {file}: {detail} (is it a checkpoint of {model}?)") from None
    # the classifier is replaced anyway; old checkpoints (densenet's) predate BatchNorm's num_batches_tracked
    missing = [k for k in missing if not k.startswith(head + ".") and not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        part = (f"it lacks {len(missing)} of the model's tensors ({', '.join(missing[:3])}, ...)" if missing else
                f"it has {len(unexpected)} tensors the model lacks ({', '.join(unexpected[:3])}, ...)")
        raise UserError(f"{what}: cannot load weights from {file}: {part}; is it a checkpoint of {model}?")


def _covering(net: nn.Module, names: set[str]) -> tuple[list[str], list[str]]:
    """The smallest submodules holding only parameters of ``names`` (and covering them), and the names that
    only their parent module holds directly."""
    chosen: list[str] = []
    covered: set[str] = set()
    for path, m in net.named_modules():
        if not path or any(path.startswith(c + ".") for c in chosen):
            continue
        params = [f"{path}.{n}" for n, _ in m.named_parameters()]
        if params and all(p in names for p in params):
            chosen.append(path)
            covered.update(params)
    return chosen, [n for n in names if n not in covered]


def _out_channels(m: nn.Module) -> int | None:
    convs = [c for c in m.modules() if isinstance(c, nn.Conv2d)]
    return convs[-1].out_channels if convs else None


def _runs(prefix: str, seq: nn.Module) -> list[list[str]]:
    """A features Sequential as groups: its first child (the stem) alone, then runs of children with the same
    output channels; children without a convolution (a BatchNorm, an activation) join the group before them."""
    groups: list[list[str]] = []
    last = None
    for i, (name, child) in enumerate(seq.named_children()):
        out = _out_channels(child)
        if i == 0 or len(groups) == 1 and out is not None or out is not None and out != last:
            groups.append([])
        groups[-1].append(f"{prefix}.{name}")
        last = out if out is not None else last
    return groups


def layer_groups(net: nn.Module, models) -> tuple[dict[str, tuple[str, ...]], dict[str, tuple[str, ...]]]:
    """mltl groups ``C1``.. of a torchvision model (its classifier already removed), and its loose parameters."""
    children = dict(net.named_children())
    loose_first: list[str] = []
    if all(k in children for k in ("conv1", "bn1", "layer1", "layer4")):
        groups = [["conv1", "bn1"]] + [[f"layer{i}"] for i in range(1, 5) if f"layer{i}" in children]
    elif isinstance(net, models.DenseNet):
        feats = [n for n, _ in net.features.named_children()]
        groups = [["features.conv0", "features.norm0"]]
        for n in feats:
            if n.startswith("denseblock"):
                groups.append([f"features.{n}"])
            elif n.startswith("transition") or n == "norm5":
                groups[-1].append(f"features.{n}")
    elif isinstance(net, (models.ConvNeXt, models.SwinTransformer)):
        feats = [f"features.{n}" for n, _ in net.features.named_children()]
        groups = [feats[:1], feats[1:2]] + [feats[i:i + 2] for i in range(2, len(feats), 2)]
    elif isinstance(net, models.RegNet):
        groups = [["stem"]] + [[f"trunk_output.{n}"] for n, _ in net.trunk_output.named_children()]
    elif isinstance(net, models.VisionTransformer):
        groups = [["conv_proj"]] + [[f"encoder.layers.{n}"] for n, _ in net.encoder.layers.named_children()]
        groups.append(["encoder.ln"])
        loose_first = ["class_token", "encoder.pos_embedding"]
    elif isinstance(children.get("features"), nn.Sequential):
        groups = _runs("features", children["features"])
    elif isinstance(children.get("layers"), nn.Sequential):  # mnasnet
        groups = _runs("layers", children["layers"])
    else:
        groups = [[n] for n, c in children.items() if any(True for _ in c.parameters())]
    paths = [p for g in groups for p in g]
    held = {f"{p}.{n}" for p in paths for n, _ in net.get_submodule(p).named_parameters()} | set(loose_first)
    rest = {n for n, _ in net.named_parameters()} - held
    named = {f"C{i}": tuple(g) for i, g in enumerate(groups, start=1)}
    loose: dict[str, tuple[str, ...]] = {"C1": tuple(loose_first)} if loose_first else {}
    if rest:  # what the family's rule leaves (a head's norm or hidden layer): one last group
        extra, direct = _covering(net, rest)
        last = f"C{len(named) + 1}"
        named[last] = tuple(extra)
        if direct:
            loose[last] = tuple(direct)
    return named, loose


def torchvision_backbone(*, model: str, in_chans: int, image_size: int, pretrained: bool = False,
                         weights: str | None = None, allow_download: bool = True) -> Trunk:
    """A torchvision classification model (model = "resnet18"); options: pretrained (the DEFAULT weights),
    weights (a weights enum member such as "IMAGENET1K_V2", or a local file), allow_download."""
    models = _models()
    what = f"torchvision {model}"
    names = models.list_models(module=models)
    if model not in names:
        raise UserError(f'torchvision: unknown model "{model}"{did_you_mean(model, names)} (the classification '
                        f"models of torchvision.models.list_models(module=torchvision.models))")
    if in_chans not in (1, 3):
        raise UserError(f"{what}: in_chans must be 1 or 3, got {in_chans}")
    member, described, path = _weights_enum(models, model, weights, pretrained, what)
    kwargs: dict[str, Any] = {}
    if model in _TF_INPUT:
        kwargs.update(aux_logits=False, transform_input=False, init_weights=False)
    if model.startswith("vit_"):
        kwargs["image_size"] = image_size
    try:
        net = models.get_model(model, weights=None, **kwargs)
    except (TypeError, ValueError) as exc:
        raise UserError(f"{what}: cannot build the model: {exc}") from None
    head = _last_linear(net)
    if head is None:
        raise UserError(f"{what}: the model has no final linear layer to replace by mltl's head (its classifier is "
                        f"a convolution); choose another model")
    # on the "meta" device (mltl counting parameters; a saved network rebuilt only to receive its own weights)
    # nothing can be loaded: the weights are neither fetched nor read
    on_meta = torch.empty(0).device.type == "meta"
    file = None
    if member is not None:
        file = Path(member.url) if on_meta else torch_hub_file(member.url, what=what, allow_download=allow_download)
    elif path is not None:
        file = path
    if file is not None and not on_meta:
        _load(net, read_state_dict(file, what), head, file, model, image_size, what)
    feature_dim = int(net.get_submodule(head).in_features)
    net.set_submodule(head, nn.Identity())
    if in_chans == 1:
        _sum_first_conv(net)
    groups, loose = layer_groups(net, models)
    with torch.no_grad():  # a too-small input, found now rather than mid-training
        was = net.training
        net.eval()
        try:
            out = net(torch.zeros(1, in_chans, image_size, image_size))
        except (RuntimeError, AssertionError, ValueError) as exc:
            text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise UserError(f"{what}: input size {image_size} px does not fit the model ({text}); "
                            f"change [input] size") from None
        finally:
            net.train(was)
    if tuple(out.shape) != (1, feature_dim):
        raise UserError(f"{what}: expected features (1, {feature_dim}), got {tuple(out.shape)}")
    pre = _preprocessing(described, model) if file is not None else None
    return Trunk(module=net, feature_dim=feature_dim, groups=groups, loose=loose, preprocessing=pre)
