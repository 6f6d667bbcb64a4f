"""Export a trained stage as a deployable model: ONNX or TorchScript, with its preprocessing metadata.

The exported model takes **uint8** images shaped ``(N, channels, size, size)`` -- decoded and resized to the
stage's input size, exactly what :func:`mltl.data.domain.prepare_images` produces -- and returns **class
probabilities** ``(N, classes)`` (float32, rows sum to one). The normalisation ``(pixel / 255 - mean) / std``
and the softmax are inside the model, so a deployment cannot get them wrong; the batch size is free.

What the model cannot contain is how a raw file becomes those pixels (decoding, the domain's own
preprocessing such as a CT window, the resize). That is recorded beside it: in the ONNX file's
``metadata_props`` (key ``mltl``, plus flat keys for the common fields), in the TorchScript archive's extra
file ``mltl.json``, and in a sidecar ``<output>.json`` for tools that read neither.

ONNX export uses torch's ``torch.export``-based exporter (``dynamo=True``, needs ``onnxscript``) and
falls back to the TorchScript-based exporter where that fails, so it works on torch 2.11 through 2.14.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Literal

import attrs
import torch
from torch import nn

from ..config import InputConfig
from ..errors import UserError
from ..running.rundir import StageFiles, refuse_run_file, write_bytes_atomic, write_text_atomic
from ..training.train import normalisation
from ..version import __version__

log = logging.getLogger("mltl.deploy.export")

FORMATS = ("onnx", "torchscript")
SUFFIX = {"onnx": ".onnx", "torchscript": ".pt"}
INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"
METADATA_VERSION = 1
ONNX_OPSET = 18


class ProbabilityModel(nn.Module):
    """A trained network wrapped for deployment: uint8 ``(N, C, H, W)`` in, softmax probabilities out.

    The normalisation is the training loop's own (:func:`mltl.normalise`), written out so the
    exported graph holds two constants instead of a call into mltl.
    """

    def __init__(self, network: nn.Module, inp: InputConfig) -> None:
        super().__init__()
        self.network = network
        mean, std = normalisation(inp)
        if len(mean) == 1 and len(std) == 1:
            self.scale = 1.0 / (255.0 * std[0])
            self.shift = mean[0] / std[0]
        else:  # per channel, shaped (C, 1, 1) to broadcast over (N, C, H, W)
            m = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
            s = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
            self.register_buffer("scale", 1.0 / (255.0 * s))
            self.register_buffer("shift", m / s)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(torch.float32) * self.scale - self.shift
        return torch.softmax(self.network(x), dim=1)


@attrs.frozen
class ExportResult:
    """Where the model and its sidecar metadata were written, and the metadata itself."""

    path: Path
    sidecar: Path
    format: str
    exporter: str
    metadata: dict[str, Any]


def _one_or_list(values: tuple[float, ...]) -> float | list[float]:
    return values[0] if len(values) == 1 else list(values)


def export_metadata(stage: Any) -> dict[str, Any]:
    """Everything a deployment needs to turn a file into the model's input, and to read its output."""
    info = json.loads(StageFiles(stage.path).model_json.read_text())
    weights = StageFiles(stage.path).model
    inp = stage.input
    return {
        "mltl_export": METADATA_VERSION,
        "mltl_version": __version__,
        "stage": getattr(stage, "name", "") or stage.path.name,
        "source": str(stage.path),
        # which model: "final" (a repeated stage's, trained on all non-test data), "selected", or a repeat's
        "model": {k: info[k] for k in ("model", "variant", "trained_on", "trained_on_images", "epochs", "epochs_rule")
                  if k in info},
        "weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
        "classes": list(stage.classes),
        "input": {
            "name": INPUT_NAME,
            "dtype": "uint8",
            "layout": "NCHW",
            "channels": inp.channels,
            "size": inp.size,
            "mean": _one_or_list(normalisation(inp)[0]),  # one number, or one per channel
            "std": _one_or_list(normalisation(inp)[1]),
            "normalisation": "inside the model: (pixel / 255 - mean) / std",
            "batch": "any",
        },
        "output": {"name": OUTPUT_NAME, "dtype": "float32", "meaning": "class probabilities (softmax), "
                   "one column per entry of classes"},
        "decode": {
            "domain": info.get("domain", {}),
            "size": stage.decode_size,
            "channels": stage.decode_channels,
            "resize": "antialiased bilinear to input.size; grey to RGB by replication, RGB to grey by "
                      "ITU-R BT.601 luma (mltl.data.domain.prepare_images)",
            "python": "mltl.load_stage(STAGE_DIR).read_file(path) reads a file exactly like this",
        },
        "network": info.get("spec", {}),
    }


def _onnx_modules() -> tuple[Any, Any]:
    try:
        import onnx
    except ImportError:
        raise UserError("mltl export --format onnx needs the onnx package: pip install onnx "
                        "(and onnxruntime to run the exported model)") from None
    try:
        import onnxscript
    except ImportError:
        onnxscript = None
    return onnx, onnxscript


@contextlib.contextmanager
def _quiet_exporter():
    """torch's exporters print progress lines and deprecation warnings; keep the CLI's output clean."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _export_onnx(model: nn.Module, example: torch.Tensor, exporter: str) -> tuple[bytes, str]:
    """The ONNX model as bytes, and which exporter made it."""
    onnx, onnxscript = _onnx_modules()
    order = {"auto": ["dynamo", "torchscript"], "dynamo": ["dynamo"], "torchscript": ["torchscript"]}[exporter]
    if onnxscript is None and "dynamo" in order:
        if exporter == "dynamo":
            raise UserError("the dynamo ONNX exporter needs onnxscript: pip install onnxscript")
        order = ["torchscript"]
    errors = []
    with tempfile.TemporaryDirectory(prefix="mltl-export-") as tmp:
        target = os.path.join(tmp, "model.onnx")
        for name in order:
            try:
                with _quiet_exporter():
                    if name == "dynamo":
                        batch = torch.export.Dim("batch", min=1)
                        program = torch.onnx.export(
                            model, (example,), dynamo=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                            dynamic_shapes={"images": {0: batch}}, opset_version=ONNX_OPSET, external_data=False,
                            verbose=False)
                        program.save(target)
                    else:
                        torch.onnx.export(
                            model, (example,), target, dynamo=False, input_names=[INPUT_NAME],
                            output_names=[OUTPUT_NAME], opset_version=17,
                            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
                proto = onnx.load(target)
                onnx.checker.check_model(proto)
                return proto.SerializeToString(), name
            except Exception as exc:  # try the other exporter; report both when neither works
                log.info("ONNX exporter %s failed: %s", name, exc)
                errors.append(f"{name} exporter: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    raise UserError("ONNX export failed (" + "; ".join(errors) + "); try --format torchscript")


def _with_onnx_metadata(data: bytes, meta: dict[str, Any]) -> bytes:
    onnx, _ = _onnx_modules()
    proto = onnx.load_from_string(data)
    flat = {
        "mltl": json.dumps(meta, sort_keys=True),
        "classes": json.dumps(meta["classes"]),
        "input_dtype": meta["input"]["dtype"],
        "input_size": str(meta["input"]["size"]),
        "input_channels": str(meta["input"]["channels"]),
        "mean": repr(meta["input"]["mean"]),
        "std": repr(meta["input"]["std"]),
        "domain": json.dumps(meta["decode"]["domain"], sort_keys=True),
    }
    del proto.metadata_props[:]
    for key, value in flat.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "mltl"
    proto.producer_version = __version__
    proto.doc_string = (f"mltl stage {meta['stage']}: uint8 images (N, {meta['input']['channels']}, "
                        f"{meta['input']['size']}, {meta['input']['size']}) -> probabilities of {meta['classes']}")
    return proto.SerializeToString()


def _export_torchscript(model: nn.Module, example: torch.Tensor, meta: dict[str, Any]) -> tuple[bytes, str]:
    with _quiet_exporter():
        try:
            scripted = torch.jit.trace(model, (example,), check_trace=False)
            how = "torch.jit.trace"
        except Exception as exc:  # a backbone with data-dependent control flow
            log.info("torch.jit.trace failed (%s); trying torch.jit.script", exc)
            try:
                scripted = torch.jit.script(model)
            except Exception as exc2:
                raise UserError(f"TorchScript export failed: trace: {exc}; script: {exc2}; "
                                f"try --format onnx") from None
            how = "torch.jit.script"
        meta = {**meta, "exporter": f"{how}, torch {torch.__version__}"}
        buf = io.BytesIO()
        torch.jit.save(scripted, buf, _extra_files={"mltl.json": json.dumps(meta, sort_keys=True)})
    return buf.getvalue(), how


def export(stage: Any, format: Literal["onnx", "torchscript"] = "onnx", out: str | Path | None = None, *,
           exporter: Literal["auto", "dynamo", "torchscript"] = "auto") -> ExportResult:
    """Export a trained stage (``RUN_DIR/STAGE``, ``RUN_DIR`` for its last stage, or a loaded
    :class:`mltl.deploy.predict.TrainedStage`) as ONNX or TorchScript.

    ``out`` defaults to ``STAGE/model.onnx`` or ``STAGE/model.pt``; a sidecar ``<out>.json`` holds the
    metadata. Both are written atomically, and never over a run's own files (UserError). ``exporter`` picks
    the ONNX exporter (``auto``: the ``torch.export``-based one, then the TorchScript-based one if that fails).
    """
    from .predict import TrainedStage, load_stage

    if format not in FORMATS:
        raise UserError(f'export: unknown format "{format}"; use onnx or torchscript')
    if not isinstance(stage, TrainedStage):
        stage = load_stage(stage)
    path = Path(out) if out is not None else stage.path / f"model{SUFFIX[format]}"
    if path.is_dir():
        raise UserError(f"export: --out {path} is a folder; give a file name, e.g. {path / ('model' + SUFFIX[format])}")
    sidecar = path.with_name(path.name + ".json")
    refuse_run_file(path, "export: --out")
    refuse_run_file(sidecar, f"export: --out {path}: its metadata file")
    meta = export_metadata(stage)
    net = copy.deepcopy(stage.network).to("cpu").eval().requires_grad_(False)  # the caller's copy stays as it is
    model = ProbabilityModel(net, stage.input).eval()
    # two images, so that no size-1 dimension is specialised into the graph
    example = torch.randint(0, 256, (2, stage.input.channels, stage.input.size, stage.input.size), dtype=torch.uint8,
                            generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if format == "onnx":
            data, how = _export_onnx(model, example, exporter)
            meta = {**meta, "exporter": f"torch.onnx ({how}), torch {torch.__version__}"}
            data = _with_onnx_metadata(data, meta)
        else:
            data, how = _export_torchscript(model, example, meta)
            meta = {**meta, "exporter": f"{how}, torch {torch.__version__}"}
    write_bytes_atomic(path, data)
    write_text_atomic(sidecar, json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return ExportResult(path=path, sidecar=sidecar, format=format, exporter=how, metadata=meta)


__all__ = ["ExportResult", "ProbabilityModel", "export", "export_metadata", "FORMATS"]
