"""The run directory: its layout (the only module that knows its file names), atomic writes, and the one
writer and reader of a finished stage.

Every file mltl writes goes to a temporary file in the same folder first and is then renamed over the
target (``os.replace`` is atomic on POSIX and Windows), so a crash leaves the old file or the new one,
never half of one (a killed process leaves its temporary ``.NAME.XXXXXXXX.tmp``, which
:func:`remove_orphan_temporaries` removes under the run's :class:`RunLock`). Completion markers are written
last: ``variant.json`` marks a trained sweep variant, ``metrics.json`` a finished stage (or repeat), so
``--resume`` trusts nothing half-written. Commands other than ``mltl run`` never write a run's own files
(:func:`is_run_file`), and ``predictions.csv`` guards cells a spreadsheet would execute (:func:`guard_csv_cell`).

Layout (:class:`RunFiles`, :class:`StageFiles`)::

    RUN/config.toml  environment.json  state.json  reused.json  report.md  report.html  .lock
    RUN/STAGE/model.safetensors  model.json  metrics.json  predictions.csv  splits.csv  history.json
              training_images.json  selection.json (a sweep)  repeats.json  oof_predictions.csv (a repeated
              protocol)
    RUN/STAGE/variants/LABEL/...  (one trained sweep variant: model, history, splits, variant.json)
    RUN/STAGE/repeats/LABEL/...   (one fold / draw / seed: a complete stage of its own)
    RUN/STAGE/final/...           (a repeated protocol's final model, trained on all non-test data: model,
                                   model.json (written last), history, splits, training_images.json)

The model a stage serves (``mltl predict``, ``mltl export``, the next stage) is :func:`served`: the final
model where the stage's ``model.json`` names one, else the stage's own. :func:`prune_stage` drops what a
finished stage no longer needs (``[run] keep``).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import platform
import re
import secrets
import shutil
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch

from ..errors import UserError
from ..evaluation.results import Predictions
from ..networks.network import Network, build_network
from ..training import distributed as _distributed

log = logging.getLogger("mltl")

_UMASK = os.umask(0)
os.umask(_UMASK)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    if not _distributed.is_writer():  # under torchrun only rank 0 writes (mltl.training.distributed)
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


def link_or_copy_atomic(src: Path, path: Path) -> None:
    """``path`` becomes a hard link to ``src`` (one copy on disk for both names) where the file system allows,
    else an atomic copy. For weights files only: mltl replaces them, never edits them in place, and no
    reporter writes them (a plugin rewriting its own figure in place would change both names)."""
    if not _distributed.is_writer():
        return
    path = Path(path)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"  # the name a killed write's leftover has
    try:
        os.link(src, tmp)
        os.replace(tmp, path)
    except OSError:  # no hard links here (some network and FAT file systems): a copy
        tmp.unlink(missing_ok=True)
        write_bytes_atomic(path, Path(src).read_bytes())


def _link_weights_or_copy(src: str, dst: str) -> None:
    """``shutil.copytree``'s copy function: weights files (the bulk of a stage) hard-linked where possible, as
    :func:`link_or_copy_atomic` explains; every other file copied, as reporters write into a reused stage."""
    if src.endswith(WEIGHTS_SUFFIX):
        try:
            os.link(src, dst)
            return
        except OSError:
            pass
    shutil.copy2(src, dst)


WEIGHTS_SUFFIX = ".safetensors"


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def jsonable(value: Any) -> Any:
    """``value`` as its JSON file holds it: tuples as lists, numpy scalars as numbers, NaN as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; null means "undefined" (e.g. AUC with one class present)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return jsonable(value.item())
    if isinstance(value, Path):
        return str(value)
    return value


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(jsonable(data), indent=2, allow_nan=False) + "\n")


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
    """Versions, hardware and seed: what a reviewer needs to reproduce a number.

    ``packages`` holds mltl, every installed distribution with an entry point in the group ``mltl`` (the
    plugins, first-party or not; also listed under ``plugins``) and the libraries that shape a result
    (``libraries`` below), each with its version, where installed."""
    libraries = ("torch", "torchvision", "timm", "numpy", "scikit-learn", "scipy", "pydicom", "nibabel",
                 "safetensors", "pluggy", "attrs", "rich", "matplotlib", "Pillow")
    plugins: dict[str, str] = {}
    for dist in metadata.distributions():
        try:
            name = dist.metadata["Name"]
            if name and name not in plugins and any(ep.group == "mltl" for ep in dist.entry_points):
                plugins[name] = dist.version
        except Exception:  # a broken metadata folder of some other package is no reason to fail a run
            continue
    packages: dict[str, str] = {}
    for dist in ("mltl", *sorted(plugins, key=str.lower), *libraries):
        if dist in plugins:
            packages[dist] = plugins[dist]
            continue
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
        "plugins": dict(sorted(plugins.items(), key=lambda kv: kv[0].lower())),
    }
    if device.type == "cuda":
        env["cuda"] = {"name": torch.cuda.get_device_name(device), "version": torch.version.cuda,
                       "capability": list(torch.cuda.get_device_capability(device))}
    return env


class RunLock:
    """An exclusive lock on a run directory: an OS lock on its ``.lock`` file (``flock`` on POSIX,
    ``msvcrt.locking`` on Windows), so exactly one of two racing processes gets it.

    The kernel releases the lock when its holder dies, so a lock file left by a killed process is taken
    over. The file holds the holder's host and pid, for the message a refused process gets; one naming
    another host is honoured even when unlocked (an OS lock may not reach across hosts on a network drive).
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = RunFiles(Path(run_dir)).lock
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> RunLock:
        for _ in range(10):
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
            if not _lock_fd(fd):
                os.close(fd)
                raise self._in_use()
            if _same_file(fd, self.path):  # not a file its last holder removed while we opened it
                break
            _unlock_fd(fd)
            os.close(fd)
        else:
            raise UserError(f"{self.path}: could not take the run directory's lock")
        host = self._owner()[0]
        if host and host != platform.node():
            _unlock_fd(fd)
            os.close(fd)
            raise self._in_use()
        os.ftruncate(fd, 0)
        os.write(fd, f"{platform.node()} {os.getpid()}".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc: Any) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        if os.name == "nt":  # an open file cannot be removed: release, close, then remove if no one opened it
            _unlock_fd(fd)
            os.close(fd)
            try:
                self.path.unlink(missing_ok=True)
            except OSError:
                pass
            return
        if _same_file(fd, self.path):  # removed while still locked: whoever opened it meanwhile retries
            self.path.unlink(missing_ok=True)
        os.close(fd)

    def _owner(self) -> tuple[str, str]:
        try:
            owner = self.path.read_text(errors="replace").strip()
        except OSError:
            owner = ""
        host, _, pid = owner.partition(" ")
        return host, pid

    def _in_use(self) -> UserError:
        host, pid = self._owner()
        return UserError(f"{self.path.parent}: the run directory is in use by process {pid or '?'} on "
                         f"{host or '?'}; wait for it to finish, or if that process is gone, delete {self.path}")


_WINDOWS_LOCK_OFFSET = 1 << 20  # the byte locked on Windows, past the text, which stays readable


def _lock_fd(fd: int) -> bool:
    """Lock the open file ``fd`` without waiting; False when another process holds it."""
    try:
        if os.name == "nt":
            import msvcrt

            os.lseek(fd, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            os.lseek(fd, 0, os.SEEK_SET)
        else:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (BlockingIOError, PermissionError):
        return False
    except OSError as exc:
        if os.name == "nt":  # msvcrt reports a held lock as EDEADLOCK / EACCES
            return False
        raise UserError(f"cannot lock the run directory ({exc}); the file system may not support file "
                        f"locks (a network drive mounted without them?)") from None
    return True


def _unlock_fd(fd: int) -> None:
    if os.name == "nt":
        import msvcrt

        os.lseek(fd, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
        except OSError:
            pass
    else:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_UN)


def _same_file(fd: int, path: Path) -> bool:
    try:
        here = os.stat(path)
    except FileNotFoundError:
        return False
    there = os.fstat(fd)
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


#: the temporary file of an atomic write (``tempfile.mkstemp(prefix=".NAME.", suffix=".tmp")``)
_TEMPORARY = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")
#: a stage folder half-copied by ``--reuse`` (:func:`copy_stage`)
_REUSE_TEMPORARY = re.compile(r"\..+\.reuse-tmp")


def remove_orphan_temporaries(run_dir: Path) -> list[Path]:
    """Remove what interrupted writes left in ``run_dir``: temporary files of atomic writes
    (``.NAME.XXXXXXXX.tmp``) and half-copied stages of ``--reuse`` (``.STAGE.reuse-tmp``); return them.

    Call it only while holding the run directory's :class:`RunLock` (a write in progress looks the same)."""
    removed: list[Path] = []
    for folder, dirs, names in os.walk(run_dir):
        for d in [d for d in dirs if _REUSE_TEMPORARY.fullmatch(d)]:
            dirs.remove(d)
            shutil.rmtree(Path(folder) / d, ignore_errors=True)
            removed.append(Path(folder) / d)
        for name in names:
            if _TEMPORARY.fullmatch(name):
                (Path(folder) / name).unlink(missing_ok=True)
                removed.append(Path(folder) / name)
    for path in removed:
        log.info("%s: removed, left by an interrupted write", path)
    return removed


def run_dir_of(path: Path) -> Path | None:
    """The run directory ``path`` lies in: the nearest folder above it holding ``config.toml`` and
    ``state.json`` or ``environment.json`` (symbolic links and ``..`` resolved); None outside any."""
    for folder in Path(path).resolve().parents:
        files = RunFiles(folder)
        if files.config.is_file() and (files.state.is_file() or files.environment.is_file()):
            return folder
    return None


def is_run_file(path: Path) -> bool:
    """``path`` is one of a run directory's own files, named by :class:`RunFiles` (at its top) or
    :class:`StageFiles` (in a stage, repeat or variant folder): only ``mltl run`` may write those.
    Names compare case-insensitively (macOS and Windows file systems do)."""
    run = run_dir_of(path)
    if run is None:
        return False
    parts = Path(path).resolve().relative_to(run).parts
    if len(parts) == 1:
        return RunFiles.is_own_name(parts[0])
    return parts[-1].casefold() in {n.casefold() for n in StageFiles.NAMES}


def refuse_run_file(path: Path, option: str) -> None:
    """UserError when a command's output ``path`` (given with ``option``) would overwrite a run's own file."""
    if is_run_file(path):
        raise UserError(f"{option} {path}: that is a file of the run in {run_dir_of(path)}, which this would "
                        f"overwrite; write to another name or outside the run directory")


def read_predictions(path: Path, split: str, classes: tuple[str, ...]) -> Predictions:
    """One split's rows of a ``predictions.csv`` (ids and groups as they were before :func:`guard_csv_cell`)."""
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == split]
    return Predictions(ids=tuple(unguard_csv_cell(r["id"]) for r in rows), split=split,
                       labels=np.array([classes.index(r["label"]) for r in rows], dtype=np.int64),
                       probs=np.array([[float(r[f"p_{c}"]) for c in classes] for r in rows], dtype=np.float64)
                       .reshape(len(rows), len(classes)),
                       classes=classes,
                       groups=tuple(unguard_csv_cell(r["group"]) for r in rows) if rows and all(r.get("group") for r in rows)
                       else None)


def load_network(path: Path, registry: Any = None) -> Network:
    """A network saved by mltl: the spec from the safetensors metadata, then the weights (strict)."""
    from ..plugins import get_registry

    registry = registry or get_registry()
    state, meta = load_weights(path)
    try:
        spec = json.loads(meta["spec"])
        net = build_network(spec, registry)
        net.load_state_dict(state)
    except (KeyError, ValueError, RuntimeError) as exc:
        raise UserError(f"{path}: weights do not match the network they describe ({exc}); "
                        f"delete the file to re-run that step") from None
    return net


# ---------------------------------------------------------------- the layout


def safe_name(label: str) -> str:
    """A sweep label as a folder name: ``freeze=C1-C2`` stays, ``lr=0.1,freeze=C1`` becomes ``lr=0.1+freeze=C1``."""
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", label.replace(",", "+"))


@attrs.frozen
class StageFiles:
    """The files of one stage, of one repeat of it, or of one sweep variant (the same names in each)."""

    root: Path

    MODEL = "model.safetensors"
    MODEL_JSON = "model.json"
    METRICS = "metrics.json"  # written last: marks the stage (or repeat) finished
    PREDICTIONS = "predictions.csv"
    SPLITS = "splits.csv"
    HISTORY = "history.json"
    SELECTION = "selection.json"
    VARIANT = "variant.json"  # written last: marks a sweep variant trained
    CHECKPOINT = "checkpoint.pt"
    REPEATS_JSON = "repeats.json"
    OOF_PREDICTIONS = "oof_predictions.csv"
    TRAINING_IMAGES = "training_images.json"  # content hashes of the images the model trained on
    FINAL = "final"  # the folder of a repeated stage's final model
    REPEATS = "repeats"
    VARIANTS = "variants"
    #: what a repeated stage copies from its representative repeat into its own folder
    REPRESENTATIVE = (MODEL, MODEL_JSON, HISTORY, PREDICTIONS, SPLITS, SELECTION, TRAINING_IMAGES)
    #: every file name of a stage, repeat or variant folder
    NAMES = (MODEL, MODEL_JSON, METRICS, PREDICTIONS, SPLITS, HISTORY, SELECTION, VARIANT, CHECKPOINT,
             REPEATS_JSON, OOF_PREDICTIONS, TRAINING_IMAGES)

    model = property(lambda self: self.root / self.MODEL)
    model_json = property(lambda self: self.root / self.MODEL_JSON)
    metrics = property(lambda self: self.root / self.METRICS)
    predictions = property(lambda self: self.root / self.PREDICTIONS)
    splits = property(lambda self: self.root / self.SPLITS)
    history = property(lambda self: self.root / self.HISTORY)
    selection = property(lambda self: self.root / self.SELECTION)
    variant_record = property(lambda self: self.root / self.VARIANT)
    checkpoint = property(lambda self: self.root / self.CHECKPOINT)
    repeats_json = property(lambda self: self.root / self.REPEATS_JSON)
    oof_predictions = property(lambda self: self.root / self.OOF_PREDICTIONS)
    training_images = property(lambda self: self.root / self.TRAINING_IMAGES)
    #: a repeated stage's final model (:func:`write_final`)
    final = property(lambda self: StageFiles(self.root / self.FINAL))

    def repeat(self, label: str) -> StageFiles:
        return StageFiles(self.root / self.REPEATS / label)

    def repeats(self) -> list[StageFiles]:
        """The repeats saved under this stage, in name order."""
        folder = self.root / self.REPEATS
        return [StageFiles(p) for p in sorted(folder.iterdir()) if p.is_dir()] if folder.is_dir() else []

    def variant(self, label: str) -> StageFiles:
        return StageFiles(self.root / self.VARIANTS / safe_name(label))

    def variants(self) -> list[StageFiles]:
        """The sweep variants saved under this stage, in name order."""
        folder = self.root / self.VARIANTS
        return [StageFiles(p) for p in sorted(folder.iterdir()) if p.is_dir()] if folder.is_dir() else []


@attrs.frozen
class RunFiles:
    """The files of a run directory."""

    root: Path

    CONFIG = "config.toml"
    ENVIRONMENT = "environment.json"
    STATE = "state.json"
    REUSED = "reused.json"
    REPORT_MD = "report.md"
    REPORT_HTML = "report.html"
    LOCK = ".lock"
    #: the file names at the top of a run directory (besides ``environment-resume-*.json``)
    NAMES = (CONFIG, ENVIRONMENT, STATE, REUSED, REPORT_MD, REPORT_HTML, LOCK)

    config = property(lambda self: self.root / self.CONFIG)
    environment = property(lambda self: self.root / self.ENVIRONMENT)
    state = property(lambda self: self.root / self.STATE)
    reused = property(lambda self: self.root / self.REUSED)
    report_md = property(lambda self: self.root / self.REPORT_MD)
    report_html = property(lambda self: self.root / self.REPORT_HTML)
    lock = property(lambda self: self.root / self.LOCK)

    def environment_resumed(self, time_utc: str) -> Path:
        return self.root / f"environment-resume-{time_utc.replace(':', '')}.json"

    @classmethod
    def is_own_name(cls, name: str) -> bool:
        """``name`` is, or may become, one of the files at the top of a run directory (case-insensitively),
        or the temporary file of an atomic write, which a resumed run removes."""
        folded = name.casefold()
        return (folded in {n.casefold() for n in cls.NAMES} or _TEMPORARY.fullmatch(name) is not None
                or (folded.startswith("environment-resume-") and folded.endswith(".json")))

    def stage(self, name: str) -> StageFiles:
        return StageFiles(self.root / name)


# ---------------------------------------------------------------- writing and reading a stage


#: what a spreadsheet reads as the start of a formula (CSV injection)
_FORMULA_START = ("=", "+", "-", "@")


def guard_csv_cell(text: str) -> str:
    """``text`` as a CSV cell a spreadsheet will not execute: a ``'`` before a cell that starts with ``=``,
    ``+``, ``-`` or ``@`` (after any ``'``, so :func:`unguard_csv_cell` restores every text exactly);
    anything else unchanged."""
    return "'" + text if text.lstrip("'").startswith(_FORMULA_START) else text


def unguard_csv_cell(cell: str) -> str:
    """The text :func:`guard_csv_cell` made ``cell`` from."""
    return cell[1:] if cell.startswith("'") and cell.lstrip("'").startswith(_FORMULA_START) else cell


def predictions_csv(rows: list[Predictions]) -> str:
    """``predictions.csv``: id, split, label, group (salted case key or empty), one probability per class.
    The id and group cells are guarded against CSV injection (:func:`guard_csv_cell`)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    classes = rows[0].classes
    w.writerow(["id", "split", "label", "group"] + [f"p_{c}" for c in classes])
    for p in rows:
        for i in range(len(p)):
            w.writerow([guard_csv_cell(p.ids[i]), p.split, classes[p.labels[i]],
                        guard_csv_cell(p.groups[i]) if p.groups is not None else ""]
                       + [repr(float(v)) for v in p.probs[i]])
    return buf.getvalue()


def splits_csv(ids: Any, classes: Any, labels: Any, splits: dict[str, np.ndarray]) -> str:
    """``splits.csv``: id, label, split of every image of the stage's domain that a split holds."""
    rows = io.StringIO()
    wr = csv.writer(rows, lineterminator="\n")
    wr.writerow(["id", "label", "split"])
    for s, idx in splits.items():
        for i in idx:
            wr.writerow([ids[i], classes[labels[i]], s])
    return rows.getvalue()


def write_splits(path: Path, text: str, check: bool = False) -> None:
    """Write a split assignment; with ``check`` (a resumed run), refuse one that differs from the saved one
    (a saved file cut off by a crash is the beginning of ``text``: that is damage, and rewriting repairs it)."""
    if check and path.is_file() and not text.startswith(path.read_text()):
        raise UserError(f"{path} does not match the split this run makes now (the file is damaged, or the data "
                        f"or split settings changed since the run started): restore the data, or delete "
                        f"{path.parent} to re-run that step from the start")
    write_text_atomic(path, text)


def write_variant(files: StageFiles, net: Network, history: Any, record: dict[str, Any]) -> None:
    """A trained sweep variant: weights, history, then ``variant.json`` (its completion marker)."""
    save_weights_atomic(files.model, net.state_dict(), {"spec": json.dumps(net.spec)})
    write_json_atomic(files.history, history)
    write_json_atomic(files.variant_record, record)
    if _distributed.is_writer():
        files.checkpoint.unlink(missing_ok=True)


def read_variant(files: StageFiles) -> dict[str, Any] | None:
    """The record of a finished variant, or None (never finished, or damaged: then it is trained again)."""
    try:
        record = json.loads(files.variant_record.read_text())
        load_weights(files.model)
        json.loads(files.history.read_text())
        return record if {"candidate", "start", "note"} <= set(record) else None
    except (OSError, ValueError, UserError):
        return None


def write_stage(files: StageFiles, *, net: Network, model_json: dict[str, Any], history: Any,
                predictions: list[Predictions], splits: str, selection: dict[str, Any] | None,
                metrics: dict[str, Any], training_images: dict[str, Any] | None = None) -> None:
    """A finished stage (or repeat): every file, then ``metrics.json``, which marks it finished."""
    if selection is not None:
        write_json_atomic(files.selection, selection)
    save_weights_atomic(files.model, net.state_dict(), {"spec": json.dumps(net.spec)})
    write_text_atomic(files.model_json, json.dumps(model_json, indent=2) + "\n")
    write_json_atomic(files.history, history)
    write_text_atomic(files.predictions, predictions_csv(predictions))
    write_splits(files.splits, splits)
    if training_images is not None:
        write_training_images(files, training_images)
    write_json_atomic(files.metrics, metrics)


def write_repeated_stage(files: StageFiles, representative: str, oof_csv: str | None,
                         repeats: dict[str, Any], metrics: dict[str, Any], final: dict[str, Any] | None = None) -> None:
    """A stage of a repeated protocol: its representative repeat's files, the pooled out-of-fold predictions,
    ``repeats.json``, and ``metrics.json`` last.

    ``final``: the record of the stage's final model (already written to ``final/`` by :func:`write_final`),
    added to the stage's ``model.json`` as ``final_model``: :func:`served` then serves ``final/``."""
    rep = files.repeat(representative).root
    for name in files.REPRESENTATIVE:
        if (rep / name).is_file():
            if name.endswith(WEIGHTS_SUFFIX):
                link_or_copy_atomic(rep / name, files.root / name)
            else:
                write_bytes_atomic(files.root / name, (rep / name).read_bytes())
    if final is not None:
        info = json.loads((rep / files.MODEL_JSON).read_text())
        info = {**info, "model": f"repeat {representative} (the representative repeat; the stage serves "
                                 f"{files.FINAL}/)", "final_model": final}
        write_text_atomic(files.model_json, json.dumps(jsonable(info), indent=2) + "\n")
    if oof_csv is not None:
        write_text_atomic(files.oof_predictions, oof_csv)
    write_json_atomic(files.repeats_json, repeats)
    write_json_atomic(files.metrics, metrics)


def write_final(files: StageFiles, *, net: Network, model_json: dict[str, Any], history: Any, splits: str,
                training_images: dict[str, Any]) -> None:
    """A repeated stage's final model in ``files`` (``STAGE/final``): weights, history, the images it trained on
    (``splits.csv``, all ``train``; their content hashes), then ``model.json``, which marks it finished; its
    training checkpoint goes last. It has no ``metrics.json`` or ``predictions.csv``: it is never evaluated
    (every image it could be tested on, it trained on)."""
    save_weights_atomic(files.model, net.state_dict(), {"spec": json.dumps(net.spec)})
    write_json_atomic(files.history, history)
    write_splits(files.splits, splits)
    write_training_images(files, training_images)
    write_text_atomic(files.model_json, json.dumps(jsonable(model_json), indent=2) + "\n")
    if _distributed.is_writer():
        files.checkpoint.unlink(missing_ok=True)


def read_final(files: StageFiles, registry: Any = None) -> tuple[Network, dict[str, Any]] | None:
    """A finished final model (``STAGE/final``) and its ``model.json``; None when it must be trained (again):
    never finished, or a file of it is damaged."""
    try:
        info = json.loads(files.model_json.read_text())
        if not isinstance(info, dict) or info.get("model") != "final":
            return None
        json.loads(files.history.read_text())
        return load_network(files.model, registry), info
    except (OSError, ValueError, UserError):
        return None


def served(files: StageFiles) -> StageFiles:
    """The model folder a stage serves to ``mltl predict``, ``mltl export`` and the next stage: its final model
    (``final/``) where its ``model.json`` records one (``final_model``), else the stage (or repeat) itself."""
    try:
        info = json.loads(files.model_json.read_text())
    except (OSError, ValueError):
        return files
    return files.final if isinstance(info, dict) and info.get("final_model") else files


def prune_stage(files: StageFiles, keep: str) -> list[Path]:
    """What a finished stage no longer needs, removed (``[run] keep = "selected"``): every sweep variant's
    weights (the selected one's are the stage's or repeat's own ``model.safetensors``; each variant keeps its
    history, splits and ``variant.json``) and any training checkpoint left in it. Only once the stage's record
    (``metrics.json``) is on disk; ``keep = "all"`` removes nothing. Returns what was removed."""
    if keep == "all" or not _distributed.is_writer() or not files.metrics.is_file():
        return []
    removed: list[Path] = []
    for folder in (files, *files.repeats(), files.final):
        for path in (folder.checkpoint, *(p for v in folder.variants() for p in (v.model, v.checkpoint))):
            if path.is_file():
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


# ---------------------------------------------------------------- the images a model trained on

#: the digest of :func:`content_hash`: 8 bytes (16 hex digits), ample to recognise an image among millions
HASH_BYTES = 8


def content_hash(data: bytes) -> str:
    """BLAKE2b of ``data``, :data:`HASH_BYTES` long, in hex."""
    import hashlib

    return hashlib.blake2b(data, digest_size=HASH_BYTES).hexdigest()


def pixel_hash(image: np.ndarray) -> str:
    """The content hash of one prepared image: uint8 ``(C, H, W)`` at the model's input, its shape included."""
    arr = np.ascontiguousarray(image, dtype=np.uint8)
    return content_hash(repr(arr.shape).encode() + arr.tobytes())


def training_images_record(pixels: dict[str, list[str]], files: dict[str, list[str]], *, size: int,
                           channels: int) -> dict[str, Any]:
    """``training_images.json``: per role (``train``: trained on; ``val``: chose the model (selection, best
    epoch)) the sorted content hashes of the images' pixels at the model's input and, where the image is a
    file, of its bytes. No ids or file names: a hash says only whether a given image was among them."""
    return {
        "about": "content hashes of the images this model trained on (train) and was chosen on (val); "
                 "mltl predict warns when an input is one of them",
        "hash": f"BLAKE2b, {HASH_BYTES}-byte digest, hex; pixels: of repr((C, H, W)) + the uint8 pixels at the "
                f"model input (mltl.data.domain.prepare_images); bytes: of the file",
        "input": {"size": size, "channels": channels},
        "pixels": {role: sorted(set(h)) for role, h in pixels.items()},
        "bytes": {role: sorted(set(h)) for role, h in files.items()},
    }


def write_training_images(files: StageFiles, record: dict[str, Any]) -> None:
    """``training_images.json``, compact (no indentation: about 19 bytes per hash)."""
    write_text_atomic(files.training_images, json.dumps(jsonable(record), separators=(",", ":")) + "\n")


def read_training_images(files: StageFiles) -> tuple[dict[str, str], dict[str, str]] | None:
    """The ``training_images.json`` of a model folder as two maps, pixel hash -> role and file-bytes hash ->
    role (``train`` where an image is in both roles); None when the folder has none or it is unreadable."""
    try:
        record = json.loads(files.training_images.read_text())
        maps: list[dict[str, str]] = []
        for kind in ("pixels", "bytes"):
            out: dict[str, str] = {}
            for role in ("val", "train"):  # train last: it wins
                out.update(dict.fromkeys(record.get(kind, {}).get(role, []), role))
            maps.append(out)
        return maps[0], maps[1]
    except (OSError, ValueError, TypeError, AttributeError):
        return None


class Damaged(Exception):
    """A finished stage's file is damaged: the stage is finished again instead of trusted."""


def read_stage(files: StageFiles, name: str, *, swept: bool | None = None, registry: Any = None,
               network: bool = True) -> tuple[Any, Network | None]:
    """A finished stage as saved: its :class:`mltl.StageResult` and (with ``network``) its selected network.

    ``swept``: the stage is a sweep, so ``selection.json`` must be there (None: read it where it is). Every
    file a later stage or a report relies on is checked; :class:`Damaged` names the first damaged one."""
    from ..evaluation.results import StageResult

    try:
        what = files.metrics
        metrics = json.loads(what.read_text())
        classes = tuple(metrics["classes"])
        what = files.predictions
        test = read_predictions(what, "test", classes)
        if len(test) != metrics["n_test"]:
            raise ValueError(f"{len(test)} test rows, metrics.json says {metrics['n_test']}")
        for what in (files.model_json, files.history):
            json.loads(what.read_text())
        what = files.splits
        with open(what, newline="") as f:
            rows = list(csv.DictReader(f))
        if len(rows) != sum(metrics["n_images"].values()) or any(r.get("split") is None for r in rows):
            raise ValueError(f"{len(rows)} rows, metrics.json counts {sum(metrics['n_images'].values())} images")
        what = files.selection
        selection = json.loads(what.read_text()) if swept or (swept is None and what.is_file()) else None
        model = served(files)  # the final model of a repeated stage, else the stage's own
        if model != files:
            what = model.model_json
            info = json.loads(what.read_text())
            if not isinstance(info, dict) or info.get("model") != "final":
                raise ValueError("not the record of a final model")
        what = model.model
        net = load_network(what, registry) if network else None
    except (OSError, ValueError, KeyError, TypeError, UserError) as exc:
        raise Damaged(f"{what.relative_to(files.root).as_posix()} is damaged or missing ({str(exc).splitlines()[0][:200]})") from None
    result = StageResult(name=name, stage_dir=files.root, classes=classes, test=test, metrics=metrics,
                         selection=selection)
    return result, net


def finished_repeat(files: StageFiles) -> bool:
    try:
        m = json.loads(files.metrics.read_text())
        load_weights(files.model)
        return isinstance(m, dict) and "auc_macro" in m
    except (OSError, ValueError, UserError):
        return False


def copy_stage(src: Path, stage_dir: Path) -> None:
    """Copy a finished stage folder whole into a temporary folder, then rename it: a crash leaves no
    half-copied stage behind (and ``metrics.json``, which marks a stage finished, only ever with the rest).
    Weights are hard-linked where the file system allows, so a reused stage takes no second copy of them."""
    tmp = stage_dir.parent / f".{stage_dir.name}.reuse-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, copy_function=_link_weights_or_copy)
    shutil.rmtree(stage_dir, ignore_errors=True)
    tmp.replace(stage_dir)
