"""Per-epoch data cost on an image folder: decoding every epoch vs the decode cache (mltl.data.cache).

Prints JSON lines; the last one is the summary.

* ``imagefolder``: what a typical PyTorch user writes: ``torchvision.datasets.ImageFolder`` with
  ``Grayscale``, ``Resize``, ``ToTensor``, ``Normalize`` in a ``DataLoader`` (batch 64, shuffled,
  ``--workers`` processes): every epoch opens, decodes and resizes every file again. Timed over ``--epochs``
  epochs, after one warm-up epoch.
* ``mltl-cold``: ``image-folder`` domain load with an empty cache folder: hash + decode + resize every file
  once, and write the disk cache.
* ``mltl-disk``: the same load in a new run (memory cleared): files hashed, the stack read from disk, no
  decoding.
* ``mltl-memory``: the same load again in the same process (the in-memory layer).
* ``mltl-epoch``: one epoch over the cached images as the chain feeds them to training: uint8 tensor ->
  shuffled batches of 64 -> float, normalised.

Usage: python benchmarks/decode_cache.py [--data ../shared/data/ct_kidney] [--size 64] [--epochs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def emit(row: dict) -> None:
    row["loadavg_1min"] = os.getloadavg()[0]
    print(json.dumps(row), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "ct_kidney"))
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: stable on a shared machine)")
    args = ap.parse_args()
    if not Path(args.data).is_dir():
        sys.exit(f"no image folder at {args.data}")
    cache_root = tempfile.mkdtemp(prefix="mltl-bench-cache-")
    os.environ["MLTL_CACHE_DIR"] = cache_root

    import numpy as np
    import torch
    from torchvision import datasets, transforms

    from mltl.data import cache
    from mltl.builtins import image_folder_domain
    from mltl.data.domain import prepare_images

    torch.set_num_threads(args.threads)
    env = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
           "data": args.data, "size": args.size}

    # before: decode every epoch
    tf = transforms.Compose([transforms.Grayscale(1), transforms.Resize((args.size, args.size)),
                             transforms.ToTensor(), transforms.Normalize([0.5], [0.25])])
    ds = datasets.ImageFolder(args.data, transform=tf)
    loader = torch.utils.data.DataLoader(ds, batch_size=64, shuffle=True, num_workers=args.workers,
                                         persistent_workers=args.workers > 0)
    times = []
    for epoch in range(args.epochs + 1):
        t0 = time.perf_counter()
        n = sum(len(y) for _, y in loader)
        if epoch:
            times.append(time.perf_counter() - t0)
    before = statistics.median(times)
    emit({"loop": "imagefolder", "images": n, "workers": args.workers, "seconds_per_epoch": before,
          "epochs": times, **env})

    # after: decode once
    cache.clear_memory()
    t0 = time.perf_counter()
    dom = image_folder_domain(args.data, image_size=args.size)
    cold = time.perf_counter() - t0
    emit({"loop": "mltl-cold", "images": len(dom), "seconds": cold, **env})
    cache.clear_memory()
    t0 = time.perf_counter()
    dom2 = image_folder_domain(args.data, image_size=args.size)
    disk = time.perf_counter() - t0
    assert np.array_equal(dom.images, dom2.images)
    emit({"loop": "mltl-disk", "images": len(dom2), "seconds": disk, **env})
    t0 = time.perf_counter()
    image_folder_domain(args.data, image_size=args.size)
    memory = time.perf_counter() - t0
    emit({"loop": "mltl-memory", "images": len(dom2), "seconds": memory, **env})

    x = prepare_images(dom.images, size=args.size, channels=1)
    times = []
    for _ in range(args.epochs):
        t0 = time.perf_counter()
        for idx in torch.randperm(len(x)).split(64):
            batch = (x[idx].float() / 255 - 0.5) / 0.25
        times.append(time.perf_counter() - t0)
    epoch = statistics.median(times)
    emit({"loop": "mltl-epoch", "images": len(x), "seconds_per_epoch": epoch, "batch_shape": list(batch.shape), **env})
    emit({"summary": True, "imagefolder_s_per_epoch": round(before, 3), "mltl_cold_load_s": round(cold, 3),
          "mltl_disk_load_s": round(disk, 3), "mltl_memory_load_s": round(memory, 3),
          "mltl_s_per_epoch": round(epoch, 4), "epoch_speedup": round(before / epoch, 1),
          "decodes_for_1500_epochs": {"imagefolder": 1500 * n, "mltl_first_run": n, "mltl_later_runs": 0}, **env})


if __name__ == "__main__":
    main()
