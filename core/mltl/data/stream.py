"""Where a stage's decoded images live: resident on the device, or streamed from host memory in batches.

:func:`load_images` turns a domain's uint8 images into what the training loop reads:

- **resident** (the fast path): the prepared ``(N, C, size, size)`` uint8 tensor fits the device memory
  budget, so it is made once, chunk by chunk (the source is never copied whole), and kept on the device;
  batches are indexed on the device.
- **streamed**: it does not fit. The images stay on the host as a :class:`HostImages` view and every batch
  is gathered on the host, prepared, pinned (CUDA) and copied with ``non_blocking``, by a background
  thread that keeps a few batches ahead of the training loop. When the prepared images fit the host
  budget they are prepared once on the host; otherwise each batch is resized as it is gathered, straight
  from the domain's array, which may be a memory-mapped ``.npy`` file (``np.load(path, mmap_mode="r")``,
  e.g. from the decode cache), so a source of a million images is never loaded whole.

Budgets (``[run]``): ``device_memory_budget_gb`` (default: half the free memory of the CUDA device, from
``torch.cuda.mem_get_info``; on the CPU the host budget) and ``host_memory_budget_gb`` (default: half of
the memory available, ``MemAvailable`` in ``/proc/meminfo``). A streamed run trains on exactly the same
numbers as a resident one: the same images in the same order with the same augmentation.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from .domain import prepare_images

log = logging.getLogger(__name__)

CHUNK = 1024
PREFETCH = 3  # batches the loader thread keeps ready


class HostImages:
    """A lazy view of a domain's images on the host: rows ``rows`` of ``source`` (``(N, H, W)`` or
    ``(N, C, H, W)`` uint8, possibly an ``np.memmap``), prepared to ``(channels, size, size)`` when read.

    ``prepared``: the source already has the final size and channels (no per-batch work but the gather).
    ``device``: where batches go. Indexing with an index array or tensor gives a sub-view (no copy).
    """

    def __init__(self, source: np.ndarray | torch.Tensor, rows: np.ndarray, *, size: int, channels: int,
                 device: torch.device, prepared: bool = False) -> None:
        self.source, self.rows = source, np.asarray(rows, dtype=np.int64)
        self.size, self.channels, self.device, self.prepared = size, channels, device, prepared

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.rows), self.channels, self.size, self.size)

    def __getitem__(self, idx) -> HostImages:
        if isinstance(idx, torch.Tensor):
            idx = idx.cpu().numpy()
        return HostImages(self.source, self.rows[idx], size=self.size, channels=self.channels,
                          device=self.device, prepared=self.prepared)

    def read(self, positions: np.ndarray | slice) -> torch.Tensor:
        """The images at ``positions`` of this view, prepared, as a CPU uint8 tensor ``(b, C, size, size)``."""
        rows = self.rows[positions]
        if isinstance(self.source, torch.Tensor):  # prepared once in host memory
            return self.source[torch.from_numpy(rows)]
        # gather in file order (faster on a memory map), then restore the batch's order
        order = np.argsort(rows, kind="stable")
        block = np.empty((len(rows), *self.source.shape[1:]), dtype=np.uint8)
        block[order] = self.source[rows[order]]
        if self.prepared:
            return torch.from_numpy(block)
        return prepare_images(block, size=self.size, channels=self.channels)

    def batches(self, batch_positions: Sequence[np.ndarray | slice]) -> Iterator[torch.Tensor]:
        """The batches at ``batch_positions`` on ``device``, read and copied ahead by a background thread."""
        return _Prefetch(self, batch_positions)

    def chunks(self, batch_size: int) -> Iterator[torch.Tensor]:
        return self.batches([slice(i, i + batch_size) for i in range(0, len(self), batch_size)])


class _Prefetch:
    def __init__(self, images: HostImages, batch_positions: Sequence[np.ndarray | slice]) -> None:
        self.n = len(batch_positions)
        self.q: queue.Queue = queue.Queue(maxsize=PREFETCH)
        self.stop = threading.Event()
        dev = images.device
        pin = dev.type == "cuda"

        def work() -> None:
            try:
                for pos in batch_positions:
                    if self.stop.is_set():
                        return
                    x = images.read(pos)
                    if pin:
                        x = x.pin_memory()
                    if not self._put((x.to(dev, non_blocking=pin), x)):  # keep the pinned source alive
                        return
                self._put(None)
            except BaseException as exc:  # handed to the training loop
                self._put(exc)

        self.thread = threading.Thread(target=work, name="mltl-stream", daemon=True)
        self.thread.start()

    def _put(self, item) -> bool:
        while not self.stop.is_set():  # the consumer may stop early (an exception in the training loop)
            try:
                self.q.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def __iter__(self) -> _Prefetch:
        return self

    def __next__(self) -> torch.Tensor:
        item = self.q.get()
        if item is None:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item[0]

    def close(self) -> None:
        self.stop.set()
        self.thread.join()

    def __del__(self) -> None:
        self.stop.set()


def host_available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def budgets(device: torch.device, device_gb: float | None, host_gb: float | None) -> tuple[float, float]:
    """(device budget, host budget) in bytes, from the config or measured."""
    if host_gb is not None:
        host = host_gb * 2**30
    else:
        avail = host_available_bytes()
        host = 0.5 * avail if avail is not None else float("inf")
    if device_gb is not None:
        dev = device_gb * 2**30
    elif device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        dev = 0.5 * free
    else:
        dev = host
    return dev, host


def prepared_bytes(images: np.ndarray, size: int, channels: int) -> int:
    return int(len(images)) * channels * size * size


def load_images(images: np.ndarray, *, size: int, channels: int, device: torch.device,
                device_budget_gb: float | None = None, host_budget_gb: float | None = None
                ) -> torch.Tensor | HostImages:
    """The domain's images prepared for the chain's input, resident on ``device`` when they fit its budget,
    else a streamed :class:`HostImages` view (see the module's docstring)."""
    need = prepared_bytes(images, size, channels)
    dev_budget, host_budget = budgets(device, device_budget_gb, host_budget_gb)
    if need <= dev_budget:
        out = torch.empty((len(images), channels, size, size), dtype=torch.uint8, device=device)
        for i in range(0, len(images), CHUNK):
            out[i:i + CHUNK] = prepare_images(np.array(images[i:i + CHUNK]), size=size, channels=channels).to(device)
        return out
    rows = np.arange(len(images))
    if device.type != "cpu" and need <= host_budget:
        host = torch.empty((len(images), channels, size, size), dtype=torch.uint8)
        for i in range(0, len(images), CHUNK):
            host[i:i + CHUNK] = prepare_images(np.array(images[i:i + CHUNK]), size=size, channels=channels)
        log.info("streaming %d images (%.2f GB prepared) from host memory: over the device budget of %.2f GB",
                 len(images), need / 2**30, dev_budget / 2**30)
        return HostImages(host, rows, size=size, channels=channels, device=device, prepared=True)
    src_ready = images.ndim == 4 and images.shape[1:] == (channels, size, size)
    log.info("streaming %d images (%.2f GB prepared) from the domain's array, prepared per batch: over the "
             "device budget of %.2f GB%s", len(images), need / 2**30, dev_budget / 2**30,
             "" if device.type == "cpu" else f" and the host budget of {host_budget / 2**30:.2f} GB")
    return HostImages(images, rows, size=size, channels=channels, device=device, prepared=src_ready)


def is_streamed(x) -> bool:
    return isinstance(x, HostImages)
