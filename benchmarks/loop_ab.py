#!/usr/bin/env python
"""In-process A/B timings of mltl's training loop, alternating the two sides epoch by epoch.

Two comparisons, each printing one JSON line (median seconds of the second epoch of each fit, and the
ratio ``b_over_a``; below 1 means B is faster):

``--before COMMIT``  ``mltl.training.train.fit`` as it was in git commit COMMIT (A) against the working tree's (B),
                     on the same resident tensors: did a change slow the hot loop? (The old module is
                     loaded from ``git show COMMIT:core/mltl/training/train.py``, or ``core/mltl/train.py``
                     for commits before the core was grouped into sub-packages, next to the current
                     package; its flat relative imports such as ``from .metrics import`` are pointed at
                     the modules' current homes.)
``--before-file F``  the same, with the old ``train.py`` read from the file F (a machine without ``.git``,
                     such as the GPU machine: ``benchmarks/gpu.sh --prepare`` writes the file beforehand).
``--stream``         the same fit on resident tensors (A) against a streamed domain (B): images kept on the
                     host at their stored size and gathered, resized and copied per batch by the loader
                     thread (``mltl.data.stream``, forced with a tiny device budget).

    python benchmarks/loop_ab.py --before 7c6fb01 --threads 1
    python benchmarks/loop_ab.py --before f389b13 --backbone gfe-1 --head 256,128 --optimizer adamw --lr 0.0005 \
        --batch-size 16                                 # the demo target's network and optimizer
    python benchmarks/loop_ab.py --before 7c6fb01 --augment hflip,vflip,shift --threads 1
    python benchmarks/loop_ab.py --stream --stored-size 256 --threads 1
    python benchmarks/loop_ab.py --before HEAD --device cuda --size 150 --channels 3 --data FOLDER --per-class 0

Data: an image folder (default: 64 images per class of ../shared/data/ct_kidney, else a generated CT
phantom folder), GFE-II (``--backbone``), batch 64, SGD (``--optimizer``), 10% validation; alternating order every round. Each fit runs
``--epochs`` epochs (default 2) and the median of its epochs after the first is its time. On CUDA (``--device
cuda``) the images are resident on the GPU (or streamed from the host with ``--stream``), fit uses bf16
autocast and channels_last as always, and each side's peak GPU memory is reported.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import bench_common as bc  # noqa: E402


TRAIN_PATHS = ("core/mltl/training/train.py", "core/mltl/train.py", "mltl/train.py")
SUBPACKAGES = ("data", "networks", "training", "running", "evaluation", "deploy", "cli")


def train_source(commit: str) -> tuple[str, str]:
    """(source of fit's module at ``commit``, its path there), trying the layouts the repository has had."""
    for rel in TRAIN_PATHS:
        res = subprocess.run(["git", "-C", str(ROOT), "show", f"{commit}:{rel}"], capture_output=True, text=True)
        if res.returncode == 0:
            return res.stdout, rel
    raise SystemExit(f"--before {commit}: none of {', '.join(TRAIN_PATHS)} exists at that commit")


def _alias_flat_modules(src: str) -> None:
    """An old flat ``mltl/train.py`` imports ``from .metrics import ...``; point each such module that no
    longer exists at ``mltl.<name>`` to its current home ``mltl.<subpackage>.<name>`` (sys.modules aliases)."""
    import importlib

    names = set(re.findall(r"^\s*from \.(\w+) import", src, re.M))
    for line in re.findall(r"^\s*from \. import ([\w, ]+)", src, re.M):
        names |= {n.strip() for n in line.split(",") if n.strip()}
    for name in sorted(names):
        full = f"mltl.{name}"
        if full in sys.modules or importlib.util.find_spec(full) is not None:
            continue
        for pkg in SUBPACKAGES:
            try:
                sys.modules[full] = importlib.import_module(f"mltl.{pkg}.{name}")
                break
            except ModuleNotFoundError:
                continue


def _old_train(src: str, label: str):
    """Load ``src`` (an earlier ``train.py``) as a module beside the current package."""
    flat = not re.search(r"^\s*from \.\.\w", src, re.M)  # ``from ..config`` = the sub-package layout
    package = "mltl" if flat else "mltl.training"
    if flat:
        _alias_flat_modules(src)
    path = Path(tempfile.mkdtemp(prefix="mltl-ab-")) / "old_train.py"
    path.write_text(src)
    name = f"{package}._train_before"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = package
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    mod.LABEL = label
    return mod


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", metavar="COMMIT", help="compare fit at this git commit (A) with the current one (B)")
    ap.add_argument("--before-file", metavar="FILE", help="compare fit from this earlier train.py (A) with the "
                                                          "current one (B)")
    ap.add_argument("--before-label", help="name of the --before-file side in the output (default: the file)")
    ap.add_argument("--stream", action="store_true", help="compare resident (A) with streamed (B) data")
    ap.add_argument("--data", help="image folder; default: 64 per class of ../shared/data/ct_kidney or a phantom")
    ap.add_argument("--per-class", type=int, default=64,
                    help="random images per class of --data (symlinks; default 64; 0 = all)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--channels", type=int, default=1, choices=[1, 3])
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--stored-size", type=int, default=256, help="--stream: size the domain keeps its images at")
    ap.add_argument("--augment", default="", help="train.augment items, comma-separated (both sides)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--epochs", type=int, default=2, help="epochs per fit; the median of those after the first "
                                                          "is the fit's time (default 2)")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--backbone", default="gfe-2", choices=["gfe-1", "gfe-2"])
    ap.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"])
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--head", default="", help="the head's dense widths, comma-separated (the demo's: 256,128)")
    args = ap.parse_args(argv)
    if sum(map(bool, (args.before, args.before_file, args.stream))) != 1:
        ap.error("give exactly one of --before COMMIT, --before-file FILE or --stream")
    if args.epochs < 2:
        ap.error("--epochs must be at least 2 (the first epoch of a fit is not timed)")

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import mltl
    from mltl.builtins import image_folder_domain
    from mltl.config import InputConfig, TrainConfig
    from mltl.data.stream import load_images
    from mltl.networks.network import HeadSpec, build_network, make_spec
    from mltl.training import train as current

    dev = bc.resolve_device(args.device)
    shared = ROOT.parent / "shared" / "data" / "ct_kidney"
    if args.data:
        root = Path(args.data)
    else:
        root = shared if shared.is_dir() else bc.phantom_folder(per_class=max(args.per_class, 64), size=256)
    if args.per_class:
        root = bc.subset_folder(root, args.per_class, 0)
    chans = args.channels
    stored = args.stored_size if args.stream else args.size
    dom = image_folder_domain(str(root), channels=chans, image_size=stored)
    y = torch.from_numpy(dom.labels)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    n_val = max(len(dom.classes), len(y) // 10)
    tr, va = perm[n_val:], perm[:n_val]
    aug = tuple(a for a in args.augment.split(",") if a)
    inp = InputConfig(size=args.size, channels=chans)
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, schedule="constant", augment=aug,
                      optimizer=args.optimizer, lr=args.lr)
    head = HeadSpec(dense=tuple(int(w) for w in args.head.split(",") if w), dropout=0.5 if args.head else 0.0)
    resident = load_images(dom.images, size=args.size, channels=chans, device=dev)
    y = y.to(dev)
    tr_d, va_d = tr.to(dev), va.to(dev)
    if args.before or args.before_file:
        if args.before:
            src, rel = train_source(args.before)
            label = f"fit@{args.before} ({rel})"
        else:
            src = Path(args.before_file).read_text()
            label = f"fit from {args.before_label or args.before_file}"
        sides = {"a": (_old_train(src, label), resident), "b": (current, resident)}
        names = {"a": label, "b": "fit (working tree)"}
    else:
        streamed = load_images(dom.images, size=args.size, channels=chans, device=dev, device_budget_gb=1e-9)
        sides = {"a": (current, resident), "b": (current, streamed)}
        how = ("prepared once in host memory, gathered and copied per batch"
               if isinstance(getattr(streamed, "source", None), torch.Tensor)
               else f"read from the domain's {stored} px array and resized per batch")
        names = {"a": f"resident on {dev.type}", "b": f"streamed: {how}"}

    times: dict[str, list[float]] = {"a": [], "b": []}
    peak_mb: dict[str, list[float]] = {"a": [], "b": []}
    for r in range(args.rounds):
        for side in ("a", "b") if r % 2 == 0 else ("b", "a"):
            mod, x = sides[side]
            torch.manual_seed(0)
            net = build_network(make_spec(args.backbone, {}, chans, args.size, head, dom.classes), mltl.get_registry())
            net.to(dev)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
                torch.cuda.reset_peak_memory_stats(dev)
            res = mod.fit(net, mod.TensorData(x[tr_d], y[tr_d]), mod.TensorData(x[va_d], y[va_d]), cfg,
                          inp, classes=dom.classes, seed=1)
            times[side].append(statistics.median(h["seconds"] for h in res.history[1:]))
            if dev.type == "cuda":
                peak_mb[side].append(round(torch.cuda.max_memory_allocated(dev) / 2**20, 1))
            del net
    a, b = statistics.median(times["a"]), statistics.median(times["b"])
    out = {"kind": "summary", "a": names["a"], "b": names["b"], "backbone": args.backbone, "head": list(head.dense),
           "optimizer": args.optimizer, "lr": args.lr, "augment": list(aug), "n_train": len(tr),
           "n_val": len(va), "size": args.size, "channels": chans, "batch_size": args.batch_size,
           "epochs_per_fit": args.epochs, "rounds": args.rounds, "data": str(root),
           "a_epoch_seconds": [round(t, 4) for t in times["a"]],
           "b_epoch_seconds": [round(t, 4) for t in times["b"]], "a_median": round(a, 4),
           "b_median": round(b, 4), "b_over_a": round(b / a, 3),
           "a_images_per_s": round(len(tr) / a, 1), "b_images_per_s": round(len(tr) / b, 1),
           "note": "epoch time from fit's history (training + per-epoch validation); b_over_a < 1: B is faster"}
    if dev.type == "cuda":
        out["a_peak_gpu_mem_mb"], out["b_peak_gpu_mem_mb"] = max(peak_mb["a"]), max(peak_mb["b"])
    else:
        out["a_peak_gpu_mem_mb"] = out["b_peak_gpu_mem_mb"] = None
        out["peak_gpu_mem_note"] = f"not measured: {dev.type} run, no CUDA memory"
    bc.emit({**out, **bc.env_info(dev)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
