"""Any timm model as an mltl backbone: ``backbone = { name = "timm", model = "resnet18" }``.

The model is built with ``timm.create_model(model, num_classes=0, in_chans=...)``: timm's own classifier is
removed and the pooled features (``model.num_features`` wide) go to mltl's head (``N1``.., ``classifier``).

**Layer groups.** timm's coarse ``group_matcher`` (the same grouping timm uses for layer-wise learning-rate
decay) splits the model into its stem, its stages and, where present, a final norm; mltl names them ``C1``,
``C2``, .. in input-to-output order, so freeze policies (``"C1-C3"``), ``group_lr`` and gradual unfreezing
address them like any other backbone's. resnet18: ``C1`` = stem (conv1, bn1), ``C2``..``C5`` = layer1..layer4;
convnext: ``C1`` = stem, ``C2``..``C5`` = stages 0..3, ``C6`` = the head's norm; efficientnet_b0: ``C1`` =
stem, ``C2``..``C8`` = blocks 0..6 (the last with conv_head and bn2). ``mltl validate`` prints a freeze
error listing them when a policy names one the model lacks.

**Weights.** ``weights = "PATH"`` loads a local file (``.safetensors``, or a ``.pth``/``.bin`` read with
``weights_only=True``) through timm (``pretrained_cfg_overlay=dict(file=PATH)``), which adapts the first
convolution to ``in_chans`` (for 1 channel, the sum of the RGB filters) and drops the checkpoint's
classifier. ``pretrained = true`` without a file would download from the Hugging Face Hub: mltl refuses
unless ``allow_download = true``, and a download that fails (offline) is a one-line error, not a hang.

**Input.** ``in_chans`` is the chain's ``[input] channels`` (1 or 3).

**Limitation.** Models that keep trainable parameters on the model object itself rather than in a
submodule (ViT-style ``cls_token``, ``pos_embed``) are refused: mltl's layer groups are submodules, and such
a parameter could not be frozen with its group. Convolutional families (resnet, resnext, convnext,
efficientnet, regnet, densenet, mobilenet, ...) work.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from mltl import Trunk, UserError, did_you_mean, hookimpl


def _import_timm():
    try:
        import timm
    except ImportError:  # pragma: no cover - a dependency of this distribution
        raise UserError("timm backbone: timm is not installed; pip install timm") from None
    return timm


def _weights_keys(path: str, model: str) -> tuple[Path, set[str]]:
    """The file and the tensor names in it; a pickle that would run code is refused before timm sees it."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f'timm {model}: weights file "{path}" not found (resolved to {file.resolve()}); '
                        f"point backbone.weights at a local .safetensors or .pth file")
    try:
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as f:
                return file, set(f.keys())
        state = torch.load(file, map_location="cpu", weights_only=True)
        for wrapper in ("state_dict", "model", "state_dict_ema"):  # training checkpoints wrap the weights
            if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
                state = state[wrapper]
                break
        if not isinstance(state, dict):
            raise ValueError(f"holds a {type(state).__name__}, not a state dict")
        return file, {k.removeprefix("module.") for k in state}
    except Exception as exc:
        raise UserError(f"timm {model}: cannot load weights from {file}: {str(exc).splitlines()[0]}") from None


def layer_groups(module: nn.Module, matcher) -> dict[str, tuple[str, ...]]:
    """timm's coarse parameter groups as mltl groups ``C1``.. of submodule paths, in timm's order.

    Each group is the smallest set of submodules whose parameters all belong to it. A parameter that no
    such submodule holds (one kept on the model object itself) makes the model unusable here: UserError.
    """
    from timm.models import group_parameters

    grouped = group_parameters(module, matcher)  # {ordinal: [parameter names]}, in order
    owner = {name: i for i, names in enumerate(grouped.values()) for name in names}
    params_of = {path: [f"{path}.{n}" for n, _ in m.named_parameters()] for path, m in module.named_modules() if path}
    groups: dict[str, tuple[str, ...]] = {}
    covered: set[str] = set()
    chosen: list[str] = []
    for i in range(len(grouped)):
        paths = []
        for path, names in params_of.items():
            if not names or any(path.startswith(c + ".") for c in chosen):
                continue
            if all(owner.get(n) == i for n in names):
                paths.append(path)
                chosen.append(path)
                covered.update(names)
        if paths:
            groups[f"C{len(groups) + 1}"] = tuple(paths)
    loose = [n for n, _ in module.named_parameters() if n not in covered]
    if loose:
        raise UserError(f"timm backbone: parameters {', '.join(loose[:3])} belong to no submodule of their own "
                        f"stage, so mltl cannot freeze them with a layer group (ViT-style models are not supported "
                        f"yet); choose a convolutional model such as resnet18, convnext_tiny or efficientnet_b0")
    return groups


def timm_backbone(*, model: str, in_chans: int, image_size: int, weights: str | None = None,
                  pretrained: bool = False, allow_download: bool = False, drop_rate: float = 0.0,
                  drop_path_rate: float = 0.0) -> Trunk:
    """Any timm model by name (model = "resnet18"); options: weights (local file), pretrained, allow_download,
    drop_rate, drop_path_rate."""
    timm = _import_timm()
    if not timm.is_model(model):
        raise UserError(f'timm: unknown model "{model}"{did_you_mean(model, timm.list_models())} '
                        f"(timm.list_models() lists them)")
    if not 0 <= drop_rate < 1 or not 0 <= drop_path_rate < 1:
        raise UserError(f"timm {model}: drop_rate and drop_path_rate must be at least 0 and below 1")
    if in_chans not in (1, 3):
        raise UserError(f"timm {model}: in_chans must be 1 or 3, got {in_chans}")
    kwargs = dict(num_classes=0, in_chans=in_chans, drop_rate=drop_rate)
    if drop_path_rate:
        kwargs["drop_path_rate"] = drop_path_rate
    if weights:
        file, keys = _weights_keys(weights, model)
        try:
            net = timm.create_model(model, pretrained=True, pretrained_cfg_overlay=dict(file=str(file)), **kwargs)
        except Exception as exc:
            raise UserError(f"timm {model}: cannot load weights from {file}: {str(exc).splitlines()[0]} "
                            f"(is it a checkpoint of {model}?)") from None
        # timm loads leniently (it adapts the classifier); a checkpoint of another model must not pass silently
        missing = sorted(k for k in net.state_dict() if k not in keys and not k.endswith("num_batches_tracked"))
        if missing:
            raise UserError(f"timm {model}: cannot load weights from {file}: it lacks {len(missing)} of the model's "
                            f"tensors ({', '.join(missing[:3])}, ...); is it a checkpoint of {model}?")
    elif pretrained:
        if not allow_download:
            raise UserError(f"timm {model}: pretrained = true would download the weights from the internet; "
                            f"download them once and set backbone.weights to the local file, or set "
                            f"backbone.allow_download = true")
        try:
            net = timm.create_model(model, pretrained=True, **kwargs)
        except Exception as exc:
            offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else ""
            raise UserError(f"timm {model}: downloading the pretrained weights failed{offline}: "
                            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}; on a machine "
                            f"without internet, copy the weights file over and set backbone.weights") from None
    else:
        try:
            net = timm.create_model(model, **kwargs)
        except TypeError as exc:
            raise UserError(f"timm {model}: {exc}") from None
    groups = layer_groups(net, net.group_matcher(coarse=True))
    with torch.no_grad():  # the feature width and a too-small input, found now rather than mid-training
        was = net.training
        net.eval()
        try:
            out = net(torch.zeros(1, in_chans, image_size, image_size))
        except RuntimeError as exc:
            raise UserError(f"timm {model}: input size {image_size} px does not fit the model "
                            f"({str(exc).splitlines()[0]}); change [input] size") from None
        net.train(was)
    if out.ndim != 2 or out.shape[1] != net.num_features:
        raise UserError(f"timm {model}: expected pooled features (1, {net.num_features}), got {tuple(out.shape)}")
    return Trunk(module=net, feature_dim=int(net.num_features), groups=groups)


@hookimpl
def register_backbones(register):
    register("timm", timm_backbone)
