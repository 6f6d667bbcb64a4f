"""The training loop of one stage variant.

Data lives on the device as uint8 tensors for the whole stage (decoded once); each batch is indexed,
augmented and normalised on the device. The loop does not synchronise with the host inside an epoch:
the loss is accumulated on the device and read once per epoch. On CUDA it uses bf16 autocast and
channels_last. After every epoch the validation split is scored; the best epoch's weights (by
``monitor``) are restored at the end, and ``patience`` stops early.
"""

from __future__ import annotations

import copy
import io
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import InputConfig, TrainConfig
from .errors import UserError
from .metrics import classification_metrics, is_better, metric_value
from .rundir import write_bytes_atomic

CHECKPOINT_VERSION = 1


@attrs.frozen(eq=False)
class TensorData:
    """One split on the device: uint8 images ``(N, C, H, W)`` and int64 labels ``(N,)``."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])


@attrs.frozen
class FitResult:
    history: list[dict[str, Any]]
    best_epoch: int
    val_metrics: dict[str, Any]
    seconds: float


def _normalise(x: torch.Tensor, inp: InputConfig) -> torch.Tensor:
    scale = 1.0 / (255.0 * inp.std)
    return x.float().mul_(scale).sub_(inp.mean / inp.std)


def _augment(x: torch.Tensor, kinds: tuple[str, ...], gen: torch.Generator) -> torch.Tensor:
    """Random flips and shifts of a float batch in pixel units (before normalisation), on its device."""
    n = x.shape[0]
    dev = x.device
    if "hflip" in kinds:
        m = (torch.rand(n, generator=gen) < 0.5).to(dev).view(-1, 1, 1, 1)
        x = torch.where(m, x.flip(-1), x)
    if "vflip" in kinds:
        m = (torch.rand(n, generator=gen) < 0.5).to(dev).view(-1, 1, 1, 1)
        x = torch.where(m, x.flip(-2), x)
    if "shift" in kinds:
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0] = theta[:, 1, 1] = 1.0
        theta[:, :, 2] = (torch.rand(n, 2, generator=gen) - 0.5) * 0.25  # up to 1/8 of the size each way
        grid = F.affine_grid(theta.to(dev), list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return x


def _lr_factor(cfg: TrainConfig) -> Callable[[int], float]:
    def factor(epoch: int) -> float:
        if epoch < cfg.warmup_epochs:
            return (epoch + 1) / (cfg.warmup_epochs + 1)
        if cfg.schedule == "cosine":
            span = max(1, cfg.epochs - cfg.warmup_epochs)
            return 0.5 * (1 + math.cos(math.pi * (epoch - cfg.warmup_epochs) / span))
        if cfg.schedule == "step":
            return cfg.step_gamma ** ((epoch - cfg.warmup_epochs) // cfg.step_epochs)
        return 1.0

    return factor


def make_optimizer(net: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in net.parameters() if p.requires_grad]
    if not params:
        raise UserError("every layer is frozen: nothing to train (choose a freeze policy that leaves some layers)")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


@torch.inference_mode()
def predict_proba(net: nn.Module, x: torch.Tensor, inp: InputConfig, batch_size: int = 512) -> np.ndarray:
    """Softmax probabilities ``(N, classes)`` as float64 numpy, in eval mode, batched."""
    was_training = net.training
    net.eval()
    dev = x.device
    outs = []
    for chunk in x.split(batch_size):
        xb = _normalise(chunk, inp)
        if dev.type == "cuda":
            xb = xb.contiguous(memory_format=torch.channels_last)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            logits = net(xb)
        outs.append(torch.softmax(logits.float(), dim=1))
    net.train(was_training)
    if not outs:
        return np.zeros((0, 0))
    return torch.cat(outs).cpu().double().numpy()


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived; a resumable checkpoint was saved (``checkpoint``) before stopping."""

    def __init__(self, checkpoint: Path | None) -> None:
        self.checkpoint = checkpoint
        super().__init__(f"interrupted; checkpoint saved to {checkpoint}" if checkpoint else "interrupted")


#: set by the chain runner's signal handlers; the loop checks it at the end of every epoch
stop_requested = False


def _checkpoint_state(epoch, net, opt, sched, gen, best, history) -> dict[str, Any]:
    state = {
        "version": CHECKPOINT_VERSION, "epoch": epoch, "model": net.state_dict(), "optimizer": opt.state_dict(),
        "scheduler": {k: v for k, v in sched.state_dict().items() if k != "lr_lambdas"},
        "generator": gen.get_state(), "torch_rng": torch.get_rng_state(), "history": history, **best,
    }
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    return state


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    write_bytes_atomic(path, buf.getvalue())


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A training checkpoint, loaded with ``weights_only=True`` (no code can run); UserError if damaged."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"{path}: damaged or unsafe training checkpoint ({str(exc).splitlines()[0]}); "
                        f"delete it to restart this stage from its first epoch") from None
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        raise UserError(f"{path}: not a training checkpoint of this mltl version; delete it to restart the stage")
    return state


def fit(net: nn.Module, train: TensorData, val: TensorData, cfg: TrainConfig, inp: InputConfig, *,
        classes: tuple[str, ...], seed: int,
        on_epoch: Callable[[int, dict[str, Any]], None] | None = None,
        checkpoint: Path | None = None, checkpoint_seconds: float = 60.0) -> FitResult:
    """Train ``net`` in place; return the history and the restored best epoch's validation metrics.

    With ``checkpoint``, the full training state (weights, optimizer, scheduler, random generators, best
    epoch so far, history) is saved there at most every ``checkpoint_seconds`` and when a stop is requested;
    if the file exists, training resumes from it and ends exactly as an uninterrupted run would on CPU.
    """
    dev = train.x.device
    cuda = dev.type == "cuda"
    if cuda:
        net = net.to(memory_format=torch.channels_last)
    opt = make_optimizer(net, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_factor(cfg))
    weight = None
    if cfg.class_weighted:
        counts = torch.bincount(train.y, minlength=len(classes)).float().clamp_min(1)
        weight = (counts.sum() / (len(classes) * counts)).to(dev)
    gen = torch.Generator().manual_seed(seed)
    n = len(train)
    history: list[dict[str, Any]] = []
    best_score: float | None = None
    best_state: dict[str, torch.Tensor] | None = None
    best_epoch, best_val = -1, {}
    stale = 0
    first_epoch = 0
    if checkpoint is not None and checkpoint.exists():
        state = load_checkpoint(checkpoint)
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict({**state["scheduler"], "lr_lambdas": [None]})
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        history = list(state["history"])
        best_score, best_state, best_epoch = state["best_score"], state["best_state"], state["best_epoch"]
        best_val, stale, first_epoch = state["best_val"], state["stale"], state["epoch"]
        if best_state is not None:
            best_state = {k: v.to(dev) for k, v in best_state.items()}
    start = time.perf_counter()
    last_save = time.monotonic()
    for epoch in range(first_epoch, cfg.epochs):
        t0 = time.perf_counter()
        net.train()
        order = torch.randperm(n, generator=gen).to(dev)
        loss_sum = torch.zeros((), device=dev)
        seen = 0
        lr = opt.param_groups[0]["lr"]
        for i in range(0, n, cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            if len(idx) < 2 and n > 1:  # a BatchNorm cannot train on one image
                continue
            xb = train.x[idx].float()
            if cfg.augment:
                xb = _augment(xb, cfg.augment, gen)
            xb = _normalise(xb, inp)
            yb = train.y[idx]
            if cuda:
                xb = xb.contiguous(memory_format=torch.channels_last)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
                logits = net(xb)
            loss = F.cross_entropy(logits.float(), yb, weight=weight, label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach() * len(idx)
            seen += len(idx)
        sched.step()
        train_loss = float(loss_sum) / max(seen, 1)
        if not math.isfinite(train_loss):
            raise UserError(
                f"training loss became {train_loss} in epoch {epoch + 1}: lower train.lr (now {cfg.lr}) "
                f"or check the input normalisation ([input] mean/std)"
            )
        row = {"epoch": epoch + 1, "loss": train_loss, "lr": lr, "val_loss": math.nan, "val_auc": math.nan,
               "val_accuracy": math.nan}
        if (epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs:
            probs = predict_proba(net, val.x, inp)
            val_metrics = classification_metrics(val.y.cpu().numpy(), probs, classes)
            row.update(val_loss=val_metrics["loss"], val_auc=val_metrics["auc_macro"],
                       val_accuracy=val_metrics["accuracy"])
            score = metric_value(val_metrics, cfg.monitor)
            if is_better(score, best_score, cfg.monitor):
                best_score, best_epoch, best_val, stale = score, epoch + 1, val_metrics, 0
                best_state = copy.deepcopy(net.state_dict())
            else:
                stale += 1  # counted in validations, not epochs
        row["seconds"] = time.perf_counter() - t0
        history.append(row)
        if on_epoch is not None:
            on_epoch(epoch + 1, row)
        finished = epoch + 1 == cfg.epochs or (cfg.patience is not None and stale >= cfg.patience)
        if checkpoint is not None and not finished and (
                stop_requested or time.monotonic() - last_save >= checkpoint_seconds):
            best = {"best_score": best_score, "best_state": best_state, "best_epoch": best_epoch,
                    "best_val": best_val, "stale": stale}
            _save_checkpoint(checkpoint, _checkpoint_state(epoch + 1, net, opt, sched, gen, best, history))
            last_save = time.monotonic()
        if stop_requested and not finished:
            raise Interrupted(checkpoint)
        if finished:
            break
    if best_state is not None:
        net.load_state_dict(best_state)
    else:  # the monitored metric was never defined: keep the last epoch
        best_epoch, best_val = len(history), classification_metrics(
            val.y.cpu().numpy(), predict_proba(net, val.x, inp), classes)
    if cuda:
        net = net.to(memory_format=torch.contiguous_format)
    return FitResult(history=history, best_epoch=best_epoch, val_metrics=best_val,
                     seconds=time.perf_counter() - start)
