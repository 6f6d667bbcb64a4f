"""Classify new images with a trained stage, with the preprocessing it was trained with.

``model.json`` beside a stage's weights records the input size, channels and normalisation, and the
domain it was trained on (plugin and options, e.g. a CT window). A file is read by that domain's own
reader when its plugin registered one (``register(name, factory, read_file=...)``: DICOM with the
stage's window, a lesion crop, ...); otherwise it is decoded as the ``image-folder`` domain
decodes files (same channels, same resize). Then it is prepared and normalised exactly as in training.

``RUN_DIR/STAGE`` serves the stage's final model (``STAGE/final``) where a repeated protocol trained one
(:func:`mltl.running.rundir.served`), else the stage's selected model; ``STAGE/repeats/fold-2`` (or any folder
holding a ``model.json``) serves that model. An input that is byte- or pixel-identical (at the model's input)
to an image the model trained on, or was chosen on (its validation split), gets a warning: one line per such
input and a count (the model folder's ``training_images.json`` holds the content hashes of those images).

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
from ..running.rundir import (RunFiles, StageFiles, content_hash, guard_csv_cell, load_network, pixel_hash,
                              read_training_images, refuse_run_file, run_dir_of, served, write_text_atomic)
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
    #: how the model folder is named in messages: ``target/final``, ``target/repeats/fold-2``, ``target``
    name: str = ""
    #: the model's record from its ``model.json``: ``model`` ("final", "selected", ...), for a final model
    #: ``trained_on``, ``epochs``, ``epochs_rule``, ...
    record: dict = attrs.field(factory=dict)
    #: content hash -> role ("train" or "val") of the images the model trained or was chosen on, of their
    #: pixels at the model's input and of their files' bytes; None where the folder records none
    trained_pixels: dict[str, str] | None = None
    trained_bytes: dict[str, str] | None = None

    def read_file(self, path: Path) -> np.ndarray:
        if self.read is not None:
            return self.read(path)
        return read_image(path, channels=self.decode_channels, size=self.decode_size, who="predict")

    def seen(self, path: Path, prepared: np.ndarray) -> tuple[str, str] | None:
        """``(role, how)`` when the file at ``path``, whose image prepared at the model's input is ``prepared``
        (uint8 ``(C, H, W)``), is one the model trained on (role ``train``) or was chosen on (``val``): how is
        ``byte-identical`` or ``pixel-identical``. None otherwise, or where the model folder records nothing."""
        if self.trained_bytes:
            try:
                role = self.trained_bytes.get(content_hash(Path(path).read_bytes()))
            except OSError:
                role = None
            if role is not None:
                return role, "byte-identical"
        if self.trained_pixels:
            role = self.trained_pixels.get(pixel_hash(prepared))
            if role is not None:
                return role, "pixel-identical (at the model's input)"
        return None


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


def _model_name(folder: Path) -> str:
    run = run_dir_of(folder)
    try:
        return folder.resolve().relative_to(run).as_posix() if run is not None else folder.name
    except ValueError:
        return folder.name


def _trained_images(files: StageFiles, inp: InputConfig) -> tuple[dict[str, str] | None, dict[str, str] | None]:
    """The content hashes a model folder records of the images its model trained on (a sweep variant's: its
    stage's or repeat's, which trained on the same split); pixel hashes only when made at this input."""
    folders = [files]
    if files.root.parent.name == StageFiles.VARIANTS:
        folders.append(StageFiles(files.root.parent.parent))
    for folder in folders:
        found = read_training_images(folder)
        if found is None:
            continue
        pixels, files_ = found
        try:
            made_at = json.loads(folder.training_images.read_text()).get("input", {})
        except (OSError, ValueError, AttributeError):
            made_at = {}
        same_input = made_at.get("size") == inp.size and made_at.get("channels") == inp.channels
        return (pixels if same_input else None), files_
    return None, None


def load_stage(path: str | Path) -> TrainedStage:
    """``RUN_DIR/STAGE`` (its final model where it has one, else its selected model), ``RUN_DIR`` for its last
    finished stage, or any model folder of a stage (``STAGE/repeats/fold-2``, ``STAGE/final``)."""
    path = Path(path)
    files = StageFiles(path) if StageFiles(path).model_json.is_file() else last_finished_stage(path)
    model = served(files)
    if model != files and not model.model_json.is_file():
        repeats = files.repeats()
        raise UserError(f"{files.model_json} names its final model in {model.root}, which is missing; restore it "
                        f"from a copy of the run, or name a repeat's model instead"
                        + (f", e.g. {repeats[0].root}" if repeats else ""))
    files = model
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
    pixels, files_ = _trained_images(files, inp)
    record = {k: v for k, v in info.items() if k not in ("spec", "input", "input_note", "domain", "frozen")}
    return TrainedStage(network=net, input=inp, classes=net.classes, path=path,
                        decode_size=int(options.get("size") or inp.size),
                        decode_channels=int(options.get("channels", inp.channels)), domain=domain, read=read,
                        suffixes=suffixes if suffixes is not None else frozenset(IMAGE_SUFFIXES),
                        name=_model_name(path), record=record, trained_pixels=pixels, trained_bytes=files_)


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

    An input the model trained on (or was chosen on: its validation split), byte-identical or pixel-identical
    at the model's input (:meth:`TrainedStage.seen`), is logged as a warning, one line each, and their count
    after the last input.
    """
    if not isinstance(stage, TrainedStage):
        stage = load_stage(stage)
    if batch_size < 1:
        raise UserError(f"predict: batch size must be at least 1, got {batch_size}")
    net = stage.network.to(device)
    batch: list[Path] = []
    seen = {"train": 0, "val": 0, "all": 0}

    def flush() -> Iterator[tuple[Path, np.ndarray]]:
        arrays = [stage.read_file(p) for p in batch]
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:  # a reader that keeps the file's own size: bring each to the input first
            arrays = [prepare_images(a[None], size=stage.input.size, channels=stage.input.channels)[0].numpy()
                      for a in arrays]
        arrays = np.stack(arrays)
        x = prepare_images(arrays, size=stage.input.size, channels=stage.input.channels)
        for path, prepared in zip(batch, x.numpy()):
            found = stage.seen(path, prepared)
            if found is not None:
                role, how = found
                seen[role] += 1
                log.warning("%s is %s to an image %s %s; its probabilities are not an independent estimate",
                            path, how, stage.name or "the model",
                            "trained on" if role == "train" else "was chosen on (its validation split)")
        seen["all"] += len(batch)
        yield from zip(list(batch), predict_proba(net, x.to(device), stage.input))
        batch.clear()

    for path in iter_images(inputs, stage.suffixes):
        batch.append(path)
        if len(batch) == batch_size:
            yield from flush()
    if batch:
        yield from flush()
    if seen["train"] or seen["val"]:
        what = ("trained on" if not seen["val"] else "was chosen on (its validation split)" if not seen["train"]
                else f"trained on ({seen['train']}) or was chosen on ({seen['val']}, its validation split)")
        log.warning("%d of %d inputs are images %s %s (listed above); measure the model on images it never saw",
                    seen["train"] + seen["val"], seen["all"], stage.name or "the model", what)


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
