#!/usr/bin/env python
"""Training throughput of mltl's stage loop against a bare PyTorch loop and an ImageFolder+DataLoader loop.

Three loops train the same network (same initial weights), with the same batch size, SGD (lr 0.01,
momentum 0.9), no augmentation, on the same training images of an image folder:

  mltl         ``mltl.train.fit`` on ``TensorData`` made by ``prepare_images`` from the image-folder domain,
               exactly as the chain runner does (decoded once, uint8 on the device). fit also scores the
               validation split (10% of the images) after every epoch and keeps a copy of the best state:
               that time is counted (a user pays it), but only training images count as images/s. The
               time without validation and best-state copy is reported too (``train_only``), measured with
               timers around fit's ``predict_proba``, ``classification_metrics`` and ``copy.deepcopy``.
  bare         the practical limit: the same uint8 device tensors, a random permutation per epoch, slicing,
               uint8 -> float normalisation, forward, backward, step; nothing else.
  imagefolder  what a typical user writes: torchvision ``datasets.ImageFolder`` + ``transforms``
               (Grayscale when 1 channel, Resize, ToTensor, Normalize) + ``DataLoader`` (shuffle,
               ``num_workers`` 2 on CPU / 8 on CUDA, ``pin_memory`` on CUDA), decoding from disk every epoch.

On CUDA all three use bf16 autocast and channels_last, like mltl. Each loop runs in its own fresh Python
process (clean peak-memory numbers, no state shared between loops), one warm-up epoch and then
``--epochs`` measured epochs; the median measured epoch gives images/s. Output: one JSON line per
measurement on stdout; the last line is the summary with the ratios ``vs_bare`` (mltl / bare) and
``vs_imagefolder`` (mltl / ImageFolder) of the first backbone, and per backbone.

    python benchmarks/train_throughput.py --quick                 # CPU, ~2-3 minutes
    python benchmarks/train_throughput.py --device cuda           # GFE-II 150 px + ResNet-18 224 px
    python benchmarks/train_throughput.py --backbones gfe-2:150:64,resnet18:224:64 --epochs 5
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_common as bc  # noqa: E402

LOOPS = ("bare", "mltl", "imagefolder")
TIMM_MODELS = {"resnet18", "resnet34", "resnet50", "efficientnet_b0", "mobilenetv3_small_100"}
TARGETS = {"vs_bare": 0.90, "vs_imagefolder": 1.25}
MEAN, STD = 0.5, 0.25  # mltl's InputConfig defaults, used by all three loops


# ---------------------------------------------------------------- workers (one loop, one process)


def _build_model(spec: dict[str, Any], classes: tuple[str, ...], for_mltl: bool):
    """The network: the mltl Network for the mltl loop; for the others the same GFE network, or the plain
    timm model with its own classifier (same layers as the mltl trunk + linear head)."""
    import timm
    import torch

    import mltl
    from mltl.network import HeadSpec, build_network, make_spec

    torch.manual_seed(spec["seed"])
    name, size, chans = spec["backbone"], spec["size"], spec["channels"]
    if name in TIMM_MODELS:
        if not for_mltl:
            return timm.create_model(name, pretrained=False, num_classes=len(classes), in_chans=chans), {}
        bname, options, origin = bc.ensure_timm_backbone(name)
        net = build_network(make_spec(bname, options, chans, size, HeadSpec(), classes), mltl.get_registry())
        return net, {"mltl_backbone": bname, "mltl_backbone_options": options, "mltl_backbone_origin": origin}
    net = build_network(make_spec(name, {}, chans, size, HeadSpec(), classes), mltl.get_registry())
    return net, {}


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    dev = bc.resolve_device(spec["device"])
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    cuda = dev.type == "cuda"
    root = Path(spec["data"])
    classes, rel, labels = bc.list_folder(root)
    classes = tuple(classes)
    train_idx, val_idx = bc.stratified_val(labels, spec["val_frac"], spec["seed"])
    size, chans, bs = spec["size"], spec["channels"], spec["batch"]
    n_epochs = spec["warmup"] + spec["epochs"]
    loop = spec["loop"]
    out: dict[str, Any] = {"loop": loop, "backbone": spec["backbone"], "size": size, "channels": chans,
                           "batch_size": bs, "n_train": int(len(train_idx)), "n_val": int(len(val_idx)),
                           "n_classes": len(classes), "data": str(root)}
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    t_load = time.perf_counter()
    extra: dict[str, Any] = {}
    epochs: list[dict[str, float]] = []

    if loop in ("mltl", "bare"):
        from mltl.builtins import image_folder_domain
        from mltl.domain import prepare_images

        dom = image_folder_domain(str(root), channels=chans, image_size=size)  # what the chain runner loads
        if list(dom.ids) != rel:
            raise RuntimeError("image-folder domain lists the files differently from bench_common.list_folder")
        x_all = prepare_images(dom.images, size=size, channels=chans).to(dev)
        y_all = torch.from_numpy(dom.labels).to(dev)
        ti = torch.from_numpy(train_idx).to(dev)
        vi = torch.from_numpy(val_idx).to(dev)
        x_tr, y_tr, x_va, y_va = x_all[ti], y_all[ti], x_all[vi], y_all[vi]
        del x_all
        bc.sync(dev)
        extra["load_seconds"] = round(time.perf_counter() - t_load, 3)  # decode once per stage
        extra["data_mb_on_device"] = round((x_tr.numel() + x_va.numel()) / 2**20, 1)

    if loop == "mltl":
        from mltl.config import InputConfig, TrainConfig
        from mltl.train import TensorData, fit

        net, info = _build_model(spec, classes, for_mltl=True)
        extra.update(info)
        net.to(dev)
        cfg = TrainConfig(epochs=n_epochs, batch_size=bs, optimizer="sgd", lr=0.01, momentum=0.9,
                          weight_decay=0.0, schedule="constant", monitor="loss", augment=())
        inp = InputConfig(size=size, channels=chans, mean=MEAN, std=STD)
        with bc.FitProbe(dev) as probe:
            probe.start()
            fit(net, TensorData(x_tr, y_tr), TensorData(x_va, y_va), cfg, inp, classes=classes,
                seed=spec["seed"], on_epoch=probe.on_epoch)
        for e in probe.epochs:
            val = e["val_predict"] + e["val_metrics"]
            epochs.append({"wall": e["wall"], "val": val, "best_copy": e["best_copy"],
                           "best_copies": e["best_copies"], "train_only": e["wall"] - val - e["best_copy"]})

    elif loop == "bare":
        import torch.nn.functional as F

        net, _ = _build_model(spec, classes, for_mltl=False)
        net.to(dev)
        if cuda:
            net = net.to(memory_format=torch.channels_last)
        net.train()
        opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
        scale, shift = 1.0 / (255.0 * STD), MEAN / STD
        n = len(y_tr)
        for _ in range(n_epochs):
            bc.sync(dev)
            t0, c0 = time.perf_counter(), time.process_time()
            perm = torch.randperm(n, device=dev)
            for i in range(0, n, bs):
                idx = perm[i : i + bs]
                if idx.numel() < 2:  # same rule as fit: BatchNorm cannot train on one image
                    continue
                xb = x_tr[idx].float().mul_(scale).sub_(shift)
                if cuda:
                    xb = xb.contiguous(memory_format=torch.channels_last)
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
                    logits = net(xb)
                loss = F.cross_entropy(logits.float(), y_tr[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            bc.sync(dev)
            epochs.append({"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0})

    elif loop == "imagefolder":
        import torch.nn.functional as F
        from torch.utils.data import DataLoader, Subset
        from torchvision import datasets, transforms

        tf = ([transforms.Grayscale(num_output_channels=1)] if chans == 1 else []) + [
            transforms.Resize((size, size)), transforms.ToTensor(),
            transforms.Normalize([MEAN] * chans, [STD] * chans)]
        ds = datasets.ImageFolder(str(root), transform=transforms.Compose(tf))
        if tuple(ds.classes) != classes:
            raise RuntimeError(f"ImageFolder classes {ds.classes} != {classes}")
        pos = {Path(p).relative_to(root).as_posix(): k for k, (p, _) in enumerate(ds.samples)}
        train_set = Subset(ds, [pos[rel[i]] for i in train_idx])
        workers = spec["workers"]
        loader = DataLoader(train_set, batch_size=bs, shuffle=True, num_workers=workers, pin_memory=cuda)
        extra["num_workers"] = workers
        extra["pin_memory"] = cuda
        net, _ = _build_model(spec, classes, for_mltl=False)
        net.to(dev)
        if cuda:
            net = net.to(memory_format=torch.channels_last)
        net.train()
        opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
        extra["load_seconds"] = round(time.perf_counter() - t_load, 3)
        for _ in range(n_epochs):
            bc.sync(dev)
            t0, c0 = time.perf_counter(), time.process_time()
            for xb, yb in loader:
                if len(yb) < 2:
                    continue
                xb = xb.to(dev, non_blocking=True)
                yb = yb.to(dev, non_blocking=True)
                if cuda:
                    xb = xb.contiguous(memory_format=torch.channels_last)
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
                    logits = net(xb)
                loss = F.cross_entropy(logits.float(), yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            bc.sync(dev)
            epochs.append({"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0})
    else:
        raise ValueError(loop)

    measured = epochs[spec["warmup"]:]
    med = bc.median([e["wall"] for e in measured])
    out.update(extra)
    out["warmup_epochs"] = spec["warmup"]
    out["epoch_seconds"] = [round(e["wall"], 4) for e in measured]
    out["warmup_epoch_seconds"] = [round(e["wall"], 4) for e in epochs[: spec["warmup"]]]
    out["median_epoch_seconds"] = round(med, 4)
    out["images_per_s"] = round(len(train_idx) / med, 2)
    if loop == "mltl":
        tr = bc.median([e["train_only"] for e in measured])
        out["median_val_seconds"] = round(bc.median([e["val"] for e in measured]), 4)
        out["median_best_copy_seconds"] = round(bc.median([e["best_copy"] for e in measured]), 4)
        out["best_copies"] = int(sum(e["best_copies"] for e in measured))
        out["median_train_only_seconds"] = round(tr, 4)
        out["images_per_s_train_only"] = round(len(train_idx) / tr, 2)
    else:
        out["median_epoch_cpu_seconds"] = round(bc.median([e["cpu"] for e in measured]), 4)
    out.update(bc.peak_memory(dev))
    out.update(bc.env_info(dev))
    return out


# ---------------------------------------------------------------- driver


def _parse_backbones(text: str, default_batch: int) -> list[tuple[str, int, int]]:
    out = []
    for item in text.split(","):
        parts = item.strip().split(":")
        name = parts[0]
        size = int(parts[1]) if len(parts) > 1 and parts[1] else (224 if name in TIMM_MODELS else 150)
        batch = int(parts[2]) if len(parts) > 2 and parts[2] else default_batch
        out.append((name, size, batch))
    return out


def _resolve_data(args) -> tuple[Path, str]:
    if args.data:
        root = Path(args.data).expanduser().resolve()
        if not root.is_dir():
            raise SystemExit(f"--data {args.data}: not a folder")
        how = "given"
    elif bc.SHARED_KIDNEY.is_dir():
        root, how = bc.SHARED_KIDNEY.resolve(), "shared kidney CT folder"
    else:
        per = args.per_class or (60 if args.quick else 300)
        root = bc.phantom_folder(per_class=per, size=256, seed=0)
        return root, f"generated CT phantom PNGs, 3 classes x {per}, 256x256"
    if args.per_class:
        root = bc.subset_folder(root, args.per_class, seed=0)
        how += f", {args.per_class} random images per class (symlinks)"
    return root, how


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
                          stdout=subprocess.PIPE, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"worker failed ({proc.returncode}) for {spec}:\n{proc.stdout}")
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", help="image folder (one sub-folder per class); default ../shared/data/ct_kidney "
                                   "if present, else generated CT phantom PNGs")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--backbones", help="comma-separated NAME[:SIZE[:BATCH]], e.g. gfe-2:150:64,resnet18:224:64 "
                                        "(first = primary); default: that, or gfe-2:64:64 with --quick")
    ap.add_argument("--epochs", type=int, help="measured epochs after the warm-up (default 5; --quick 3)")
    ap.add_argument("--warmup", type=int, default=1, help="warm-up epochs, not measured (default 1)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--channels", type=int, default=1, choices=[1, 3])
    ap.add_argument("--per-class", type=int, help="use this many random images of each class "
                                                  "(default: all; --quick: 64)")
    ap.add_argument("--val-frac", type=float, default=0.1)
    ap.add_argument("--workers", type=int, help="DataLoader num_workers (default 2 on CPU, 8 on CUDA)")
    ap.add_argument("--repeats", type=int, default=1, help="run the three loops this many times, interleaved; "
                                                           "medians pool the measured epochs of all repeats")
    ap.add_argument("--loops", default=",".join(LOOPS), help="subset of bare,mltl,imagefolder")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads in every loop (default: torch's default; "
                                                "on a CPU shared with other jobs, 1 can be much faster)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="GFE-II at 64x64, 64 images per class, 3 epochs")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        bc.emit(worker(json.loads(args.worker)))
        return 0

    dev = bc.resolve_device(args.device)
    if args.quick and args.per_class is None:
        args.per_class = 64
    epochs = args.epochs or (3 if args.quick else 5)
    backbones = _parse_backbones(args.backbones or ("gfe-2:64:64" if args.quick else "gfe-2:150:64,resnet18:224:64"),
                                 args.batch_size)
    loops = [lp for lp in args.loops.split(",") if lp]
    workers = args.workers if args.workers is not None else (8 if dev.type == "cuda" else 2)
    t_start = time.perf_counter()
    root, how = _resolve_data(args)
    _, rel, labels = bc.list_folder(root)
    bc.emit({"kind": "config", "data": str(root), "data_source": how, "n_images": len(rel),
             "backbones": [f"{b}@{s}px/b{bs}" for b, s, bs in backbones], "loops": loops, "epochs": epochs,
             "warmup": args.warmup, "repeats": args.repeats, "val_frac": args.val_frac,
             "channels": args.channels, "num_workers": workers, **bc.env_info(dev)})

    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for name, size, batch in backbones:
        key = f"{name}@{size}"
        results[key] = {lp: [] for lp in loops}
        for r in range(args.repeats):
            order = loops if r % 2 == 0 else loops[::-1]
            for lp in order:
                spec = {"loop": lp, "backbone": name, "size": size, "batch": batch, "channels": args.channels,
                        "device": str(dev), "data": str(root), "val_frac": args.val_frac, "seed": args.seed,
                        "epochs": epochs, "warmup": args.warmup, "workers": workers,
                        "threads": args.threads}
                res = run_one(spec)
                res["kind"] = "measurement"
                res["repeat"] = r
                bc.emit(res)
                results[key][lp].append(res)

    summary: dict[str, Any] = {"kind": "summary", "per_backbone": {}}
    for key, by_loop in results.items():
        med = {lp: bc.median([s for res in v for s in res["epoch_seconds"]]) for lp, v in by_loop.items() if v}
        n_train = next(iter(by_loop.values()))[0]["n_train"]
        ips = {lp: round(n_train / m, 2) for lp, m in med.items()}
        row: dict[str, Any] = {"images_per_s": ips, "median_epoch_seconds": {k: round(v, 4) for k, v in med.items()},
                               "n_train": n_train}
        if "mltl" in by_loop and by_loop["mltl"]:
            tr = bc.median([r["median_train_only_seconds"] for r in by_loop["mltl"]])
            row["mltl_images_per_s_train_only"] = round(n_train / tr, 2)
            row["mltl_val_share"] = round(bc.median([r["median_val_seconds"] for r in by_loop["mltl"]]) / med["mltl"], 4)
            row["mltl_best_copy_share"] = round(
                bc.median([r["median_best_copy_seconds"] for r in by_loop["mltl"]]) / med["mltl"], 4)
            if "bare" in ips:
                row["vs_bare"] = round(ips["mltl"] / ips["bare"], 3)
                row["vs_bare_train_only"] = round(row["mltl_images_per_s_train_only"] / ips["bare"], 3)
            if "imagefolder" in ips:
                row["vs_imagefolder"] = round(ips["mltl"] / ips["imagefolder"], 3)
        summary["per_backbone"][key] = row
    primary = f"{backbones[0][0]}@{backbones[0][1]}"
    prow = summary["per_backbone"][primary]
    summary["primary"] = primary
    summary["vs_bare"] = prow.get("vs_bare")
    summary["vs_imagefolder"] = prow.get("vs_imagefolder")
    summary["vs_bare_train_only"] = prow.get("vs_bare_train_only")
    summary["targets"] = TARGETS
    summary["meets_targets"] = {k: (summary[k] is not None and summary[k] >= v) for k, v in TARGETS.items()}
    summary["data"] = str(root)
    summary["data_source"] = how
    summary["total_seconds"] = round(time.perf_counter() - t_start, 1)
    summary.update(bc.env_info(dev))
    bc.emit(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
