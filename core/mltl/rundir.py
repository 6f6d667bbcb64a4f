"""The run directory: atomic writes, the environment record, and the run's state.

Every file mltl writes goes to a temporary file in the same folder first and is then renamed over the
target (``os.replace`` is atomic on POSIX and Windows), so a crash leaves the old file or the new one,
never half of one.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from . import distributed as _distributed
from .errors import UserError

_UMASK = os.umask(0)
os.umask(_UMASK)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    if not _distributed.is_writer():  # under torchrun only rank 0 writes (mltl.distributed)
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; null means "undefined" (e.g. AUC with one class present)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return _jsonable(value.item())
    if isinstance(value, Path):
        return str(value)
    return value


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(_jsonable(data), indent=2, allow_nan=False) + "\n")


def save_weights_atomic(path: Path, state: dict[str, torch.Tensor], metadata_: dict[str, str]) -> None:
    """Weights as safetensors (no pickle), with string metadata (the network spec as JSON)."""
    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    write_bytes_atomic(path, save(tensors, metadata=metadata_))


def load_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            return {k: f.get_tensor(k) for k in f.keys()}, meta
    except FileNotFoundError:
        raise UserError(f"{path}: weights file not found") from None
    except Exception as exc:
        raise UserError(f"{path}: not a readable safetensors weights file ({exc}); re-run the stage") from None


def choose_run_dir(out: str | None, name: str) -> Path:
    """``out`` as given (must be new or empty), else ``runs/<name>``, ``runs/<name>-2``, ... (never reused)."""
    if out is not None:
        path = Path(out)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise UserError(f"{path}: the run directory already exists and is not empty; "
                            f"choose another --out or move the old run away")
        return path
    base = Path("runs") / name
    path, k = base, 1
    while path.exists():
        k += 1
        path = base.with_name(f"{name}-{k}")
    return path


def environment(device: torch.device, seed: int) -> dict[str, Any]:
    """Versions, hardware and seed: what a reviewer needs to reproduce a number."""
    packages = {}
    for dist in ("mltl", "mltl-gfe", "mltl-ct", "mltl-samala", "mltl-roc", "torch", "torchvision", "timm",
                 "numpy", "scikit-learn", "pluggy", "attrs", "rich", "safetensors", "matplotlib", "Pillow"):
        try:
            packages[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    env: dict[str, Any] = {
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": sys.argv,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "seed": seed,
        "packages": packages,
    }
    if device.type == "cuda":
        env["cuda"] = {"name": torch.cuda.get_device_name(device), "version": torch.version.cuda,
                       "capability": list(torch.cuda.get_device_capability(device))}
    return env


class RunLock:
    """An exclusive lock on a run directory (``.lock`` holding host and pid).

    A second ``mltl run`` on the same directory is refused with a clear message; a lock left by a process
    that no longer exists on this host is stale and taken over.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / ".lock"
        self.held = False

    def __enter__(self) -> RunLock:
        me = f"{platform.node()} {os.getpid()}"
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self.path.read_text(errors="replace").strip() if self.path.exists() else ""
                host, _, pid = owner.partition(" ")
                if host == platform.node() and pid.isdigit() and not _alive(int(pid)):
                    self.path.unlink(missing_ok=True)  # stale: its process is gone
                    continue
                raise UserError(
                    f"{self.path.parent}: the run directory is in use by process {pid or '?'} on {host or '?'}; "
                    f"wait for it to finish, or if that process is gone, delete {self.path}"
                ) from None
            with os.fdopen(fd, "w") as f:
                f.write(me)
            self.held = True
            return self
        raise UserError(f"{self.path}: could not take the run directory's lock")

    def __exit__(self, *exc: Any) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
