#!/usr/bin/env python
"""End-to-end chain time: the demo chain measured, and the paper-scale protocol projected.

(i) ``demo``: runs ``examples/rare_liver.toml`` through :func:`mltl.run` and reports the total wall time,
    the setup time (validation, domain generation/loading), each stage's wall time (timed with the
    ``mltl_stage_started`` / ``mltl_stage_finished`` hooks of an in-process plugin) and each stage's
    ``train_seconds`` from its metrics.json (the selected variant) and selection.json (all variants).

(ii) ``projection``: the paper's protocol (Aswiga et al. 2021) at GFE-II, 150x150, batch 64, SGD lr 0.01,
    1,500 epochs per stage, on the chain's default splits (val 0.2 / test 0.2; target 0.25 / 0.25 as in the
    example):

      source        25,000 images, 5 classes, new GFE-II network
      intermediate  1,303 images, 3 classes, GFE-II weights + new dense 256, 128 (dropout 0.5) + classifier,
                    4 freeze variants (C1, C1-C2, C1-C3, inherited = everything but the new layers)
      target        250 images, 3 classes, from the intermediate model, nothing frozen

    Each network (built exactly as the chain builds it: ``build_network`` / ``derive`` / ``FreezePolicy``)
    is trained with :func:`mltl.training.train.fit` for a warm-up epoch and a few measured epochs on synthetic,
    class-separable uint8 images held on the device (timing does not depend on the pixels). The measured
    median epoch is split into training, validation and best-state copy (timers around fit's
    ``predict_proba``/``classification_metrics``/``copy.deepcopy``), each part is scaled linearly per image
    to the stage's full size (the 25,000-image source is measured on ``--source-measure`` images, 2,000 by
    default), and multiplied by 1,500 epochs and the number of variants.

Output: JSON lines on stdout; the last line is the summary (demo seconds, projected hours per stage and
in total).

    python benchmarks/chain_time.py --quick                  # CPU: a cut demo and a small projection
    python benchmarks/chain_time.py --device cuda            # full demo + projection measured at 2,000
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_common as bc  # noqa: E402
import mltl  # noqa: E402

PAPER = {
    "source": {"images": 25_000, "classes": 5, "val": 0.2, "test": 0.2},
    "intermediate": {"images": 1_303, "classes": 3, "val": 0.2, "test": 0.2,
                     "variants": ["C1", "C1-C2", "C1-C3", "inherited"]},
    "target": {"images": 250, "classes": 3, "val": 0.25, "test": 0.25},
}
QUICK_DEMO_SETS = [
    "stages.source.train.epochs=1", "stages.source.domain.images_per_class=24",
    "stages.intermediate.train.epochs=1", "stages.intermediate.domain.images_per_class=24",
    "stages.target.train.epochs=2",
]


def _split_sizes(n: int, val: float, test: float) -> tuple[int, int]:
    """(train, val) image counts of an n-image domain under mltl's split fractions."""
    n_val, n_test = int(round(val * n)), int(round(test * n))
    return n - n_val - n_test, n_val


# ---------------------------------------------------------------- (i) the demo chain


class _StageTimer:
    def __init__(self) -> None:
        self.start: dict[str, float] = {}
        self.end: dict[str, float] = {}
        self.epochs: dict[str, int] = {}

    @mltl.hookimpl
    def mltl_stage_started(self, stage_name, stage_dir):
        self.start[stage_name] = time.perf_counter()

    @mltl.hookimpl
    def mltl_epoch_ended(self, stage_name, variant, epoch, metrics):
        self.epochs[stage_name] = self.epochs.get(stage_name, 0) + 1

    @mltl.hookimpl
    def mltl_stage_finished(self, result):
        self.end[result.name] = time.perf_counter()


def run_demo(config: Path, dev: str, overrides: list[str], out_root: Path) -> dict[str, Any]:
    timer = _StageTimer()
    mltl.register_plugin(timer, name="mltl-bench-stage-timer")
    out = out_root / f"demo-{int(time.time())}"
    t0 = time.perf_counter()
    try:
        result = mltl.run(config, out=out, device=dev, overrides=overrides)
    finally:
        mltl.unregister_plugin("mltl-bench-stage-timer")
    total = time.perf_counter() - t0
    stages = []
    first = min(timer.start.values()) if timer.start else t0
    for st in result.stages:
        metrics = json.loads((st.stage_dir / "metrics.json").read_text())
        sel_path = st.stage_dir / "selection.json"
        variants = []
        if sel_path.exists():
            for c in json.loads(sel_path.read_text())["candidates"]:
                if "train_seconds" in c:
                    variants.append({"variant": c["variant"], "train_seconds": round(c["train_seconds"], 3),
                                     "epochs_run": c.get("epochs_run")})
        stages.append({
            "stage": st.name,
            "wall_seconds": round(timer.end[st.name] - timer.start[st.name], 3),
            "train_seconds_selected": round(metrics["train_seconds"], 3),
            "train_seconds_all_variants": round(sum(v["train_seconds"] for v in variants), 3) if variants
            else round(metrics["train_seconds"], 3),
            "variants": variants,
            "epochs_run_all_variants": timer.epochs.get(st.name),
            "n_images": metrics.get("n_images"),
            "selected_variant": metrics.get("selected_variant"),
            "test_auc": metrics.get("auc_macro"),
        })
    return {"kind": "demo", "config": str(config), "overrides": overrides, "run_dir": str(result.run_dir),
            "total_seconds": round(total, 3), "setup_seconds": round(first - t0, 3), "stages": stages}


# ---------------------------------------------------------------- (ii) the projection


def _synthetic(n: int, classes: int, channels: int, size: int, seed: int, dev):
    """Class-separable uint8 images on ``dev``: noise plus a class-dependent bright square."""
    import torch

    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = torch.randint(0, 160, (n, channels, size, size), generator=g, dtype=torch.uint8)
    side = size // 4
    for c in range(classes):
        r0 = (c * side) % (size - side)
        x[y == c, :, r0 : r0 + side, r0 : r0 + side] = 240
    perm = torch.randperm(n, generator=g)
    return x[perm].to(dev), y[perm].to(dev)


def measure_fit(net, n_train: int, n_val: int, classes: int, *, size: int, channels: int, batch: int,
                warmup: int, epochs: int, dev, seed: int) -> dict[str, Any]:
    """fit() on synthetic data; median per-epoch wall / validation / best-copy / training seconds."""
    import torch

    from mltl.config import InputConfig, TrainConfig
    from mltl.training.train import TensorData, fit

    x, y = _synthetic(n_train + n_val, classes, channels, size, seed, dev)
    train, val = TensorData(x[:n_train], y[:n_train]), TensorData(x[n_train:], y[n_train:])
    cfg = TrainConfig(epochs=warmup + epochs, batch_size=batch, optimizer="sgd", lr=0.01, momentum=0.9)
    inp = InputConfig(size=size, channels=channels)
    names = tuple(f"c{k}" for k in range(classes))
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    net.to(dev)
    # the chain runner gives fit a resumable checkpoint; here one is written after every epoch, to measure
    # its cost, which is then charged at the chain's cadence (MLTL_CHECKPOINT_SECONDS, default 60)
    fit_kw: dict[str, Any] = {}
    ckdir = None
    if "checkpoint" in inspect.signature(fit).parameters:
        ckdir = Path(tempfile.mkdtemp(prefix="mltl-bench-ckpt-"))
        fit_kw = {"checkpoint": ckdir / "checkpoint.pt", "checkpoint_seconds": 0.0}
    with bc.FitProbe(dev) as probe:
        probe.start()
        fit(net, train, val, cfg, inp, classes=names, seed=seed, on_epoch=probe.on_epoch, **fit_kw)
    if ckdir is not None:
        shutil.rmtree(ckdir, ignore_errors=True)
    net.to("cpu")
    m = probe.epochs[warmup:]
    wall = bc.median([e["wall"] for e in m])
    val_s = bc.median([e["val_predict"] + e["val_metrics"] for e in m])
    copy_s = bc.median([e["best_copy"] for e in m])
    ck_s = bc.median([e["checkpoint"] for e in m])
    saves = [e["checkpoint"] / e["checkpoints"] for e in probe.epochs if e["checkpoints"]]
    # the cost of one best-state copy (the first epoch always makes one); the projection charges it every
    # epoch, an upper bound: a copy is made only when the validation metric improves
    copy_once = max(e["best_copy"] / max(e["best_copies"], 1) for e in probe.epochs)
    out = {"measured_n_train": n_train, "measured_n_val": n_val, "measured_epochs": len(m),
           "epoch_seconds": [round(e["wall"], 4) for e in m], "median_epoch_seconds": round(wall, 4),
           "median_val_seconds": round(val_s, 4), "median_best_copy_seconds": round(copy_s, 4),
           "best_copy_seconds_each": round(copy_once, 4),
           "median_checkpoint_seconds": round(ck_s, 4),
           "checkpoint_seconds_each": round(bc.median(saves), 4) if saves else 0.0,
           "median_train_seconds": round(wall - val_s - copy_s - ck_s, 4),
           "train_images_per_s": round(n_train / max(wall - val_s - copy_s - ck_s, 1e-9), 2)}
    out.update(bc.peak_memory(dev))
    del x, y, train, val
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return out


def run_projection(args, dev) -> list[dict[str, Any]]:
    import torch

    from mltl.networks.freeze import FreezePolicy
    from mltl.networks.network import HeadSpec, build_network, derive, make_spec

    reg = mltl.get_registry()
    size, chans, batch, E = args.size, args.channels, args.batch_size, args.paper_epochs
    try:
        from mltl.training.train import checkpoint_seconds

        ckpt_cadence = float(checkpoint_seconds())
    except ImportError:  # an mltl without resumable checkpoints
        ckpt_cadence = float("inf")
    rows: list[dict[str, Any]] = []

    def measure(stage: str, variant: str, net, full_images: int, measure_images: int, classes: int,
                val: float, test: float, note: str) -> dict[str, Any]:
        full_train, full_val = _split_sizes(full_images, val, test)
        m_train, m_val = _split_sizes(measure_images, val, test)
        m_val = max(m_val, 2)
        r = measure_fit(net, m_train, m_val, classes, size=size, channels=chans, batch=batch,
                        warmup=args.warmup, epochs=args.epochs, dev=dev, seed=args.seed)
        scale_train, scale_val = full_train / m_train, full_val / m_val
        per_epoch = (r["median_train_seconds"] * scale_train + r["median_val_seconds"] * scale_val
                     + r["best_copy_seconds_each"])
        # one checkpoint per max(cadence, epoch) of training, as the chain runner writes them
        per_epoch += r["checkpoint_seconds_each"] * per_epoch / max(ckpt_cadence, per_epoch, 1e-9)
        row = {"kind": "projection_measurement", "stage": stage, "variant": variant,
               "trainable_parameters": sum(p.numel() for p in net.parameters() if p.requires_grad),
               "frozen": sorted(net.frozen), "full_images": full_images, "full_n_train": full_train,
               "full_n_val": full_val, "scale_train": round(scale_train, 3), "scale_val": round(scale_val, 3),
               "scaling": note, **r,
               "projected_epoch_seconds": round(per_epoch, 4),
               "projection_formula": "e = train_s*scale_train + val_s*scale_val + one best-state copy; "
                                     "e += checkpoint_s * e / max(checkpoint cadence, e)",
               "checkpoint_cadence_seconds": ckpt_cadence,
               "projected_hours": round(per_epoch * E / 3600, 3),
               "projected_hours_without_validation": round(r["median_train_seconds"] * scale_train * E / 3600, 3),
               "size": size, "channels": chans, "batch_size": batch, "epochs": E, **bc.env_info(dev)}
        bc.emit(row)
        rows.append(row)
        return row

    def cap(n: int) -> int:
        return min(n, args.max_measure) if args.max_measure else n

    p = PAPER["source"]
    torch.manual_seed(args.seed)
    src = build_network(make_spec("gfe-2", {}, chans, size, HeadSpec(), tuple(f"s{k}" for k in range(p["classes"]))), reg)
    src.set_frozen(frozenset())
    n = min(args.source_measure, p["images"])
    measure("source", "gfe-2", src, p["images"], cap(n), p["classes"], p["val"], p["test"],
            f"measured on {cap(n)} synthetic images, scaled linearly per image to {p['images']}")

    p = PAPER["intermediate"]
    inter_classes = ("normal", "cyst", "calculi")
    head = HeadSpec(dense=(256, 128), dropout=0.5)
    winner = None
    for v in p["variants"]:
        torch.manual_seed(args.seed)
        child, _ = derive(src, reg, classes=inter_classes, head=head, in_chans=chans, image_size=size)
        child.set_frozen(FreezePolicy(v).resolve(child, reg))
        n = cap(p["images"])
        measure("intermediate", v, child, p["images"], n, p["classes"], p["val"], p["test"],
                "measured at full size" if n == p["images"] else
                f"measured on {n} synthetic images, scaled linearly per image to {p['images']}")
        winner = winner or child  # which variant wins does not change the target's cost

    p = PAPER["target"]
    torch.manual_seed(args.seed)
    tgt, _ = derive(winner, reg, classes=("normal", "caroli-focal", "caroli-diffuse"), head=None,
                    in_chans=chans, image_size=size)
    tgt.set_frozen(FreezePolicy("none").resolve(tgt, reg))
    n = cap(p["images"])
    measure("target", "none", tgt, p["images"], n, p["classes"], p["val"], p["test"],
            "measured at full size" if n == p["images"] else
            f"measured on {n} synthetic images, scaled linearly per image to {p['images']}")
    return rows


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--config", default=str(bc.REPO / "examples" / "rare_liver.toml"))
    ap.add_argument("--set", dest="sets", action="append", default=None, metavar="KEY=VALUE",
                    help="override for the demo chain (repeatable); --quick adds epoch/image cuts")
    ap.add_argument("--skip-demo", action="store_true")
    ap.add_argument("--skip-projection", action="store_true")
    ap.add_argument("--size", type=int, default=150, help="projection input size (paper: 150)")
    ap.add_argument("--channels", type=int, default=3, choices=[1, 3], help="projection channels (paper: 3)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--paper-epochs", type=int, default=1500)
    ap.add_argument("--epochs", type=int, help="measured epochs per projected network (default 3; --quick 1)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--source-measure", type=int, default=2000,
                    help="images the 25,000-image source is measured on (scaled linearly)")
    ap.add_argument("--max-measure", type=int, help="measure every projected network on at most this many "
                                                    "images (default: none; --quick: 80)")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--malloc-tune", action="store_true",
                    help="tune glibc malloc first (see train_throughput.py --malloc-tune)")
    ap.add_argument("--out", help="folder for the demo run directory (default: a temp dir)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true",
                    help="demo with 1-2 epochs and fewer images; projection measured on <= 80 images, 1 epoch")
    ap.add_argument("--verbose", action="store_true", help="show mltl's progress lines")
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    malloc_tuned = bc.tune_malloc() if args.malloc_tune else False
    if not args.verbose:
        os.environ.setdefault("MLTL_QUIET", "1")
    dev = bc.resolve_device(args.device)
    args.epochs = args.epochs or (1 if args.quick else 3)
    if args.quick and args.max_measure is None:
        args.max_measure = 80
    sets = args.sets if args.sets is not None else (QUICK_DEMO_SETS if args.quick else [])
    t_start = time.perf_counter()
    bc.emit({"kind": "config", "quick": args.quick, "malloc_tuned": malloc_tuned, "demo_config": args.config, "demo_overrides": sets,
             "projection": {"backbone": "gfe-2", "size": args.size, "channels": args.channels,
                            "batch_size": args.batch_size, "epochs_per_stage": args.paper_epochs,
                            "source_measure": args.source_measure, "max_measure": args.max_measure,
                            "measured_epochs": args.epochs, "warmup": args.warmup, "paper": PAPER},
             **bc.env_info(dev)})

    summary: dict[str, Any] = {"kind": "summary", "malloc_tuned": malloc_tuned}
    if not args.skip_demo:
        out_root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="mltl-bench-chain-"))
        demo = run_demo(Path(args.config), str(dev), sets, out_root)
        demo.update(bc.peak_memory(dev))
        demo.update(bc.env_info(dev))
        bc.emit(demo)
        summary["demo_total_seconds"] = demo["total_seconds"]
        summary["demo_setup_seconds"] = demo["setup_seconds"]
        summary["demo_stage_seconds"] = {s["stage"]: s["wall_seconds"] for s in demo["stages"]}
        summary["demo_stage_train_seconds"] = {s["stage"]: s["train_seconds_all_variants"] for s in demo["stages"]}
        summary["demo_overrides"] = sets
    if not args.skip_projection:
        rows = run_projection(args, dev)
        per_stage: dict[str, float] = {}
        per_stage_noval: dict[str, float] = {}
        for r in rows:
            per_stage[r["stage"]] = per_stage.get(r["stage"], 0.0) + r["projected_hours"]
            per_stage_noval[r["stage"]] = per_stage_noval.get(r["stage"], 0.0) + r["projected_hours_without_validation"]
        summary["projected_hours"] = {k: round(v, 3) for k, v in per_stage.items()}
        summary["projected_total_hours"] = round(sum(per_stage.values()), 3)
        summary["projected_total_hours_without_validation"] = round(sum(per_stage_noval.values()), 3)
        summary["projection_note"] = (
            f"GFE-II {args.size}px x{args.channels}ch, batch {args.batch_size}, {args.paper_epochs} epochs/stage; "
            f"per-epoch times from fit() on synthetic images "
            f"(source measured on {min(args.source_measure, args.max_measure or args.source_measure)} images"
            f"{'' if not args.max_measure else f', others on <= {args.max_measure}'}), "
            f"scaled linearly per image; intermediate = sum of its 4 freeze variants")
    summary["total_seconds"] = round(time.perf_counter() - t_start, 1)
    summary.update(bc.env_info(dev))
    bc.emit(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
