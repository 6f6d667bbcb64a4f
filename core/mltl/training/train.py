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
import logging
import math
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import InputConfig, TrainConfig
from ..data import augment
from ..data.stream import HostImages, is_streamed
from ..errors import ConfigError, UserError
from ..evaluation.metrics import classification_metrics, is_better, metric_value
from ..networks.finetune import FineTuning
from ..networks.network import Network
from ..running.rundir import write_bytes_atomic
from . import distributed

CHECKPOINT_VERSION = 1

log = logging.getLogger("mltl")


@attrs.frozen(eq=False)
class TensorData:
    """One split: uint8 images ``(N, C, H, W)`` on the device (or a streamed :class:`~mltl.data.stream.HostImages`
    view, read in batches) and int64 labels ``(N,)`` on the device."""

    x: torch.Tensor | HostImages
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])


@attrs.frozen
class FitResult:
    history: list[dict[str, Any]]
    best_epoch: int
    val_metrics: dict[str, Any]
    seconds: float


DEFAULT_MEAN, DEFAULT_STD = 0.5, 0.25  # for networks without a preprocessing of their own (trained here)


def normalisation(inp: InputConfig) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The ``(mean, std)`` that :func:`normalise` applies, one value or one per channel of ``inp.channels``.

    A per-channel pair (three values) on grey input (``channels = 1``) becomes its average: a grey image
    replicated into three channels and normalised per channel, then passed through a first convolution
    whose RGB filters were summed, is approximated by the one averaged normalisation.
    """
    mean = inp.mean if inp.mean is not None else (DEFAULT_MEAN,)
    std = inp.std if inp.std is not None else (DEFAULT_STD,)
    if inp.channels == 1:
        mean, std = (sum(mean) / len(mean),), (sum(std) / len(std),)
    return tuple(mean), tuple(std)


def normalise(x: torch.Tensor, inp: InputConfig) -> torch.Tensor:
    """uint8 images ``x`` ``(N, C, H, W)`` as the float input the network was trained on:
    ``(x / 255 - mean) / std``, per channel where ``inp`` gives one value per channel."""
    mean, std = normalisation(inp)
    if len(mean) == 1 and len(std) == 1:  # the common case, as one fused scale and shift
        return x.float().mul_(1.0 / (255.0 * std[0])).sub_(mean[0] / std[0])
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    return x.float().mul_(1.0 / (255.0 * s)).sub_(m / s)


def _epoch_order(cfg: TrainConfig, n: int, gen: torch.Generator, y_host: torch.Tensor) -> torch.Tensor:
    """The epoch's training order on the host: a permutation, or for ``sampler = "balanced"`` n draws with
    replacement, each image with probability inversely proportional to its class's frequency."""
    if cfg.sampler == "balanced":
        w = 1.0 / torch.bincount(y_host).double()[y_host]
        return torch.multinomial(w, n, replacement=True, generator=gen)
    return torch.randperm(n, generator=gen)


def _training_batch_norms(net: nn.Module) -> list[str]:
    """The BatchNorm layers of ``net`` that train (those outside the groups its freeze policy froze; a
    frozen group's BatchNorm stays in eval mode)."""
    frozen: set[int] = set()
    if isinstance(net, Network):
        for group in net.frozen:
            for module in net.group_modules(group):
                frozen.update(id(m) for m in module.modules())
    return [name for name, m in net.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and id(m) not in frozen]


def check_batch_size(net: nn.Module, cfg: TrainConfig, *, key: str = "train", source: str = "") -> None:
    """Refuse a ``batch_size`` with which ``net`` cannot train: 1 when a BatchNorm layer trains (it needs
    the statistics of two or more images), and under torchrun fewer than 2 images per process.

    ``key`` names the stage's ``train`` table in the message (e.g. ``stages.target.train``)."""
    world = distributed.info().world_size
    if world > 1 and cfg.batch_size < 2 * world:
        raise ConfigError(f"{cfg.batch_size} gives each of the {world} processes fewer than 2 images per batch, "
                          f"so no batch would train; set {key}.batch_size to {2 * world} or more",
                          key=f"{key}.batch_size", source=source)
    if cfg.batch_size == 1:
        layers = _training_batch_norms(net)
        if layers:
            shown = ", ".join(layers[:3]) + (f" and {len(layers) - 3} more" if len(layers) > 3 else "")
            raise ConfigError(f"1 image per batch cannot train the network's BatchNorm layers ({shown}), which "
                              f"need two or more; set {key}.batch_size to 2 or more, or freeze the layer groups "
                              f"that hold them", key=f"{key}.batch_size", source=source)


def _batches(n: int, batch_size: int) -> list[tuple[int, int, slice]]:
    """The epoch's batches (start, stop, this rank's positions): :func:`distributed.batches`, which leaves
    out a last batch of one image, except that ``batch_size = 1`` trains on every image (a network whose
    BatchNorm layers train is refused that by :func:`check_batch_size`)."""
    if batch_size == 1 and not distributed.active():
        return [(i, i + 1, slice(i, i + 1)) for i in range(n)]
    return distributed.batches(n, batch_size)


_noted: set[str] = set()


def _note_once(message: str) -> None:
    """Log ``message`` the first time it comes up in this process (fit runs once per variant and repeat)."""
    if message not in _noted:
        _noted.add(message)
        log.warning(message)


def _val_proba(net: nn.Module, val: TensorData, inp: InputConfig, n_classes: int) -> np.ndarray:
    """Validation probabilities; under DDP each rank scores a contiguous part and all ranks get all of them."""
    if not distributed.active():
        return predict_proba(net, val.x, inp)
    distributed.broadcast_buffers(net)  # every rank scores rank 0's BatchNorm statistics
    bounds = distributed.shard_bounds(len(val))
    a, b = bounds[distributed.info().rank]
    local = predict_proba(net, val.x[a:b], inp) if b > a else np.zeros((0, n_classes))
    dev = val.y.device
    return distributed.gather_rows(torch.from_numpy(local).to(dev), [q - p for p, q in bounds]).cpu().numpy()


def _compile(model: nn.Module, cfg: TrainConfig) -> Callable[..., torch.Tensor]:
    return torch.compile(model, mode=None if cfg.compile_mode == "default" else cfg.compile_mode)


def _compile_failed(exc: BaseException) -> None:
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    warnings.warn(f"train.compile: torch.compile failed ({type(exc).__name__}: {first}); training continues "
                  f"without compiling (set train.compile = false to skip the attempt)", RuntimeWarning, stacklevel=3)


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


def make_optimizer(net: nn.Module, cfg: TrainConfig, tuning: FineTuning | None = None) -> torch.optim.Optimizer:
    params = [p for p in net.parameters() if p.requires_grad]
    if not params:
        raise UserError("every layer is frozen: nothing to train (choose a freeze policy that leaves some layers)")
    if tuning is not None and tuning.active:  # one parameter group per layer group (docs/finetuning.md)
        params = tuning.param_groups(cfg.lr, cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    try:  # the fused kernel: the same update, about twice as fast on CPU for GFE-I (docs/performance.md)
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    except (RuntimeError, ValueError, TypeError):  # a device or dtype without the fused kernel
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


@torch.inference_mode()
def predict_proba(net: nn.Module, x: torch.Tensor, inp: InputConfig, batch_size: int = 512) -> np.ndarray:
    """Softmax probabilities ``(N, classes)`` as float64 numpy, in eval mode, batched."""
    was_training = net.training
    net.eval()
    dev = x.device
    outs = []
    for chunk in (x.chunks(batch_size) if is_streamed(x) else x.split(batch_size)):
        xb = normalise(chunk, inp)
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


#: set by :class:`StopOnSignal`'s handlers; the loop checks it at the end of every epoch
stop_requested = False


def checkpoint_seconds() -> float:
    """Seconds between training checkpoints (``MLTL_CHECKPOINT_SECONDS``, default 60; 0 = every epoch)."""
    try:
        return float(os.environ.get("MLTL_CHECKPOINT_SECONDS", "60"))
    except ValueError:
        raise UserError("MLTL_CHECKPOINT_SECONDS must be a number of seconds") from None


class StopOnSignal:
    """SIGINT/SIGTERM ask the training loop to save a checkpoint and stop (a second SIGINT stops at once)."""

    def __enter__(self) -> StopOnSignal:
        global stop_requested
        stop_requested = False
        self.previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        global stop_requested
        if stop_requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop_requested = True

    def __exit__(self, *exc: Any) -> None:
        global stop_requested
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        stop_requested = False


def _checkpoint_state(epoch, net, opt, sched, gen, best, history) -> dict[str, Any]:
    state = {
        "version": CHECKPOINT_VERSION, "epoch": epoch, "model": net.state_dict(), "optimizer": opt.state_dict(),
        "scheduler": {k: v for k, v in sched.state_dict().items() if k != "lr_lambdas"},
        "generator": gen.get_state(), "torch_rng": torch.get_rng_state(), "history": history, **best,
    }
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    if distributed.active():  # dropout masks differ per rank: keep every rank's generator (a collective)
        state["torch_rng_ranks"] = distributed.all_gather_object(torch.get_rng_state())
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
        checkpoint: Path | None = None, checkpoint_seconds: float = 60.0, key: str = "train",
        source: str = "") -> FitResult:
    """Train ``net`` in place; return the history and the restored best epoch's validation metrics.

    A ``cfg.batch_size`` the network cannot train with is refused first (:func:`check_batch_size`; ``key``
    and ``source`` name the stage's ``train`` table and the config file in the message). A last batch of a
    single image is left out of each epoch, as BatchNorm cannot train on it; a note says so once.

    With ``checkpoint``, the full training state (weights, optimizer, scheduler, random generators, best
    epoch so far, history) is saved there at most every ``checkpoint_seconds`` and when a stop is requested;
    if the file exists, training resumes from it and ends exactly as an uninterrupted run would on CPU.
    """
    check_batch_size(net, cfg, key=key, source=source)
    dev = train.x.device
    cuda = dev.type == "cuda"
    # DDP (torchrun), streamed data, augmentation v2, torch.compile: mltl.training.distributed, mltl.data.stream, mltl.data.augment
    ddp = distributed.info()
    streamed = is_streamed(train.x)
    aug_spec = augment.parse(cfg.augment)
    sync_bn = distributed.to_sync_batch_norm(net) if ddp.active and cfg.sync_batch_norm else None
    if cuda:
        net = net.to(memory_format=torch.channels_last)
    tuning = FineTuning(net, cfg)  # before a checkpoint loads: the L2-SP anchor is the stage's starting point
    opt = make_optimizer(net, cfg, tuning)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_factor(cfg))
    weight = None
    if cfg.class_weighted:
        counts = torch.bincount(train.y, minlength=len(classes)).float().clamp_min(1)
        weight = (counts.sum() / (len(classes) * counts)).to(dev)
    gen = torch.Generator().manual_seed(seed)
    y_host = train.y.cpu()
    n = len(train)
    batches = _batches(n, cfg.batch_size)  # (start, stop, this rank's positions) of each batch
    left_out = n - sum(j - i for i, j, _ in batches)
    if n and not batches:
        raise ConfigError(f"the training split's {n} image(s) make no batch of at least 2 images per process "
                          f"({cfg.batch_size} per batch, {ddp.world_size} process(es)), so nothing would train",
                          key=f"{key}.batch_size", source=source)
    if left_out:
        _note_once(f"{source + ': ' if source else ''}{key}.batch_size = {cfg.batch_size}: the {n} training images "
                   f"leave a last batch of {left_out}, too few to train on (BatchNorm needs 2 or more per process); "
                   f"each epoch leaves it out (the order is shuffled, so other images each time)")
    history: list[dict[str, Any]] = []
    best_score: float | None = None
    best_state: dict[str, torch.Tensor] | None = None
    best_epoch, best_val = -1, {}
    stale = 0
    first_epoch = 0
    if ddp.rank > 0:  # own dropout masks per rank (a resumed rank restores its own generator below)
        torch.manual_seed(seed + 1_000_003 * ddp.rank)
    if checkpoint is not None and distributed.broadcast_object(checkpoint.exists()):
        state = load_checkpoint(checkpoint)
        try:  # a checkpoint missing a key, with a wrong tensor shape or an impossible epoch is damaged
            epoch_ok = isinstance(state["epoch"], int) and 0 <= state["epoch"] <= cfg.epochs
            if not epoch_ok or len(state["history"]) != state["epoch"]:
                raise ValueError(f"epoch {state['epoch']!r} with {len(state['history'])} history rows, "
                                 f"for a stage of {cfg.epochs} epochs")
            net.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict({**state["scheduler"], "lr_lambdas": [None]})
            gen.set_state(state["generator"])
            torch.set_rng_state(state["torch_rng"])
            if ddp.active and len(state.get("torch_rng_ranks", ())) == ddp.world_size:
                torch.set_rng_state(state["torch_rng_ranks"][ddp.rank])
            if "cuda_rng" in state and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["cuda_rng"])
            history = list(state["history"])
            best_score, best_state, best_epoch = state["best_score"], state["best_state"], state["best_epoch"]
            best_val, stale, first_epoch = state["best_val"], state["stale"], state["epoch"]
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise UserError(f"{checkpoint}: damaged training checkpoint ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:200]}); delete it to restart this stage from its first "
                            f"epoch") from None
        if best_state is not None:
            best_state = {k: v.to(dev) for k, v in best_state.items()}
    start = time.perf_counter()
    last_save = time.monotonic()
    trainable: tuple[bool, ...] | None = None
    model: nn.Module = net  # what the loop calls: net, inside DDP under torchrun, compiled with train.compile
    fwd: Callable[..., torch.Tensor] = net
    compile_pending = False

    def forward_backward(f: Callable[..., torch.Tensor], xb: torch.Tensor, yb: torch.Tensor, i: int, j: int):
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
            logits = f(xb)
        if ddp.active:  # this rank's share of the global batch's mean; DDP's gradient average is then the mean
            denom = (j - i) if weight is None else weight[train.y[order[i:j]]].sum()
            loss = F.cross_entropy(logits.float(), yb, weight=weight, label_smoothing=cfg.label_smoothing,
                                   reduction="sum") * (ddp.world_size / denom)
        else:
            loss = F.cross_entropy(logits.float(), yb, weight=weight, label_smoothing=cfg.label_smoothing)
        opt.zero_grad(set_to_none=True)
        penalty = tuning.penalty()
        (loss if penalty is None else loss + penalty).backward()
        return loss

    for epoch in range(first_epoch, cfg.epochs):
        t0 = time.perf_counter()
        tuning.begin_epoch(epoch)
        net.train()
        now = tuple(p.requires_grad for p in net.parameters())
        if now != trainable:  # the first epoch, or gradual unfreezing changed what trains: (re)wrap
            trainable, model = now, distributed.wrap(net, dev)
            fwd, compile_pending = (_compile(model, cfg), True) if cfg.compile else (model, False)
        order_host = _epoch_order(cfg, n, gen, y_host)
        order = order_host.to(dev)
        aug = augment.to_device(augment.draw(aug_spec, n, gen), dev) if aug_spec.active else None
        feed = train.x.batches([order_host[r].numpy() for _, _, r in batches]) if streamed else None
        loss_sum = torch.zeros((), device=dev)
        seen = 0
        lr = opt.param_groups[0]["lr"]
        for i, j, rows in batches:
            idx = order[rows]
            xb = (next(feed) if streamed else train.x[idx]).float()
            if aug is not None:
                xb = augment.apply(xb, aug_spec, aug, rows,
                                   (slice(i, j), slice(ddp.rank, None, ddp.world_size)) if ddp.active else None)
            xb = normalise(xb, inp)
            yb = train.y[idx]
            if cuda:
                xb = xb.contiguous(memory_format=torch.channels_last)
            try:
                loss = forward_backward(fwd, xb, yb, i, j)
            except Exception as exc:  # noqa: BLE001 - torch.compile fails in many ways, at the first call
                if not compile_pending:
                    raise
                _compile_failed(exc)
                fwd = model
                loss = forward_backward(fwd, xb, yb, i, j)
            compile_pending = False
            opt.step()
            loss_sum += loss.detach() * ((j - i) / ddp.world_size)
            seen += j - i
        sched.step()
        if ddp.active:
            distributed.all_reduce_sum(loss_sum)
        train_loss = float(loss_sum) / max(seen, 1)
        if not math.isfinite(train_loss):
            raise UserError(
                f"training loss became {train_loss} in epoch {epoch + 1}: lower train.lr (now {cfg.lr}) "
                f"or check the input normalisation ([input] mean/std)"
            )
        row = {"epoch": epoch + 1, "loss": train_loss, "lr": lr, "val_loss": math.nan, "val_auc": math.nan,
               "val_accuracy": math.nan}
        if (epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs:
            probs = _val_proba(net, val, inp, len(classes))
            val_metrics = classification_metrics(val.y.cpu().numpy(), probs, classes)
            row.update(val_loss=val_metrics["loss"], val_auc=val_metrics["auc_macro"],
                       val_accuracy=val_metrics["accuracy"])
            score = metric_value(val_metrics, cfg.monitor)
            if distributed.broadcast_object(is_better(score, best_score, cfg.monitor)):  # rank 0 decides
                best_score, best_epoch, best_val, stale = score, epoch + 1, val_metrics, 0
                best_state = copy.deepcopy(net.state_dict())
            else:
                stale += 1  # counted in validations, not epochs
        row["seconds"] = time.perf_counter() - t0
        history.append(row)
        if on_epoch is not None:
            on_epoch(epoch + 1, row)
        stop = distributed.any_rank(stop_requested, dev)  # under DDP: a signal to any rank stops all
        finished = epoch + 1 == cfg.epochs or (cfg.patience is not None and stale >= cfg.patience)
        save = checkpoint is not None and not finished and (
            stop or time.monotonic() - last_save >= checkpoint_seconds)
        finished, save = distributed.broadcast_object((finished, save))  # rank 0's clock and decision
        if save:
            best = {"best_score": best_score, "best_state": best_state, "best_epoch": best_epoch,
                    "best_val": best_val, "stale": stale}
            state = _checkpoint_state(epoch + 1, net, opt, sched, gen, best, history)
            if distributed.is_writer():
                _save_checkpoint(checkpoint, state)
            last_save = time.monotonic()
        if stop and not finished:
            raise Interrupted(checkpoint)
        if finished:
            break
    tuning.end()
    if sync_bn is not None:
        distributed.from_sync_batch_norm(net, sync_bn)
    if best_state is not None:
        net.load_state_dict(best_state)
    else:  # the monitored metric was never defined: keep the last epoch
        best_epoch, best_val = len(history), classification_metrics(
            val.y.cpu().numpy(), _val_proba(net, val, inp, len(classes)), classes)
    if cuda:
        net = net.to(memory_format=torch.contiguous_format)
    return FitResult(history=history, best_epoch=best_epoch, val_metrics=best_val,
                     seconds=time.perf_counter() - start)
