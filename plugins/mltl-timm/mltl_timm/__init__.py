"""Pretrained models as mltl backbones: any timm model (``backbone = { name = "timm", model = "resnet18" }``)
and torchvision's classification models (``backbone = { name = "torchvision", model = "resnet18" }``,
:mod:`mltl_timm.tv`). docs/backbones.md is the user's guide.

**Model names.** A timm name (``resnet18``, or with a pretrained tag ``resnet18.a1_in1k``), a Hugging Face
Hub repository in timm's layout (``hf-hub:ORG/NAME``, optionally ``@REVISION``), or a local folder in that
layout (``config.json`` and ``model.safetensors`` or ``pytorch_model.bin``; a path, or ``local-dir:PATH``).
The model is built with ``timm.create_model(..., num_classes=0, in_chans=...)``: timm's classifier is
removed and the pooled features go to mltl's head (``N1``.., ``classifier``).

**Weights.** ``pretrained = true`` (the default for hf-hub and folder models) loads the model's pretrained
weights: from the Hugging Face cache when they are there (:mod:`mltl_timm.fetch`), else downloaded into it;
with ``MLTL_OFFLINE`` or ``HF_HUB_OFFLINE`` set, or ``allow_download = false`` (the option's meaning since
issue 14: cache only; the default is true, so old configs with ``allow_download = true`` behave as before), a
missing file, or a failed download, is a one-line error naming the cache folder to copy it to.
``weights = "PATH"`` loads a local file instead (``.safetensors``, or a ``.pth``/``.bin`` read with
``weights_only=True``; it must hold every tensor of the model). On the ``meta`` device (mltl counting
parameters) nothing is fetched or loaded. timm adapts the first convolution to ``in_chans`` (for 1 channel, the sum of the RGB filters), drops
the checkpoint's classifier and, for ViT-style models, resamples the position embedding to the chain's size.

**Preprocessing.** With pretrained weights (hub or file) the trunk carries the model's ``pretrained_cfg``
as :class:`mltl.Preprocessing` (mean, std, input size and channels, interpolation), which a chain applies
unless its ``[input] mean`` / ``std`` say otherwise; a model trained from scratch carries none.

**Layer groups.** timm's coarse ``group_matcher`` (its grouping for layer-wise learning-rate decay) splits
the model into stem, stages or blocks and, where present, a final norm: ``C1``, ``C2``, .. in input-to-output
order. resnet18: ``C1`` = stem (conv1, bn1), ``C2``..``C5`` = layer1..layer4; convnext: ``C1`` = stem,
``C2``..``C5`` = stages 0..3, ``C6`` = the head's norm; efficientnet_b0: ``C1`` = stem, ``C2``..``C8`` =
blocks 0..6 (the last with conv_head); vit_tiny_patch16_224: ``C1`` = patch embedding with the model's own
``cls_token`` and ``pos_embed`` (:attr:`mltl.Trunk.loose`), ``C2``..``C13`` = blocks 0..11 (the last with
the final norm); swin: ``C1`` = patch embedding, ``C2``..``C5`` = stages, ``C6`` = norm.

**Input.** ``in_chans`` is the chain's ``[input] channels`` (1 or 3). Models with a fixed input size (ViT,
DeiT, Swin, ...) are built with ``img_size`` = the chain's ``[input] size``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from mltl import Preprocessing, Trunk, UserError, did_you_mean, hookimpl

from .fetch import WEIGHT_FILES, hf_file, read_state_dict, torch_hub_file
from .mobilenet_v1 import mobilenet_v1_backbone
from .tv import torchvision_backbone


def _import_timm():
    try:
        import timm
    except ImportError:  # pragma: no cover - a dependency of this distribution
        raise UserError("timm backbone: timm is not installed; pip install timm") from None
    return timm


class _Model(NamedTuple):
    """Where a model name points: ``kind`` "registry" (``resnet18``, ``resnet18.a1_in1k``), "hf-hub"
    (``hf-hub:ORG/NAME[@REVISION]``) or "folder" (a local folder in timm's hub layout)."""

    kind: str
    name: str
    folder: Path | None = None


def _parse_model(model: str, timm) -> _Model:
    prefix, sep, rest = model.partition(":")
    if sep and prefix.lower() in ("hf-hub", "hf_hub"):
        if rest.count("/") != 1 or not all(rest.split("@")[0].split("/")):
            raise UserError(f'timm: model "{model}" must name a Hugging Face Hub repository as hf-hub:ORG/NAME '
                            f"(e.g. hf-hub:timm/resnet18.a1_in1k)")
        return _Model("hf-hub", rest)
    if sep and prefix.lower() == "local-dir":
        return _Model("folder", rest, _folder(rest, model))
    if any(c in model for c in "/\\") or model.startswith((".", "~")):
        folder = Path(model).expanduser()
        if folder.is_dir():
            return _Model("folder", model, _folder(model, model))
        hint = (f'; for the Hugging Face Hub repository write model = "hf-hub:{model}"'
                if model.count("/") == 1 and not model.startswith((".", "/", "~")) else "")
        raise UserError(f'timm: model "{model}" is not a timm model name and no folder {folder.resolve()} '
                        f"exists{hint}; a local model is a folder with config.json and model.safetensors")
    if not timm.is_model(model):
        raise UserError(f'timm: unknown model "{model}"{did_you_mean(model, timm.list_models())} '
                        f"(timm.list_models() lists them)")
    return _Model("registry", model)


def _folder(path: str, model: str) -> Path:
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise UserError(f'timm: model "{model}": {folder.resolve() / "config.json"} not found; a local model is a '
                        f"folder in timm's hub layout: config.json and model.safetensors (or pytorch_model.bin)")
    return folder


def _folder_weights(folder: Path) -> Path | None:
    return next((folder / n for n in WEIGHT_FILES if (folder / n).is_file()), None)


def _folder_cfg(config: Path, what: str) -> dict[str, Any]:
    """The pretrained_cfg of a hub-layout ``config.json`` (timm's current and legacy single-dict forms)."""
    try:
        cfg = json.loads(config.read_text())
        pre = dict(cfg.get("pretrained_cfg", cfg))
        pre.setdefault("architecture", cfg["architecture"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UserError(f"{what}: {config} is not a timm model config ({type(exc).__name__}: {exc}); it needs "
                        f'"architecture" and "pretrained_cfg"') from None
    size = cfg.get("model_args", {}).get("img_size") if isinstance(cfg.get("model_args"), dict) else None
    if size is not None and pre.get("fixed_input_size") and pre.get("input_size"):
        size = (size, size) if isinstance(size, int) else tuple(size)
        pre["input_size"] = (pre["input_size"][0], *size)
    return pre


def preprocessing(cfg: dict[str, Any] | None, source: str) -> Preprocessing | None:
    """The input a timm ``pretrained_cfg`` describes (mean, std, input size and channels, interpolation)."""
    if not cfg or not cfg.get("mean") or not cfg.get("std"):
        return None
    size = cfg.get("input_size") or (3, None, None)
    try:
        return Preprocessing(mean=tuple(float(v) for v in cfg["mean"]), std=tuple(float(v) for v in cfg["std"]),
                             input_size=int(size[-1]) if size[-1] else None, channels=int(size[0]),
                             interpolation=str(cfg.get("interpolation") or "bilinear"), source=source)
    except (ValueError, TypeError):  # e.g. a four-channel model: no normalisation mltl could apply
        return None


def layer_groups(module: nn.Module, matcher) -> tuple[dict[str, tuple[str, ...]], dict[str, tuple[str, ...]]]:
    """timm's coarse parameter groups as mltl groups ``C1``.. of submodule paths, in timm's order, and the
    parameters no such submodule holds (a ViT's ``cls_token``, ``pos_embed``, register tokens) by group.

    Each group is the smallest set of submodules whose parameters all belong to it; a parameter held by a
    module whose other parameters belong elsewhere (a model's own ``cls_token``) is a loose parameter of its
    group (:attr:`mltl.Trunk.loose`), frozen with it.
    """
    from timm.models import group_parameters

    grouped = group_parameters(module, matcher)  # {ordinal: [parameter names]}, in order
    owner = {name: i for i, names in enumerate(grouped.values()) for name in names}
    params_of = {path: [f"{path}.{n}" for n, _ in m.named_parameters()] for path, m in module.named_modules() if path}
    paths: list[list[str]] = [[] for _ in grouped]
    covered: set[str] = set()
    chosen: list[str] = []
    for i in range(len(grouped)):
        for path, names in params_of.items():
            if not names or any(path.startswith(c + ".") for c in chosen):
                continue
            if all(owner.get(n) == i for n in names):
                paths[i].append(path)
                chosen.append(path)
                covered.update(names)
    loose: list[list[str]] = [[] for _ in grouped]
    for name, _ in module.named_parameters():
        if name not in covered:
            loose[owner[name]].append(name)
    groups: dict[str, tuple[str, ...]] = {}
    loose_by_group: dict[str, tuple[str, ...]] = {}
    for i in range(len(grouped)):
        if paths[i] or loose[i]:
            name = f"C{len(groups) + 1}"
            groups[name] = tuple(paths[i])
            if loose[i]:
                loose_by_group[name] = tuple(loose[i])
    return groups, loose_by_group


def _registry_cfg(timm, name: str, what: str, needed: bool) -> dict[str, Any] | None:
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(name)
    except RuntimeError:  # an unknown tag
        cfg = None
    if cfg is None and needed:
        arch = name.split(".")[0]
        tags = list(timm.models.get_arch_pretrained_cfgs(arch)) if hasattr(timm.models, "get_arch_pretrained_cfgs") else []
        raise UserError(f'{what}: no pretrained weights "{name}"{did_you_mean(name, tags)}; '
                        f"the model's pretrained tags: {', '.join(tags) or 'none'}")
    return cfg.to_dict() if cfg is not None else None


def timm_backbone(*, model: str, in_chans: int, image_size: int, weights: str | None = None,
                  pretrained: bool | None = None, allow_download: bool = True, drop_rate: float = 0.0,
                  drop_path_rate: float = 0.0) -> Trunk:
    """Any timm model: a name (``resnet18``, ``resnet18.a1_in1k``), ``hf-hub:ORG/NAME`` or a local folder;
    options: pretrained (default: true for hf-hub and folder models, false for names), weights (a local
    file), allow_download, drop_rate, drop_path_rate."""
    timm = _import_timm()
    what = f"timm {model}"
    if not 0 <= drop_rate < 1 or not 0 <= drop_path_rate < 1:
        raise UserError(f"{what}: drop_rate and drop_path_rate must be at least 0 and below 1")
    if in_chans not in (1, 3):
        raise UserError(f"{what}: in_chans must be 1 or 3, got {in_chans}")
    src = _parse_model(model, timm)
    load = (src.kind != "registry") if pretrained is None else pretrained
    # built on the "meta" device (mltl counting parameters; a saved network rebuilt only to receive its own
    # weights): nothing can be loaded into it, so pretrained weights are neither fetched nor loaded
    on_meta = torch.empty(0).device.type == "meta"
    if weights:
        load = True
    kwargs: dict[str, Any] = {"num_classes": 0, "in_chans": in_chans, "drop_rate": drop_rate}
    if drop_path_rate:
        kwargs["drop_path_rate"] = drop_path_rate
    overlay: dict[str, Any] | None = None
    file: Path | None = None  # the weights file whose tensor names are checked against the model
    if src.kind == "registry":
        cfg = _registry_cfg(timm, src.name, what, needed=load and not weights)
        create = src.name
        described = f"{cfg['architecture']}.{cfg['tag']}" if cfg and cfg.get("tag") else src.name
        if load and not weights and not on_meta:
            if cfg.get("hf_hub_id"):
                found = hf_file(cfg["hf_hub_id"], (cfg["hf_hub_filename"],) if cfg.get("hf_hub_filename")
                                else WEIGHT_FILES, what=what, allow_download=allow_download)
            elif cfg.get("url"):
                found = torch_hub_file(cfg["url"], what=what, allow_download=allow_download, check_hash=False)
            else:
                raise UserError(f"{what}: timm has no pretrained weights for {described}; set pretrained = false or "
                                f"backbone.weights to a local file")
            overlay = {"file": str(found), "custom_load": bool(cfg.get("custom_load")) and found.suffix == ".npz"}
    else:
        if src.kind == "hf-hub":
            config = hf_file(src.name, ("config.json",), what=what, allow_download=allow_download)
            folder = config.parent
            if load and not weights and not on_meta:  # from the same snapshot (commit) as its config
                file = hf_file(src.name, WEIGHT_FILES, what=what, allow_download=allow_download,
                               revision=folder.name)
            described = f"hf-hub:{src.name}"
        else:
            folder = src.folder
            if load and not weights:
                file = _folder_weights(folder)
                if file is None:
                    raise UserError(f"{what}: the folder {folder.resolve()} has config.json but no weights "
                                    f"({' or '.join(WEIGHT_FILES)}); add them, set backbone.weights, or set "
                                    f"pretrained = false")
            described = str(folder / "config.json")
        cfg = _folder_cfg(folder / "config.json", what)
        create = f"local-dir:{folder.resolve()}"
        default = _registry_cfg(timm, str(cfg["architecture"]), what, needed=False) or {}
        fill = {k: default[k] for k in ("classifier", "first_conv") if not cfg.get(k) and default.get(k)}
        overlay = fill or None  # a config.json without them: timm could not drop the classifier or adapt in_chans
    if weights:
        file = Path(weights).expanduser()
        if not file.is_file():
            raise UserError(f'{what}: weights file "{weights}" not found (resolved to {file.resolve()}); '
                            f"point backbone.weights at a local .safetensors or .pth file")
        overlay = dict(overlay or {}, file=str(file), source="file", custom_load=file.suffix == ".npz")
    if cfg and cfg.get("fixed_input_size"):  # ViT, DeiT, Swin, ...: built for the chain's size
        kwargs["img_size"] = image_size
    origin = f"from {file}" if file else f"of {described}"
    keys = None
    if file is not None and file.suffix != ".npz" and not on_meta:
        # read first with weights_only=True: a pickle that would run code is refused before timm opens the file
        keys = set(read_state_dict(file, what))
    net = _create(timm, create, load and not on_meta, None if on_meta else overlay, kwargs, what, origin)
    if keys is not None:
        # timm loads leniently (it adapts the classifier); a checkpoint of another model must not pass silently
        missing = sorted(k for k in net.state_dict() if k not in keys and not k.endswith("num_batches_tracked"))
        if missing:
            raise UserError(f"{what}: cannot load weights from {file}: it lacks {len(missing)} of the model's "
                            f"tensors ({', '.join(missing[:3])}, ...); is it a checkpoint of {model}?")
    groups, loose = layer_groups(net, net.group_matcher(coarse=True))
    width = _probe(net, in_chans, image_size, what)
    pre = None
    if load:
        pre = preprocessing(cfg, f"timm pretrained_cfg of {described}" + (f" (weights {weights})" if weights else ""))
    return Trunk(module=net, feature_dim=width, groups=groups, loose=loose, preprocessing=pre)


def _create(timm, name: str, load: bool, overlay: dict[str, Any] | None, kwargs: dict[str, Any], what: str,
            origin: str) -> nn.Module:
    for attempt in range(2):
        try:
            return timm.create_model(name, pretrained=load, pretrained_cfg_overlay=overlay, **kwargs)
        except TypeError as exc:
            if "img_size" in kwargs and "img_size" in str(exc) and attempt == 0:
                kwargs = {k: v for k, v in kwargs.items() if k != "img_size"}  # a fixed-size model without it
                continue
            raise UserError(f"{what}: {exc}") from None
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 -- timm raises many kinds: each becomes one line
            text = " ".join(line.strip() for line in str(exc).strip().splitlines()[:2])
            reason = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
            if load:
                raise UserError(f"{what}: cannot load weights {origin}: {reason} "
                                f"(is it a checkpoint of this model?)") from None
            raise UserError(f"{what}: cannot build the model: {reason}") from None
    raise AssertionError("unreachable")


def _probe(net: nn.Module, in_chans: int, image_size: int, what: str) -> int:
    """The feature width, and a too-small input found now rather than mid-training."""
    with torch.no_grad():
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
    if out.ndim != 2:
        raise UserError(f"{what}: expected pooled features (1, width), got {tuple(out.shape)}")
    return int(out.shape[1])


@hookimpl
def register_backbones(register):
    register("timm", timm_backbone)
    register("torchvision", torchvision_backbone)
    register("mobilenet-v1", mobilenet_v1_backbone)
