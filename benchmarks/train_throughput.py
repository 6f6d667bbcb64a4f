#!/usr/bin/env python
"""Training throughput of mltl's stage loop against a bare PyTorch loop and an ImageFolder+DataLoader loop.

Three loops train the same network (same initial weights), with the same batch size, SGD (lr 0.01,
momentum 0.9), no augmentation, on the same training images of an image folder:

  mltl         ``mltl.training.train.fit`` on ``TensorData`` made by ``prepare_images`` from the image-folder domain,
               exactly as the chain runner does (decoded once, uint8 on the device). fit also scores the
               validation split (10% of the images) after every epoch and keeps a copy of the best state:
               that time is counted (a user pays it), but only training images count as images/s. Like
               the chain runner, it gives fit a resumable checkpoint file (written every
               ``MLTL_CHECKPOINT_SECONDS``, default 60). The time without validation, best-state copy and
               checkpoints is reported too (``train_only``), measured with timers around fit's
               ``predict_proba``, ``classification_metrics``, ``copy.deepcopy`` and ``_save_checkpoint``
               (``bench_common.FitProbe``; the core is not edited).
  bare         the practical limit: the same uint8 device tensors, a random permutation per epoch, slicing,
               uint8 -> float normalisation, forward, backward, step; nothing else.
  imagefolder  what a typical user writes: torchvision ``datasets.ImageFolder`` + ``transforms``
               (Grayscale when 1 channel, Resize, ToTensor, Normalize) + ``DataLoader`` (shuffle,
               ``num_workers`` 2 on CPU / 8 on CUDA, ``pin_memory`` on CUDA), decoding from disk every epoch.

On CUDA all three use bf16 autocast and channels_last, like mltl. Each loop runs in its own fresh Python
process (clean peak-memory numbers, no state shared between loops), one warm-up epoch and then
``--epochs`` measured epochs; the median measured epoch gives images/s. The three processes take turns
epoch by epoch (only one trains at any time; the order rotates every round), so a change in the load of a
shared machine hits all three alike and the ratios stay comparable. Output: one JSON line per
measurement on stdout; the last line is the summary with the ratios ``vs_bare`` (mltl / bare) and
``vs_imagefolder`` (mltl / ImageFolder) of the first backbone, and per backbone. After its timed epochs each
loop also counts the training FLOPs per image of its network (``torch.utils.flop_counter.FlopCounterMode``
on one forward + backward of a batch; ``bench_common.FLOPS_NOTE``) and reports the achieved TFLOP/s and,
on a GPU in ``bench_common.BF16_DENSE_PEAK_TFLOPS``, the fraction of its dense BF16 peak (null with the
reason elsewhere), beside the peak GPU memory of the measurement.

    python benchmarks/train_throughput.py --quick                 # CPU, 1-2 minutes
    python benchmarks/train_throughput.py --quick --threads 1     # steadier on a CPU shared with other jobs
    python benchmarks/train_throughput.py --device cuda           # GFE-II 150 px + ResNet-18 224 px
    python benchmarks/train_throughput.py --backbones gfe-2:150:64,resnet18:224:64 --epochs 5
    python benchmarks/train_throughput.py --quick --threads 1 --loops bare,mltl --compile     # torch.compile on
    python benchmarks/train_throughput.py --quick --threads 1 --loops bare,mltl --augment hflip,rotate:10,crop:0.8
"""

from __future__ import annotations

import argparse
import json
import os
import signal
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
    from mltl.networks.network import HeadSpec, build_network, make_spec

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


class Gate:
    """The worker's side of the interleaving protocol: JSON events on stdout, one "go" line on stdin per epoch.

    Loading happens before "ready"; every epoch starts on a "go" and ends with an "epoch" event, so the
    driver runs one epoch of one loop at a time and the loops take turns (time spent waiting for "go" is
    never timed).
    """

    def event(self, kind: str, **payload: Any) -> None:
        print(json.dumps({"event": kind, **payload}, default=bc._json_default), flush=True)

    def wait(self) -> None:
        line = sys.stdin.readline()
        if line.strip() != "go":
            raise SystemExit("the driver went away")


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    gate = Gate()

    dev = bc.resolve_device(spec["device"])
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    malloc_tuned = bc.tune_malloc() if spec.get("malloc_tune") else False
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
        from mltl.data.domain import prepare_images

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
        from mltl.training.train import TensorData, fit

        net, info = _build_model(spec, classes, for_mltl=True)
        extra.update(info)
        net.to(dev)
        extra_cfg: dict[str, Any] = {}
        if spec.get("compile"):  # --compile: train.compile = true (the warm-up epoch pays the compilation)
            extra_cfg["compile"] = True
        cfg = TrainConfig(epochs=n_epochs, batch_size=bs, optimizer="sgd", lr=0.01, momentum=0.9,
                          weight_decay=0.0, schedule="constant", monitor="loss",
                          augment=tuple(spec.get("augment") or ()), **extra_cfg)
        extra["train_compile"] = bool(spec.get("compile"))
        extra["train_augment"] = list(cfg.augment)
        inp = InputConfig(size=size, channels=chans, mean=MEAN, std=STD)
        import inspect
        import tempfile

        # the chain runner gives fit a resumable checkpoint file, written every MLTL_CHECKPOINT_SECONDS
        # (default 60); do the same when this fit takes one
        fit_kw: dict[str, Any] = {}
        if "checkpoint" in inspect.signature(fit).parameters:
            ckdir = tempfile.mkdtemp(prefix="mltl-bench-ckpt-")
            fit_kw["checkpoint"] = Path(ckdir) / "checkpoint.pt"
            fit_kw["checkpoint_seconds"] = spec["checkpoint_seconds"]
            extra["checkpoint_seconds_setting"] = spec["checkpoint_seconds"]
        with bc.FitProbe(dev) as probe:

            faults = [bc.minor_faults()]

            def on_epoch(epoch: int, row: dict[str, Any]) -> None:
                probe.on_epoch(epoch, row)  # closes the epoch's timing
                e = probe.epochs[-1]
                faults.append(bc.minor_faults())
                val = e["val_predict"] + e["val_metrics"]
                epochs.append({"wall": e["wall"], "val": val, "val_predict": e["val_predict"],
                               "val_metrics": e["val_metrics"], "best_copy": e["best_copy"],
                               "best_copies": e["best_copies"], "checkpoint": e["checkpoint"],
                               "checkpoints": e["checkpoints"],
                               "train_only": e["wall"] - val - e["best_copy"] - e["checkpoint"],
                               "faults": faults[-1] - faults[-2]})
                gate.event("epoch", epoch=epoch, wall=e["wall"])
                if epoch < n_epochs:
                    probe.pause()  # hide the wait from fit's own clock (its checkpoint cadence)
                    gate.wait()
                    probe.resume()
                    faults.append(bc.minor_faults())
                    probe.start()  # the next epoch's clock starts after the wait

            gate.event("ready", load_seconds=extra.get("load_seconds"))
            gate.wait()
            probe.start()
            fit(net, TensorData(x_tr, y_tr), TensorData(x_va, y_va), cfg, inp, classes=classes,
                seed=spec["seed"], on_epoch=on_epoch, **fit_kw)
        if "checkpoint" in fit_kw:
            import shutil

            shutil.rmtree(fit_kw["checkpoint"].parent, ignore_errors=True)

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
        gate.event("ready", load_seconds=extra.get("load_seconds"))
        for ep in range(n_epochs):
            gate.wait()
            bc.sync(dev)
            t0, c0, f0 = time.perf_counter(), time.process_time(), bc.minor_faults()
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
            epochs.append({"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0,
                           "faults": bc.minor_faults() - f0})
            gate.event("epoch", epoch=ep + 1, wall=epochs[-1]["wall"])

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
        gate.event("ready", load_seconds=extra["load_seconds"])
        for ep in range(n_epochs):
            gate.wait()
            bc.sync(dev)
            t0, c0, f0 = time.perf_counter(), time.process_time(), bc.minor_faults()
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
            epochs.append({"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0,
                           "faults": bc.minor_faults() - f0})
            gate.event("epoch", epoch=ep + 1, wall=epochs[-1]["wall"])
    else:
        raise ValueError(loop)

    measured = epochs[spec["warmup"]:]
    med = bc.median([e["wall"] for e in measured])
    out.update(extra)
    out["warmup_epochs"] = spec["warmup"]
    out["epoch_seconds"] = [round(e["wall"], 4) for e in measured]
    out["warmup_epoch_seconds"] = [round(e["wall"], 4) for e in epochs[: spec["warmup"]]]
    out["malloc_tuned"] = malloc_tuned
    out["median_epoch_minor_faults"] = int(bc.median([e["faults"] for e in measured]))
    out["median_epoch_seconds"] = round(med, 4)
    out["images_per_s"] = round(len(train_idx) / med, 2)
    best = min(e["wall"] for e in measured)
    out["best_epoch_seconds"] = round(best, 4)  # least disturbed by other jobs on a shared machine
    out["images_per_s_best"] = round(len(train_idx) / best, 2)
    if loop == "mltl":
        tr = bc.median([e["train_only"] for e in measured])
        out["median_val_seconds"] = round(bc.median([e["val"] for e in measured]), 4)
        out["median_val_predict_seconds"] = round(bc.median([e["val_predict"] for e in measured]), 4)
        out["median_val_metrics_seconds"] = round(bc.median([e["val_metrics"] for e in measured]), 4)
        out["median_best_copy_seconds"] = round(bc.median([e["best_copy"] for e in measured]), 4)
        out["best_copies"] = int(sum(e["best_copies"] for e in measured))
        saves = [e for e in epochs if e["checkpoints"]]
        out["checkpoints_written"] = int(sum(e["checkpoints"] for e in epochs))
        if saves:
            out["checkpoint_seconds_each"] = round(bc.median([e["checkpoint"] / e["checkpoints"] for e in saves]), 4)
        out["median_checkpoint_seconds"] = round(bc.median([e["checkpoint"] for e in measured]), 4)
        out["median_train_only_seconds"] = round(tr, 4)
        out["images_per_s_train_only"] = round(len(train_idx) / tr, 2)
    else:
        out["median_epoch_cpu_seconds"] = round(bc.median([e["cpu"] for e in measured]), 4)
    out.update(bc.peak_memory(dev))  # before the FLOP count below, which must not add to it
    # training FLOPs per image and the achieved TFLOP/s (after the timed epochs, so they are not disturbed)
    peak = bc.bf16_peak(dev)
    out.update(peak)
    try:
        out.update(bc.train_flops_per_image(net, batch=bs, channels=chans, size=size, n_classes=len(classes),
                                            dev=dev))
    except Exception as exc:  # noqa: BLE001 - a FLOP count must not cost the timing
        out.update({"train_flops_per_image": None, "flops_error": f"{type(exc).__name__}: {exc}"})
    out.update(bc.achieved(out["train_flops_per_image"], out["images_per_s"], peak))
    if loop == "mltl":
        ach = bc.achieved(out["train_flops_per_image"], out["images_per_s_train_only"], peak)
        out["achieved_tflops_train_only"] = ach["achieved_tflops"]
        out["fraction_of_bf16_peak_train_only"] = ach["fraction_of_bf16_peak"]
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


class _Worker:
    """One loop in its own Python process, driven epoch by epoch (see :class:`Gate`)."""

    def __init__(self, spec: dict[str, Any]) -> None:
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        self.spec = spec
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def expect(self, kind: str) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith('{"event"'):
                ev = json.loads(line)
                if ev["event"] == kind:
                    return ev
        rc = self.proc.wait()
        raise SystemExit(f"the {self.spec['loop']} worker ended (exit status {rc}) while the driver waited for "
                         f"its {kind!r} event; its error is above")

    def go(self) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return self.expect("epoch")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def run_interleaved(specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Start one worker per spec, then run epoch 1 of each, epoch 2 of each, ... (the order rotates every
    round), so a change of machine load hits every loop alike; return each worker's result."""
    workers = [_Worker(s) for s in specs]
    try:
        for w in workers:
            w.expect("ready")
        n_epochs = specs[0]["warmup"] + specs[0]["epochs"]
        for r in range(n_epochs):
            k = r % len(workers)
            for w in workers[k:] + workers[:k]:
                w.go()
        results = [w.expect("result") for w in workers]
        for w in workers:
            w.proc.wait()
        return [{k: v for k, v in res.items() if k != "event"} for res in results]
    finally:
        for w in workers:
            w.kill()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", help="image folder (one sub-folder per class); default ../shared/data/ct_kidney "
                                   "if present, else generated CT phantom PNGs")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--backbones", help="comma-separated NAME[:SIZE[:BATCH]], e.g. gfe-2:150:64,resnet18:224:64 "
                                        "(first = primary); default: that, or gfe-2:64:64 with --quick")
    ap.add_argument("--epochs", type=int, help="measured epochs after the warm-up (default 5)")
    ap.add_argument("--warmup", type=int, default=1, help="warm-up epochs, not measured (default 1)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--channels", type=int, default=1, choices=[1, 3])
    ap.add_argument("--per-class", type=int, help="use this many random images of each class "
                                                  "(default: all; --quick: 64)")
    ap.add_argument("--val-frac", type=float, default=0.1)
    ap.add_argument("--workers", type=int, help="DataLoader num_workers (default 2 on CPU, 8 on CUDA)")
    ap.add_argument("--loops", default=",".join(LOOPS), help="subset of bare,mltl,imagefolder")
    ap.add_argument("--checkpoint-seconds", type=float,
                    help="mltl loop: seconds between fit's resumable checkpoints (default: what the chain runner "
                         "uses, MLTL_CHECKPOINT_SECONDS or 60; 0 = every epoch, to measure their cost)")
    ap.add_argument("--malloc-tune", action="store_true",
                    help="in every loop, tune glibc malloc (mallopt: 32 MB mmap threshold, 1 GB trim threshold) "
                         "so activation buffers are reused instead of unmapped and faulted in every step")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads in every loop (default: torch's default; "
                                                "on a CPU shared with other jobs, 1 can be much faster)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="GFE-II at 64x64 only, 64 images per class (about 2 minutes on 2 CPU cores)")
    ap.add_argument("--compile", action="store_true",
                    help="mltl loop: train.compile = true (torch.compile; the warm-up epoch pays the compilation)")
    ap.add_argument("--augment", default="",
                    help="mltl loop only: train.augment items, comma-separated (e.g. hflip,rotate:10,crop:0.8,"
                         "intensity:0.1): measures the augmentation's cost, so the ratios are then not like for like")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        Gate().event("result", **worker(json.loads(args.worker)))
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the workers are killed under `timeout`

    dev = bc.resolve_device(args.device)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)  # the driver does not train; this makes env_info report it
    if args.quick and args.per_class is None:
        args.per_class = 64
    epochs = args.epochs or 5
    backbones = _parse_backbones(args.backbones or ("gfe-2:64:64" if args.quick else "gfe-2:150:64,resnet18:224:64"),
                                 args.batch_size)
    loops = [lp for lp in args.loops.split(",") if lp]
    ckpt_s = args.checkpoint_seconds
    if ckpt_s is None:
        try:
            from mltl.training.train import checkpoint_seconds as _chain_ckpt

            ckpt_s = float(_chain_ckpt())
        except ImportError:
            ckpt_s = float(os.environ.get("MLTL_CHECKPOINT_SECONDS", 60))
    workers = args.workers if args.workers is not None else (8 if dev.type == "cuda" else 2)
    t_start = time.perf_counter()
    root, how = _resolve_data(args)
    _, rel, labels = bc.list_folder(root)
    bc.emit({"kind": "config", "data": str(root), "data_source": how, "n_images": len(rel),
             "backbones": [f"{b}@{s}px/b{bs}" for b, s, bs in backbones], "loops": loops, "epochs": epochs,
             "warmup": args.warmup, "val_frac": args.val_frac, "checkpoint_seconds": ckpt_s,
             "malloc_tune": args.malloc_tune, "mltl_compile": args.compile, "mltl_augment": args.augment,
             "channels": args.channels, "num_workers": workers, **bc.env_info(dev)})

    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for name, size, batch in backbones:
        key = f"{name}@{size}"
        results[key] = {lp: [] for lp in loops}
        specs = [{"loop": lp, "backbone": name, "size": size, "batch": batch, "channels": args.channels,
                  "device": str(dev), "data": str(root), "val_frac": args.val_frac, "seed": args.seed,
                  "epochs": epochs, "warmup": args.warmup, "workers": workers, "threads": args.threads,
                  "checkpoint_seconds": ckpt_s, "malloc_tune": args.malloc_tune, "compile": args.compile,
                  "augment": [a for a in args.augment.split(",") if a]}
                 for lp in loops]
        for res in run_interleaved(specs):
            res["kind"] = "measurement"
            res["interleaved_with"] = loops
            bc.emit(res)
            results[key][res["loop"]].append(res)

    summary: dict[str, Any] = {"kind": "summary", "per_backbone": {}}
    for key, by_loop in results.items():
        med = {lp: bc.median([s for res in v for s in res["epoch_seconds"]]) for lp, v in by_loop.items() if v}
        n_train = next(iter(by_loop.values()))[0]["n_train"]
        ips = {lp: round(n_train / m, 2) for lp, m in med.items()}
        best = {lp: min(s for res in v for s in res["epoch_seconds"]) for lp, v in by_loop.items() if v}
        ips_best = {lp: round(n_train / m, 2) for lp, m in best.items()}
        row: dict[str, Any] = {"images_per_s": ips, "median_epoch_seconds": {k: round(v, 4) for k, v in med.items()},
                               "images_per_s_best": ips_best, "n_train": n_train}
        if "mltl" in by_loop and by_loop["mltl"]:
            tr = bc.median([r["median_train_only_seconds"] for r in by_loop["mltl"]])
            row["mltl_images_per_s_train_only"] = round(n_train / tr, 2)
            row["mltl_val_share"] = round(bc.median([r["median_val_seconds"] for r in by_loop["mltl"]]) / med["mltl"], 4)
            row["mltl_best_copy_share"] = round(
                bc.median([r["median_best_copy_seconds"] for r in by_loop["mltl"]]) / med["mltl"], 4)
            each = [r["checkpoint_seconds_each"] for r in by_loop["mltl"] if "checkpoint_seconds_each" in r]
            if each:
                row["mltl_checkpoint_seconds_each"] = bc.median(each)
                # amortised at the chain's cadence: one checkpoint per max(checkpoint_seconds, epoch) of training
                row["mltl_checkpoint_share_at_setting"] = round(
                    bc.median(each) / max(ckpt_s, med["mltl"], 1e-9), 4)
            if "bare" in ips:
                row["vs_bare"] = round(ips["mltl"] / ips["bare"], 3)
                row["vs_bare_train_only"] = round(row["mltl_images_per_s_train_only"] / ips["bare"], 3)
                row["vs_bare_best"] = round(ips_best["mltl"] / ips_best["bare"], 3)
            if "imagefolder" in ips:
                row["vs_imagefolder"] = round(ips["mltl"] / ips["imagefolder"], 3)
                row["vs_imagefolder_best"] = round(ips_best["mltl"] / ips_best["imagefolder"], 3)
        if "bare" in ips and "imagefolder" in ips:
            row["bare_vs_imagefolder"] = round(ips["bare"] / ips["imagefolder"], 3)  # the most any loop could gain
        # FLOPs, achieved TFLOP/s, fraction of the dense BF16 peak and peak GPU memory, per loop
        first = {lp: v[0] for lp, v in by_loop.items() if v}
        flops = {lp: r.get("train_flops_per_image") for lp, r in first.items()}
        row["train_flops_per_image"] = flops
        row["gflops_per_image"] = {lp: (round(f / 1e9, 3) if f else None) for lp, f in flops.items()}
        row["achieved_tflops"] = {}
        row["fraction_of_bf16_peak"] = {}
        for lp in first:
            ach = bc.achieved(flops[lp], ips.get(lp), first[lp])
            row["achieved_tflops"][lp] = ach["achieved_tflops"]
            row["fraction_of_bf16_peak"][lp] = ach["fraction_of_bf16_peak"]
        if "mltl" in first and "mltl_images_per_s_train_only" in row:
            ach = bc.achieved(flops["mltl"], row["mltl_images_per_s_train_only"], first["mltl"])
            row["mltl_achieved_tflops_train_only"] = ach["achieved_tflops"]
            row["mltl_fraction_of_bf16_peak_train_only"] = ach["fraction_of_bf16_peak"]
        row["peak_gpu_mem_mb"] = {lp: r.get("peak_gpu_mem_mb") for lp, r in first.items()}
        any_r = next(iter(first.values()))
        row["peak_bf16_dense_tflops"] = any_r.get("peak_bf16_dense_tflops")
        row["peak_source"] = any_r.get("peak_source")
        row["peak_note"] = any_r.get("peak_note")
        if any_r.get("peak_gpu_mem_note"):
            row["peak_gpu_mem_note"] = any_r["peak_gpu_mem_note"]
        row["flops_note"] = any_r.get("flops_note")
        summary["per_backbone"][key] = row
    primary = f"{backbones[0][0]}@{backbones[0][1]}"
    prow = summary["per_backbone"][primary]
    summary["primary"] = primary
    summary["vs_bare"] = prow.get("vs_bare")
    summary["vs_imagefolder"] = prow.get("vs_imagefolder")
    summary["vs_bare_train_only"] = prow.get("vs_bare_train_only")
    summary["vs_bare_best"] = prow.get("vs_bare_best")
    summary["vs_imagefolder_best"] = prow.get("vs_imagefolder_best")
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
