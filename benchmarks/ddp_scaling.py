#!/usr/bin/env python
"""One process against ``torchrun --nproc-per-node N``: the same stage, the same global batch, timed per epoch.

Runs a one-stage chain (fractal source, GFE-II, SGD, no augmentation) twice through the real CLI:
``python -m mltl run`` and ``python -m torch.distributed.run --standalone --nproc-per-node N -m mltl run``,
both with ``--device`` as given (``cuda``: NCCL, one GPU per process; ``cpu``: gloo). The global batch is
the same (``train.batch_size``), so the two runs train the same model (tests/test_ddp.py checks that);
only the time differs. Per-epoch wall times come from each run's ``history.json``; the first epoch (CUDA
start-up, DDP's first all-reduce buckets) is left out of the median. Prints one JSON line per run and a
summary line with the speed-up ``speedup = t_1 / t_N`` per epoch (ideal: N). On the CPU every process runs
one intra-op thread (1 core against N cores); that rehearses the script, it is not a scaling result.

    python benchmarks/ddp_scaling.py --nproc 2 --device cuda                      # a machine with 2+ GPUs
    python benchmarks/ddp_scaling.py --nproc 2 --device cpu --images 240 --size 64 --epochs 3   # CPU rehearsal
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_common as bc  # noqa: E402

CONFIG = """
[run]
name = "ddp-scaling"
seed = 0

[input]
size = {size}
channels = {channels}

[[stages]]
name = "source"
domain = {{ plugin = "fractal", classes = 5, images_per_class = {per_class}, seed = 0, channels = {channels} }}
backbone = "{backbone}"
split = {{ val = 0.1, test = 0.1, protocol = "holdout" }}
train = {{ epochs = {epochs}, batch_size = {batch}, optimizer = "sgd", lr = 0.01, schedule = "constant" }}
"""


def _run(cmd: list[str], out: Path, timeout: float, threads: int | None) -> dict:
    env = {**os.environ, "MLTL_QUIET": "1"}
    if threads:  # on the CPU: every process (torchrun's workers too) gets this many intra-op threads
        env["OMP_NUM_THREADS"] = str(threads)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd + ["--out", str(out)], capture_output=True, text=True, env=env, timeout=timeout)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    hist = json.loads((out / "source" / "history.json").read_text())
    metrics = json.loads((out / "source" / "metrics.json").read_text())
    secs = [r["seconds"] for r in hist]
    steady = secs[1:] or secs
    n_train = metrics["n_images"]["train"]
    return {"epoch_seconds": [round(s, 4) for s in secs], "median_epoch_seconds": round(statistics.median(steady), 4),
            "images_per_s": round(n_train / statistics.median(steady), 2), "n_train": n_train,
            "train_seconds": round(metrics["train_seconds"], 3), "wall_seconds": round(wall, 2),
            "val_auc": metrics["val"].get("auc_macro"), "val_loss": metrics["val"].get("loss")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=2, help="processes for torchrun (default 2)")
    ap.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    ap.add_argument("--backbone", default="gfe-2")
    ap.add_argument("--size", type=int, default=150)
    ap.add_argument("--channels", type=int, default=3, choices=[1, 3])
    ap.add_argument("--images", type=int, default=5000, help="images in the source domain (5 classes)")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch", type=int, default=128, help="global batch size")
    ap.add_argument("--timeout", type=float, default=600)
    args = ap.parse_args(argv)

    import torch

    if args.device == "cuda" and torch.cuda.device_count() < args.nproc:
        bc.emit({"kind": "skipped", "reason": f"{torch.cuda.device_count()} CUDA device(s), {args.nproc} needed"})
        return 0
    work = Path(tempfile.mkdtemp(prefix="mltl-ddp-scaling-"))
    cfg = work / "ddp.toml"
    cfg.write_text(CONFIG.format(size=args.size, channels=args.channels, per_class=max(3, args.images // 5),
                                 backbone=args.backbone, epochs=args.epochs, batch=args.batch))
    dev = torch.device(args.device)
    bc.emit({"kind": "config", "nproc": args.nproc, "backbone": args.backbone, "size": args.size,
             "images": args.images, "epochs": args.epochs, "global_batch": args.batch, **bc.env_info(dev)})
    base = [sys.executable, "-m", "mltl", "run", str(cfg), "--device", args.device]
    threads = 1 if args.device == "cpu" else None
    one = _run(base, work / "one", args.timeout, threads)
    bc.emit({"kind": "measurement", "processes": 1, **one})
    dist = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc),
            "-m", "mltl", "run", str(cfg), "--device", args.device]
    many = _run(dist, work / "ddp", args.timeout, threads)
    bc.emit({"kind": "measurement", "processes": args.nproc, **many})
    bc.emit({"kind": "summary", "processes": args.nproc,
             "speedup": round(one["median_epoch_seconds"] / many["median_epoch_seconds"], 3),
             "images_per_s": {"1": one["images_per_s"], str(args.nproc): many["images_per_s"]},
             "val_loss_difference": None if one["val_loss"] is None or many["val_loss"] is None
             else abs(one["val_loss"] - many["val_loss"]), **bc.env_info(dev)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
