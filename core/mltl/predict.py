"""Classify new images with a trained stage, with the preprocessing it was trained with.

``model.json`` beside a stage's weights records the input size, channels and normalisation, and the
domain it was trained on. Image files are decoded as the ``image-folder`` domain decodes them (same
channels, same resize), then prepared and normalised exactly as in training.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import attrs
import numpy as np

from .builtins import IMAGE_SUFFIXES, read_image
from .config import InputConfig
from .domain import prepare_images
from .errors import UserError
from .network import Network
from .plugins import get_registry
from .train import predict_proba

log = logging.getLogger("mltl.predict")


@attrs.frozen(eq=False)
class TrainedStage:
    network: Network
    input: InputConfig
    classes: tuple[str, ...]
    decode_size: int
    decode_channels: int
    path: Path


def load_stage(path: str | Path) -> TrainedStage:
    """``RUN_DIR/STAGE``, or ``RUN_DIR`` for its last finished stage."""
    from .chain import _load_network

    path = Path(path)
    if not (path / "model.json").is_file():
        stages = [p for p in sorted(path.glob("*/model.json"), key=lambda p: p.stat().st_mtime)]
        if not stages:
            raise UserError(f"{path}: neither a stage directory (no model.json) nor a run directory with a finished stage")
        path = stages[-1].parent
    try:
        info = json.loads((path / "model.json").read_text())
        inp = InputConfig(**info["input"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path / 'model.json'}: damaged ({exc})") from None
    net = _load_network(path / "model.safetensors", get_registry())
    domain = info.get("domain", {})
    options = domain.get("options", {})
    if domain.get("plugin") != "image-folder":
        log.warning("stage %s was trained on domain %r; new image files are decoded as the image-folder domain "
                    "does (grey or RGB, resized), which may differ from that domain's own preprocessing",
                    path.name, domain.get("plugin"))
    return TrainedStage(network=net, input=inp, classes=net.classes, path=path,
                        decode_size=int(options.get("size") or inp.size),
                        decode_channels=int(options.get("channels", inp.channels)))


def iter_images(inputs: Sequence[str | Path]) -> Iterator[Path]:
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            yield from sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            yield p
        else:
            raise UserError(f"{p}: no such file or folder")


def predict(stage: TrainedStage | str | Path, inputs: Sequence[str | Path], *, device: str = "cpu",
            batch_size: int = 256) -> Iterator[tuple[Path, np.ndarray]]:
    """(path, class probabilities) for every image, streamed in batches of ``batch_size``."""
    if not isinstance(stage, TrainedStage):
        stage = load_stage(stage)
    net = stage.network.to(device)
    batch: list[Path] = []

    def flush() -> Iterator[tuple[Path, np.ndarray]]:
        arrays = np.stack([read_image(p, channels=stage.decode_channels, size=stage.decode_size, who="predict")
                           for p in batch])
        x = prepare_images(arrays, size=stage.input.size, channels=stage.input.channels).to(device)
        yield from zip(list(batch), predict_proba(net, x, stage.input))
        batch.clear()

    for path in iter_images(inputs):
        batch.append(path)
        if len(batch) == batch_size:
            yield from flush()
    if batch:
        yield from flush()


def predictions_csv(rows: Sequence[tuple[Path, np.ndarray]], classes: Sequence[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "predicted"] + [f"p_{c}" for c in classes])
    for path, p in rows:
        w.writerow([str(path), classes[int(np.argmax(p))]] + [repr(float(v)) for v in p])
    return buf.getvalue()


__all__ = ["TrainedStage", "load_stage", "predict", "predictions_csv"]
