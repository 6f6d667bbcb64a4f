"""Helpers shared by the benchmarks in this folder (not part of the mltl package).

- :func:`env_info`: device, torch/CUDA versions, thread count, for every JSON line;
- :func:`peak_memory`: peak GPU memory (CUDA) or peak RSS (CPU) of this process;
- :func:`train_flops_per_image`, :func:`bf16_peak`, :func:`achieved`: training FLOPs per image (torch's
  FlopCounterMode), the GPU's dense BF16 peak (:data:`BF16_DENSE_PEAK_TFLOPS`, with sources) and the
  achieved TFLOP/s and fraction of that peak;
- :func:`ensure_timm_backbone`: a registered mltl backbone for a timm model (the installed "timm" backbone
  when a plugin provides one, else one registered in-process with :func:`mltl.register_plugin`);
- :func:`phantom_folder`: an image folder of CT phantom PNGs (for machines without ``../shared/data``);
- :class:`FitProbe`: times what :func:`mltl.training.train.fit` does per epoch (validation, best-state copy) from the
  outside, by wrapping module attributes of ``mltl.training.train`` for the duration of a measurement; the core is
  not edited.
"""

from __future__ import annotations

import copy as _copy
import hashlib
import inspect
import json
import os
import platform
import resource
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

import mltl
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_KIDNEY = REPO.parent / "shared" / "data" / "ct_kidney"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp"}


# ---------------------------------------------------------------- environment


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch.cuda.is_available() is False")
    return dev


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def env_info(dev: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else _cpu_model(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    try:
        info["loadavg_1min"] = round(os.getloadavg()[0], 2)  # other tenants of a shared machine show here
    except OSError:
        pass
    return info


def peak_memory(dev: torch.device) -> dict[str, Any]:
    """Peak GPU memory allocated (and reserved) by torch since the last ``torch.cuda.reset_peak_memory_stats``
    (CUDA; the caller resets it at the start of each measurement), or, on the CPU, ``peak_gpu_mem_mb: null``
    with the reason, and the peak resident set size of this process and of its reaped children (Linux
    reports kilobytes)."""
    if dev.type == "cuda":
        return {"peak_gpu_mem_mb": round(torch.cuda.max_memory_allocated(dev) / 2**20, 1),
                "peak_gpu_mem_reserved_mb": round(torch.cuda.max_memory_reserved(dev) / 2**20, 1)}
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"peak_gpu_mem_mb": None, "peak_gpu_mem_note": f"not measured: {dev.type} run, no CUDA memory",
            "peak_rss_mb": round(own, 1), "children_peak_rss_mb": round(kids, 1)}


# ---------------------------------------------------------------- FLOPs and the hardware peak

# Dense (no 2:4 structured sparsity) BF16 Tensor Core peaks, TFLOP/s, per GPU at the boost clock, keyed by
# the name torch.cuda.get_device_name reports. NVIDIA's datasheets print the BF16 Tensor Core figure "with
# sparsity" (marked with an asterisk; 1,979 for H100/H200 SXM, 1,513 for H100 PCIe, 624 for A100); the dense
# peak is half of it, which is what a dense convolution or matmul can reach.
BF16_DENSE_PEAK_TFLOPS: dict[str, dict[str, Any]] = {
    "NVIDIA H100 80GB HBM3": {
        "model": "H100 SXM5 80GB", "tflops": 989.0,
        "source": "NVIDIA H100 Tensor Core GPU Datasheet, table 'Technical Specifications', column H100 SXM, "
                  "row 'BF16 Tensor Core' 1,979 TFLOPS with sparsity -> 989 dense "
                  "(https://resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet)"},
    "NVIDIA H100 PCIe": {
        "model": "H100 PCIe 80GB", "tflops": 756.0,
        "source": "NVIDIA H100 Tensor Core GPU Datasheet, column H100 PCIe, row 'BF16 Tensor Core' 1,513 TFLOPS "
                  "with sparsity -> 756 dense "
                  "(https://resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet)"},
    "NVIDIA H200": {
        "model": "H200 SXM 141GB (same GH100 compute as H100 SXM)", "tflops": 989.0,
        "source": "NVIDIA H200 Tensor Core GPU datasheet / product page, column H200 SXM, row 'BF16 Tensor "
                  "Core' 1,979 TFLOPS with sparsity -> 989 dense (https://www.nvidia.com/en-us/data-center/h200/)"},
    "NVIDIA A100-SXM4-80GB": {
        "model": "A100 SXM4 80GB", "tflops": 312.0,
        "source": "NVIDIA A100 Tensor Core GPU Datasheet, row 'BF16 Tensor Core' 312 TFLOPS (624 with sparsity) "
                  "(https://www.nvidia.com/en-us/data-center/a100/)"},
    "NVIDIA A100-SXM4-40GB": {
        "model": "A100 SXM4 40GB", "tflops": 312.0,
        "source": "NVIDIA A100 Tensor Core GPU Datasheet, row 'BF16 Tensor Core' 312 TFLOPS (624 with sparsity) "
                  "(https://www.nvidia.com/en-us/data-center/a100/)"},
    "NVIDIA A100-PCIE-40GB": {
        "model": "A100 PCIe 40GB", "tflops": 312.0,
        "source": "NVIDIA A100 Tensor Core GPU Datasheet, row 'BF16 Tensor Core' 312 TFLOPS (624 with sparsity) "
                  "(https://www.nvidia.com/en-us/data-center/a100/)"},
    "NVIDIA A100 80GB PCIe": {
        "model": "A100 PCIe 80GB", "tflops": 312.0,
        "source": "NVIDIA A100 Tensor Core GPU Datasheet, row 'BF16 Tensor Core' 312 TFLOPS (624 with sparsity) "
                  "(https://www.nvidia.com/en-us/data-center/a100/)"},
}

FLOPS_NOTE = ("training FLOPs per image = FLOPs that torch.utils.flop_counter.FlopCounterMode counts in one "
              "forward + backward (no optimizer step) of one batch at the benchmark's size and dtype path, "
              "divided by the batch size: matmul/addmm/bmm/convolution (and attention) FLOPs only, 2 per "
              "multiply-add, forward and backward (weight and input gradients as autograd computes them; none "
              "for the input image); normalisation, activations, pooling, the loss and the optimizer are not counted")


def bf16_peak(dev: torch.device) -> dict[str, Any]:
    """The device's dense BF16 Tensor Core peak from :data:`BF16_DENSE_PEAK_TFLOPS`:
    ``{"peak_bf16_dense_tflops": float | None, "peak_source": str | None, "peak_note": str}``."""
    if dev.type != "cuda":
        return {"peak_bf16_dense_tflops": None, "peak_source": None,
                "peak_note": f"no dense BF16 tensor peak for a {dev.type} run: fraction of peak not computed"}
    name = torch.cuda.get_device_name(dev)
    row = BF16_DENSE_PEAK_TFLOPS.get(name)
    if row is None:
        return {"peak_bf16_dense_tflops": None, "peak_source": None,
                "peak_note": f"device {name!r} is not in bench_common.BF16_DENSE_PEAK_TFLOPS (add its dense BF16 "
                             f"Tensor Core peak from NVIDIA's datasheet, half of the 'with sparsity' figure)"}
    return {"peak_bf16_dense_tflops": row["tflops"], "peak_source": row["source"],
            "peak_note": f"matched {name!r} exactly: {row['model']}, dense BF16 Tensor Core peak at boost clock"}


def train_flops_per_image(net: torch.nn.Module, *, batch: int, channels: int, size: int, n_classes: int,
                          dev: torch.device) -> dict[str, Any]:
    """Training FLOPs per image of ``net`` (see :data:`FLOPS_NOTE`), counted on one forward + backward of a
    random batch, the way the benchmark's loops run it (bf16 autocast and channels_last on CUDA). Gradients
    are cleared afterwards; the weights are not changed."""
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    cuda = dev.type == "cuda"
    was_training = net.training
    net.train()
    g = torch.Generator().manual_seed(0)
    x = torch.rand((batch, channels, size, size), generator=g).to(dev)
    y = (torch.arange(batch) % max(n_classes, 1)).to(dev)
    if cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    t = time.perf_counter()
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
            logits = net(x)
        F.cross_entropy(logits.float(), y).backward()
    total = int(counter.get_total_flops())
    net.zero_grad(set_to_none=True)
    net.train(was_training)
    return {"train_flops_per_image": total / batch, "flops_counted_batch": batch,
            "flops_count_seconds": round(time.perf_counter() - t, 3), "flops_note": FLOPS_NOTE}


def achieved(flops_per_image: float | None, images_per_s: float | None, peak: dict[str, Any]) -> dict[str, Any]:
    """Achieved TFLOP/s (FLOPs per image x images/s) and its fraction of the dense BF16 peak (null with the
    reason when there is no peak)."""
    if not flops_per_image or not images_per_s:
        return {"achieved_tflops": None, "fraction_of_bf16_peak": None, "fraction_note": "no FLOP count or images/s"}
    tf = flops_per_image * images_per_s / 1e12
    out: dict[str, Any] = {"achieved_tflops": round(tf, 4)}
    if peak.get("peak_bf16_dense_tflops"):
        out["fraction_of_bf16_peak"] = round(tf / peak["peak_bf16_dense_tflops"], 5)
    else:
        out["fraction_of_bf16_peak"] = None
        out["fraction_note"] = peak.get("peak_note")
    return out


def tune_malloc(mmap_threshold: int = 32 << 20, trim_threshold: int = 1 << 30) -> bool:
    """glibc only: serve allocations up to ``mmap_threshold`` from the heap and keep up to ``trim_threshold``
    of freed memory, so that a training step's big activation buffers are not unmapped and faulted in
    again every step (see docs/performance.md). True when applied."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        return bool(libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(libc.mallopt(M_TRIM_THRESHOLD, trim_threshold))
    except (OSError, AttributeError):
        return False


def minor_faults() -> int:
    """Minor page faults of this process so far (0 where getrusage does not count them)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def emit(obj: dict[str, Any]) -> None:
    print(json.dumps(obj, default=_json_default), flush=True)


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, Path):
        return str(o)
    return str(o)


def median(xs: list[float]) -> float:
    return float(np.median(np.asarray(xs, dtype=np.float64))) if xs else float("nan")


# ---------------------------------------------------------------- timm backbone


_TIMM_PLUGIN_NAME = "mltl-bench-timm"
_TIMM_BACKBONE = "bench-timm"


def timm_trunk(model: str = "resnet18", *, in_chans: int, image_size: int):
    """A timm model (random init, no classifier) as an mltl Trunk; ResNets get groups C1..C5."""
    import timm

    from mltl import Trunk

    net = timm.create_model(model, pretrained=False, num_classes=0, in_chans=in_chans)
    names = dict(net.named_children())
    if all(k in names for k in ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")):
        groups = {"C1": ("conv1", "bn1"), "C2": ("layer1",), "C3": ("layer2",), "C4": ("layer3",),
                  "C5": ("layer4",)}
    else:
        groups = {"C1": tuple(n for n, m in names.items() if any(True for _ in m.parameters()))}
    return Trunk(module=net, feature_dim=int(net.num_features), groups=groups)


class _TimmPlugin:
    @mltl.hookimpl
    def register_backbones(self, register):
        register(_TIMM_BACKBONE, timm_trunk, "timm model as an mltl backbone (benchmarks only)")


def ensure_timm_backbone(model: str = "resnet18") -> tuple[str, dict[str, Any], str]:
    """(backbone name, options, where it came from) for ``model`` as an mltl backbone.

    Uses an installed ``timm`` backbone when a plugin registers one and it accepts a model-name option;
    otherwise registers :func:`timm_trunk` in-process.
    """
    reg = mltl.get_registry()
    if "timm" in reg.names("backbone"):
        factory = reg.get("backbone", "timm").factory
        params = inspect.signature(factory).parameters
        for key in ("model", "model_name", "name", "arch", "architecture", "variant"):
            if key in params:
                try:
                    reg.create("backbone", "timm", {key: model}, extra={"in_chans": 1, "image_size": 32})
                    return "timm", {key: model}, "installed plugin"
                except Exception:  # noqa: BLE001 - fall back to our own registration
                    break
    if _TIMM_BACKBONE not in reg.names("backbone"):
        mltl.register_plugin(_TimmPlugin(), name=_TIMM_PLUGIN_NAME)
    return _TIMM_BACKBONE, {"model": model}, "registered in-process by the benchmark"


# ---------------------------------------------------------------- data


def list_folder(root: Path) -> tuple[list[str], list[str], np.ndarray]:
    """(classes, relative file paths, labels), listed exactly like mltl's image-folder domain."""
    root = Path(root)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    rel, labels = [], []
    for c, name in enumerate(classes):
        files = sorted(p for p in (root / name).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        rel += [f.relative_to(root).as_posix() for f in files]
        labels += [c] * len(files)
    return classes, rel, np.asarray(labels, dtype=np.int64)


def stratified_val(labels: np.ndarray, val_frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, val indices): ``val_frac`` of each class (at least one) to validation."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        k = max(1, int(round(val_frac * len(idx))))
        val += idx[:k].tolist()
        train += idx[k:].tolist()
    return np.sort(np.asarray(train, dtype=np.int64)), np.sort(np.asarray(val, dtype=np.int64))


def subset_folder(src: Path, per_class: int, seed: int) -> Path:
    """A temp folder of symbolic links to ``per_class`` randomly chosen images of each class of ``src``."""
    src = Path(src).resolve()
    classes, rel, labels = list_folder(src)
    if np.bincount(labels).max() <= per_class:  # nothing to leave out
        return src
    key = hashlib.sha256(f"{src}|{per_class}|{seed}".encode()).hexdigest()[:10]
    out = Path(tempfile.gettempdir()) / f"mltl-bench-subset-{src.name}-{per_class}-{seed}-{key}"
    marker = out / ".complete"
    if marker.exists():
        return out
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        idx = np.flatnonzero(labels == c)
        chosen = np.sort(rng.choice(idx, size=min(per_class, len(idx)), replace=False))
        (out / name).mkdir(parents=True, exist_ok=True)
        for i in chosen:
            link = out / rel[i]
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                link.symlink_to(src / rel[i])
    marker.touch()
    return out


def _phantom_one(task: tuple[str, int, int, int, int, float, float, str]) -> None:
    from PIL import Image

    from mltl_ct import phantom

    name, class_index, i, size, seed, level, width, path = task
    rng = np.random.default_rng(np.random.SeedSequence([seed, class_index, i]))
    img = phantom.apply_window(phantom.slice_hu(name, size, rng), level, width)
    Image.fromarray(img, mode="L").save(path)


def phantom_folder(classes: tuple[str, ...] = ("normal", "cyst", "calculi"), per_class: int = 300,
                   size: int = 256, seed: int = 0, root: Path | None = None) -> Path:
    """A folder of CT-phantom PNGs, one sub-folder per class; reused when already complete.

    The images are byte-identical to ``mltl_ct.phantom.generate(classes, per_class, size, seed)`` (same
    per-image seeds), rendered in parallel processes.
    """
    from mltl_ct import phantom

    base = Path(root) if root else Path(tempfile.gettempdir())
    out = base / f"mltl-bench-phantom-{'-'.join(classes)}-{per_class}x{size}-s{seed}"
    marker = out / ".complete"
    if marker.exists():
        return out
    level, width = phantom.WINDOWS["abdomen"]
    tasks = []
    for name in classes:
        (out / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            path = out / name / f"{name}_{i:05d}.png"
            if not path.exists():
                tasks.append((name, phantom.CLASSES.index(name), i, size, seed, level, width, str(path)))
    if tasks:
        import multiprocessing as mp

        procs = max(1, min(len(tasks), os.cpu_count() or 1, 16))
        t0 = time.perf_counter()
        if procs == 1:
            for t in tasks:
                _phantom_one(t)
        else:
            with mp.get_context("spawn" if sys.platform == "darwin" else "fork").Pool(procs) as pool:
                pool.map(_phantom_one, tasks, chunksize=max(1, len(tasks) // (4 * procs)))
        print(f"generated {len(tasks)} phantom PNGs ({size}x{size}) in {out} "
              f"in {time.perf_counter() - t0:.1f} s with {procs} processes", file=sys.stderr, flush=True)
    marker.touch()
    return out


# ---------------------------------------------------------------- probing fit


class FitProbe:
    """Per-epoch timing of :func:`mltl.training.train.fit`, from the outside.

    Inside the ``with`` block, functions that fit looks up in the ``mltl.training.train`` module are wrapped with
    timers: ``predict_proba`` and ``classification_metrics`` (the per-epoch validation),
    ``_checkpoint_state`` and ``_save_checkpoint`` (the resumable training checkpoint, when fit is given
    one), ``copy`` is replaced by a namespace whose ``deepcopy`` is timed (the best-state copy), and
    ``time`` by one whose clocks stop between :meth:`pause` and :meth:`resume`. Pass
    :meth:`on_epoch` to ``fit`` (or call it from your own callback); call :meth:`start` right before
    ``fit``. Each epoch record holds its wall time (from :meth:`start` or the previous epoch's end) and the
    seconds spent in each wrapped part during it. The overhead is a few ``perf_counter`` calls per epoch.
    An attribute fit no longer has is left alone, so the probe survives changes to fit.
    """

    TIMED = {"predict_proba": "val_predict", "classification_metrics": "val_metrics",
             "_checkpoint_state": "checkpoint_state", "_save_checkpoint": "checkpoint"}
    KEYS = ("val_predict", "val_metrics", "checkpoint_state", "checkpoint", "best_copy")

    def __init__(self, dev: torch.device) -> None:
        self.dev = dev
        self.epochs: list[dict[str, float]] = []
        self._acc = dict.fromkeys(self.KEYS, 0.0)
        self._counts = dict.fromkeys(self.KEYS, 0)
        self._last = time.perf_counter()
        self._saved: dict[str, Any] = {}
        self._paused = 0.0
        self._pause_start: float | None = None

    def pause(self) -> None:
        """Stop fit's clock (e.g. while the driver runs another loop's epoch): time that passes until
        :meth:`resume` is hidden from fit, so its time-based checkpoint cadence is that of a real run."""
        self._pause_start = time.perf_counter()

    def resume(self) -> None:
        if self._pause_start is not None:
            self._paused += time.perf_counter() - self._pause_start
            self._pause_start = None

    def _timed(self, fn, key: str, sync_after: bool = False):
        probe = self

        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                out = fn(*a, **k)
                if sync_after:
                    sync(probe.dev)
                return out
            finally:
                probe._acc[key] += time.perf_counter() - t
                probe._counts[key] += 1

        return wrapper

    def __enter__(self) -> FitProbe:
        import mltl.training.train as T

        self._T = T
        for name, key in self.TIMED.items():
            if hasattr(T, name):
                self._saved[name] = getattr(T, name)
                setattr(T, name, self._timed(getattr(T, name), key))
        if hasattr(T, "time"):
            probe = self
            clock = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith("_")})
            clock.monotonic = lambda: time.monotonic() - probe._paused
            clock.perf_counter = lambda: time.perf_counter() - probe._paused
            self._saved["time"] = T.time
            T.time = clock
        if hasattr(T, "copy"):
            shim = types.SimpleNamespace(**{k: getattr(_copy, k) for k in dir(_copy) if not k.startswith("_")})
            shim.deepcopy = self._timed(_copy.deepcopy, "best_copy", sync_after=True)
            self._saved["copy"] = T.copy
            T.copy = shim
        return self

    def __exit__(self, *exc: Any) -> None:
        for name, value in self._saved.items():
            setattr(self._T, name, value)

    def start(self) -> None:
        sync(self.dev)
        self._last = time.perf_counter()

    def on_epoch(self, epoch: int, row: dict[str, Any]) -> None:
        now = time.perf_counter()  # fit has already synchronised (it read the loss and the val probabilities)
        rec: dict[str, float] = {"epoch": epoch, "wall": now - self._last,
                                 "fit_row_seconds": float(row.get("seconds", float("nan")))}
        rec.update(self._acc)
        rec["checkpoint"] += rec.pop("checkpoint_state")
        rec["best_copies"] = self._counts["best_copy"]
        # a checkpoint is written after on_epoch: it is charged to the next epoch (its wall time holds it)
        rec["checkpoints"] = self._counts["checkpoint"]
        self.epochs.append(rec)
        self._acc = dict.fromkeys(self.KEYS, 0.0)
        self._counts = dict.fromkeys(self.KEYS, 0)
        self._last = time.perf_counter()
