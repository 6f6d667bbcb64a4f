"""Pretrained weight files: found in the local caches, downloaded when allowed, or a one-line error that says
where to put them.

Two caches, the ones timm and torchvision use themselves, so a file fetched by either library (or copied
over from a machine with internet) is found:

- the Hugging Face hub cache (timm's weights): ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else
  ``~/.cache/huggingface/hub``, with a repository ``ORG/NAME`` in ``models--ORG--NAME/snapshots/<commit>/``
  and ``models--ORG--NAME/refs/main`` naming the commit;
- the torch hub cache (torchvision's weights, and timm's few URL-only ones):
  ``torch.hub.get_dir()/checkpoints/<file name of the URL>``, i.e. ``TORCH_HOME/hub/checkpoints``.

The policy (the same as the MedMNIST domain's): a file in the cache is used; otherwise it is downloaded,
unless ``MLTL_OFFLINE`` is set (or, for Hugging Face files, ``HF_HUB_OFFLINE``) or the backbone says
``allow_download = false``; a refused or failed download is a :class:`mltl.UserError` naming the path.
The environment is read at each call, not when a library was imported.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import urlparse

import torch

from mltl import UserError

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm's hub repositories hold


def offline(hugging_face: bool) -> str | None:
    """The environment variable that forbids downloading, or None."""
    if os.environ.get("MLTL_OFFLINE", "").strip() not in ("", "0"):
        return "MLTL_OFFLINE"
    if hugging_face and os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE"):
        return "HF_HUB_OFFLINE"
    return None


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, as huggingface_hub resolves it (but from the environment of now)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


def split_revision(repo: str) -> tuple[str, str | None]:
    """``ORG/NAME@REVISION`` as (``ORG/NAME``, ``REVISION``)."""
    repo_id, _, revision = repo.partition("@")
    return repo_id, revision or None


def hf_repo_dir(repo_id: str) -> Path:
    return hf_cache_dir() / f"models--{repo_id.replace('/', '--')}"


def _cached(repo_id: str, filename: str, revision: str | None) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename, cache_dir=str(hf_cache_dir()), revision=revision)
    return Path(found) if isinstance(found, str) and Path(found).is_file() else None


def _reason(exc: BaseException) -> str:
    text = str(getattr(exc, "reason", None) or exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def hf_file(repo: str, filenames: tuple[str, ...], *, what: str, allow_download: bool,
            revision: str | None = None) -> Path:
    """The first of ``filenames`` that repository ``repo`` (``ORG/NAME[@REVISION]``) has, from the Hugging Face
    cache or downloaded into it. ``what`` starts the error message (e.g. "timm resnet18")."""
    repo_id, rev = split_revision(repo)
    revision = revision or rev
    for name in filenames:
        found = _cached(repo_id, name, revision)
        if found:
            return found
    at = hf_repo_dir(repo_id)
    names = " or ".join(filenames)
    where = (f"on a machine with internet run `hf download {repo_id}` (or build this backbone there once) and copy "
             f"the folder {at} to the same place here (the Hugging Face cache: HF_HUB_CACHE, else HF_HOME/hub), "
             f"or set backbone.weights to a local weights file")
    refused = offline(hugging_face=True) or ("allow_download = false" if not allow_download else None)
    if refused:
        raise UserError(f"{what}: {names} of {repo} not found in the Hugging Face cache {at} ({refused} is set, so "
                        f"no download); {where}")
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError

    endpoint = os.environ.get("HF_ENDPOINT") or None  # read now, like the cache folder
    problem: BaseException | None = None
    for name in filenames:
        try:  # one quick request first: without a connection huggingface_hub retries for ~25 s
            get_hf_file_metadata(hf_hub_url(repo_id, name, revision=revision, endpoint=endpoint), timeout=10)
        except EntryNotFoundError as exc:
            if isinstance(exc, LocalEntryNotFoundError):
                problem = exc
                break
            problem = problem or exc  # this repository has no such file: try the next name
            continue
        except Exception as exc:  # noqa: BLE001 -- no network, no such repository, gated, HTTP errors
            problem = exc
            break
        try:
            return Path(hf_hub_download(repo_id, name, revision=revision, cache_dir=str(hf_cache_dir()),
                                        endpoint=endpoint))
        except Exception as exc:  # noqa: BLE001 -- any failure of the download is the same one-line error
            problem = exc
            break
    raise UserError(f"{what}: {names} of {repo} not found in the Hugging Face cache {at} and it could not be "
                    f"downloaded ({_reason(problem)}); {where}") from None


def torch_hub_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def torch_hub_file(url: str, *, what: str, allow_download: bool, check_hash: bool = True) -> Path:
    """The file of ``url`` in the torch hub cache (``torch.hub.get_dir()/checkpoints``), downloaded there when
    missing and allowed; with ``check_hash`` a download must match the hash prefix in its file name."""
    dest = torch_hub_dir() / os.path.basename(urlparse(url).path)
    if dest.is_file():
        return dest
    where = (f"put {dest.name} (from {url}) at {dest} (the torch hub cache: TORCH_HOME/hub/checkpoints), "
             f"or set backbone.weights to a local weights file")
    refused = offline(hugging_face=False) or ("allow_download = false" if not allow_download else None)
    if refused:
        raise UserError(f"{what}: {dest} not found ({refused} is set, so no download); {where}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(dest), hash_prefix=_hash_prefix(dest.name) if check_hash else None,
                                       progress=False)
    except Exception as exc:  # noqa: BLE001 -- no network, HTTP error, hash mismatch
        dest.unlink(missing_ok=True)
        raise UserError(f"{what}: {dest} not found and it could not be downloaded ({_reason(exc)}); {where}") from None
    return dest


def _hash_prefix(name: str) -> str | None:
    """torch hub's convention: ``NAME-<sha256 prefix>.pth`` (torch.hub.load_state_dict_from_url's check)."""
    found = re.search(r"-([a-f0-9]*)\.", name)
    return found.group(1) if found and found.group(1) else None


def read_state_dict(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file, or of a ``.pth``/``.bin``/``.pt`` read with ``weights_only=True``
    (a pickle that would run code is refused); a training checkpoint's ``state_dict``/``model`` is unwrapped
    and DataParallel's ``module.`` prefix removed."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f'{what}: weights file "{path}" not found (resolved to {file.resolve()}); '
                        f"point backbone.weights at a local .safetensors or .pth file")
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(file), device="cpu")
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
        for wrapper in ("state_dict", "model", "state_dict_ema"):  # training checkpoints wrap the weights
            if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
                state = state[wrapper]
                break
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"holds a {type(state).__name__}, not a state dict of tensors")
        return {k.removeprefix("module."): v for k, v in state.items()}
    except Exception as exc:  # noqa: BLE001 -- an unreadable file of any kind: one line naming it
        raise UserError(f"{what}: cannot load weights from {file}: {_reason(exc)}") from None
