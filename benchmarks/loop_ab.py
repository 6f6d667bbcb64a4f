#!/usr/bin/env python
"""In-process A/B timings of mltl's training loop, alternating the two sides epoch by epoch.

Two comparisons, each printing one JSON line (median seconds of the second epoch of each fit, and the
ratio ``b_over_a``; below 1 means B is faster):

``--before COMMIT``  ``mltl.training.train.fit`` as it was in git commit COMMIT (A) against the working tree's (B),
                     on the same resident tensors: did a change slow the hot loop? (The old module is
                     loaded from ``git show COMMIT:core/mltl/training/train.py`` next to the current package.)
``--stream``         the same fit on resident tensors (A) against a streamed domain (B): images kept on the
                     host at their stored size and gathered, resized and copied per batch by the loader
                     thread (``mltl.data.stream``, forced with a tiny device budget).

    python benchmarks/loop_ab.py --before 7c6fb01 --threads 1
    python benchmarks/loop_ab.py --before 7c6fb01 --augment hflip,vflip,shift --threads 1
    python benchmarks/loop_ab.py --stream --stored-size 256 --threads 1

Data: an image folder (default: 64 images per class of ../shared/data/ct_kidney, else a generated CT
phantom folder), GFE-II, batch 64, SGD, 10% validation; alternating order every round.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import bench_common as bc  # noqa: E402


def _old_train(commit: str):
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{commit}:core/mltl/training/train.py"], capture_output=True,
                         text=True, check=True).stdout
    path = Path(tempfile.mkdtemp(prefix="mltl-ab-")) / "old_train.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("mltl._train_before", path)
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = "mltl"
    sys.modules["mltl._train_before"] = mod
    spec.loader.exec_module(mod)
    return mod


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", metavar="COMMIT", help="compare fit at this git commit (A) with the current one (B)")
    ap.add_argument("--stream", action="store_true", help="compare resident (A) with streamed (B) data")
    ap.add_argument("--data", help="image folder; default: 64 per class of ../shared/data/ct_kidney or a phantom")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--stored-size", type=int, default=256, help="--stream: size the domain keeps its images at")
    ap.add_argument("--augment", default="", help="train.augment items, comma-separated (both sides)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--threads", type=int)
    args = ap.parse_args(argv)
    if bool(args.before) == bool(args.stream):
        ap.error("give exactly one of --before COMMIT or --stream")

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import mltl
    from mltl.training import train as current
    from mltl.builtins import image_folder_domain
    from mltl.config import InputConfig, TrainConfig
    from mltl.networks.network import HeadSpec, build_network, make_spec
    from mltl.data.stream import load_images

    if args.data:
        root = Path(args.data)
    else:
        shared = ROOT.parent / "shared" / "data" / "ct_kidney"
        root = bc.subset_folder(shared, 64, 0) if shared.is_dir() else bc.phantom_folder(per_class=64, size=256)
    cpu = torch.device("cpu")
    stored = args.stored_size if args.stream else args.size
    dom = image_folder_domain(str(root), channels=1, image_size=stored)
    y = torch.from_numpy(dom.labels)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    n_val = max(len(dom.classes), len(y) // 10)
    tr, va = perm[n_val:], perm[:n_val]
    aug = tuple(a for a in args.augment.split(",") if a)
    inp = InputConfig(size=args.size, channels=1)
    cfg = TrainConfig(epochs=2, batch_size=64, schedule="constant", augment=aug)
    resident = load_images(dom.images, size=args.size, channels=1, device=cpu)
    if args.before:
        sides = {"a": (_old_train(args.before), resident), "b": (current, resident)}
        names = {"a": f"fit@{args.before}", "b": "fit (working tree)"}
    else:
        streamed = load_images(dom.images, size=args.size, channels=1, device=cpu, device_budget_gb=1e-9)
        sides = {"a": (current, resident), "b": (current, streamed)}
        names = {"a": "resident", "b": f"streamed from {stored} px, resized per batch"}
    times: dict[str, list[float]] = {"a": [], "b": []}
    for r in range(args.rounds):
        for side in ("a", "b") if r % 2 == 0 else ("b", "a"):
            mod, x = sides[side]
            torch.manual_seed(0)
            net = build_network(make_spec("gfe-2", {}, 1, args.size, HeadSpec(), dom.classes), mltl.get_registry())
            res = mod.fit(net, mod.TensorData(x[tr], y[tr]), mod.TensorData(x[va], y[va]), cfg, inp,
                          classes=dom.classes, seed=1)
            times[side].append(res.history[-1]["seconds"])
    a, b = statistics.median(times["a"]), statistics.median(times["b"])
    bc.emit({"kind": "summary", "a": names["a"], "b": names["b"], "augment": list(aug), "n_train": len(tr),
             "size": args.size, "a_epoch_seconds": [round(t, 4) for t in times["a"]],
             "b_epoch_seconds": [round(t, 4) for t in times["b"]], "a_median": round(a, 4),
             "b_median": round(b, 4), "b_over_a": round(b / a, 3), **bc.env_info(cpu)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
