"""Classify new images with a trained stage, with the preprocessing it was trained with.

``model.json`` beside a stage's weights records the input size, channels and normalisation, and the
domain it was trained on (plugin and options, e.g. a CT window). A file is read by that domain's own
reader when its plugin registered one (``register(name, factory, read_file=...)``: DICOM with the
stage's window, a lesion crop, ...); otherwise it is decoded as the ``image-folder`` domain
decodes files (same channels, same resize). Then it is prepared and normalised exactly as in training.

A domain plugin gives ``mltl predict`` its reader like this::

    def read_my_file(path, *, image_size, window="abdomen"):   # options: those of the factory
        ...  # -> uint8 (H, W) or (C, H, W), as the domain's images

    def my_domain(root, window="abdomen", *, image_size=64): ...

    @mltl.hookimpl
    def register_domains(register):
        register("my-domain", my_domain, read_file=read_my_file,
                 suffixes=(".dcm",))                           # optional: what a folder is searched for
"""

from __future__ import annotations

import csv
import inspect
import io
import json
import logging
import tomllib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import attrs
import numpy as np

from ..builtins import IMAGE_SUFFIXES, read_image
from ..config import InputConfig
from ..data.domain import prepare_images
from ..errors import UserError
from ..networks.network import Network
from ..plugins import get_registry
from ..running.rundir import RunFiles, StageFiles, guard_csv_cell, load_network, refuse_run_file, write_text_atomic
from ..training.train import predict_proba

log = logging.getLogger("mltl.deploy.predict")


@attrs.frozen(eq=False)
class TrainedStage:
    """A stage's selected network, loaded from its run directory, with how it reads new files.

    ``read(path)`` turns one file into the uint8 image the stage's domain would have produced;
    ``suffixes`` are the file endings a folder is searched for.
    """

    network: Network
    input: InputConfig
    classes: tuple[str, ...]
    decode_size: int
    decode_channels: int
    path: Path
    domain: dict = attrs.field(factory=dict)
    read: Callable[[Path], np.ndarray] | None = None
    suffixes: frozenset[str] = frozenset(IMAGE_SUFFIXES)

    def read_file(self, path: Path) -> np.ndarray:
        if self.read is not None:
            return self.read(path)
        return read_image(path, channels=self.decode_channels, size=self.decode_size, who="predict")


def _domain_reader(plugin: str | None, options: dict, image_size: int, stage_name: str
                   ) -> tuple[Callable[[Path], np.ndarray] | None, frozenset[str] | None]:
    """The domain plugin's own file reader (registered as ``read_file``), bound to the stage's options."""
    if plugin is None:
        return None, None
    try:
        item = get_registry().get("domain", plugin)
    except UserError:
        log.warning("stage %s was trained on domain %r, which is not installed here; new files are decoded as "
                    "the image-folder domain does (install that plugin for its own preprocessing)", stage_name, plugin)
        return None, None
    reader = item.read_file
    if reader is None:
        return None, None
    params = inspect.signature(reader).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    kwargs = {k: v for k, v in options.items() if takes_any or k in params}
    if "image_size" in params or takes_any:
        kwargs["image_size"] = image_size

    def read(path: Path) -> np.ndarray:
        try:
            arr = np.asarray(reader(Path(path), **kwargs))
        except UserError:
            raise
        except Exception as exc:
            raise UserError(f"predict: the {plugin} domain cannot read {path}: {exc}; "
                            f"remove or replace the file") from None
        if arr.dtype != np.uint8 or arr.ndim not in (2, 3):
            raise TypeError(f"{plugin}: read_file returned {arr.dtype} {arr.shape}, not uint8 (H, W) or (C, H, W)")
        return arr

    return read, item.suffixes


def last_finished_stage(run_dir: Path) -> StageFiles:
    """The last stage, in the chain's order (``config.toml``), that has a model: what ``mltl predict RUN_DIR``
    and ``mltl export RUN_DIR`` serve. File times do not decide (a resume may repair an earlier stage)."""
    run = RunFiles(run_dir)
    if not run.config.is_file():
        raise UserError(f"{run_dir}: neither a stage directory (no {StageFiles.MODEL_JSON}) nor a run directory "
                        f"(no {run.config.name}); name a stage directory, e.g. runs/<name>/target")
    try:
        names = [s["name"] for s in tomllib.loads(run.config.read_text())["stages"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{run.config}: damaged ({exc}); name a stage directory instead, e.g. "
                        f"{run_dir}/target") from None
    finished = [run.stage(n) for n in names if run.stage(n).model_json.is_file()]
    if not finished:
        raise UserError(f"{run_dir}: no stage of this run has finished (none of {', '.join(names)} holds "
                        f"{StageFiles.MODEL_JSON})")
    return finished[-1]


def load_stage(path: str | Path) -> TrainedStage:
    """``RUN_DIR/STAGE``, or ``RUN_DIR`` for its last finished stage."""
    path = Path(path)
    files = StageFiles(path) if StageFiles(path).model_json.is_file() else last_finished_stage(path)
    path = files.root
    try:
        info = json.loads(files.model_json.read_text())
        inp = InputConfig(**info["input"])
        domain = info.get("domain", {})
        options = domain.get("options", {})
        if not isinstance(options, dict) or not isinstance(domain.get("plugin", ""), (str, type(None))):
            raise TypeError("its domain table holds no plugin name and options")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UserError(f"{files.model_json}: damaged ({exc}); restore it from a copy of the run, or re-run "
                        f"the stage") from None
    net = load_network(files.model, get_registry())
    read, suffixes = _domain_reader(domain.get("plugin"), options, inp.size, path.name)
    if read is None and domain.get("plugin") not in (None, "image-folder"):
        log.info("stage %s was trained on domain %r, which has no file reader; new image files are decoded as "
                 "the image-folder domain does (grey or RGB, resized)", path.name, domain.get("plugin"))
    return TrainedStage(network=net, input=inp, classes=net.classes, path=path,
                        decode_size=int(options.get("size") or inp.size),
                        decode_channels=int(options.get("channels", inp.channels)), domain=domain, read=read,
                        suffixes=suffixes if suffixes is not None else frozenset(IMAGE_SUFFIXES))


def iter_images(inputs: Sequence[str | Path], suffixes: frozenset[str] | set[str] = frozenset(IMAGE_SUFFIXES)
                ) -> Iterator[Path]:
    """Files named, and the files in folders (recursively) whose ending is in ``suffixes`` ("" = none)."""
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            yield from sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith(".")
                              and f.suffix.lower() in suffixes)
        elif p.is_file():
            yield p
        else:
            raise UserError(f"{p}: no such file or folder")


def predict(stage: TrainedStage | str | Path, inputs: Sequence[str | Path], *, device: str = "cpu",
            batch_size: int = 256) -> Iterator[tuple[Path, np.ndarray]]:
    """Class probabilities for image files, with the preprocessing the stage was trained with.

    ``stage``: ``RUN_DIR/STAGE``, ``RUN_DIR`` (its last finished stage) or a :func:`load_stage` result.
    ``inputs``: files and folders (searched recursively for the stage's domain's file types). Yields
    ``(path, probabilities)`` per file, probabilities a float64 array ordered as ``stage.classes``;
    files are read and classified in batches of ``batch_size``, so a large folder streams.
    """
    if not isinstance(stage, TrainedStage):
        stage = load_stage(stage)
    if batch_size < 1:
        raise UserError(f"predict: batch size must be at least 1, got {batch_size}")
    net = stage.network.to(device)
    batch: list[Path] = []

    def flush() -> Iterator[tuple[Path, np.ndarray]]:
        arrays = [stage.read_file(p) for p in batch]
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:  # a reader that keeps the file's own size: bring each to the input first
            arrays = [prepare_images(a[None], size=stage.input.size, channels=stage.input.channels)[0].numpy()
                      for a in arrays]
        arrays = np.stack(arrays)
        x = prepare_images(arrays, size=stage.input.size, channels=stage.input.channels).to(device)
        yield from zip(list(batch), predict_proba(net, x, stage.input))
        batch.clear()

    for path in iter_images(inputs, stage.suffixes):
        batch.append(path)
        if len(batch) == batch_size:
            yield from flush()
    if batch:
        yield from flush()


def predictions_csv(rows: Sequence[tuple[Path, np.ndarray]], classes: Sequence[str]) -> str:
    """path, predicted class, one probability per class; a path a spreadsheet would read as a formula gets a
    leading ``'`` (:func:`mltl.running.rundir.guard_csv_cell`)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "predicted"] + [f"p_{c}" for c in classes])
    for path, p in rows:
        w.writerow([guard_csv_cell(str(path)), classes[int(np.argmax(p))]] + [repr(float(v)) for v in p])
    return buf.getvalue()


def check_csv_path(path: str | Path) -> None:
    """UserError when ``--csv`` names one of a run's own files (``STAGE/predictions.csv``, ...)."""
    refuse_run_file(Path(path), "predict: --csv")


def write_predictions_csv(path: str | Path, rows: Sequence[tuple[Path, np.ndarray]], classes: Sequence[str]) -> None:
    """:func:`predictions_csv` written atomically to ``path``, never over a run's own files."""
    check_csv_path(path)
    write_text_atomic(Path(path), predictions_csv(rows, classes))


__all__ = ["TrainedStage", "check_csv_path", "load_stage", "predict", "predictions_csv", "write_predictions_csv"]
