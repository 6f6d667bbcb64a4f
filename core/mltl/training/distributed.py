"""Training on several processes with torch.distributed and DistributedDataParallel (``torchrun``).

    torchrun --nproc-per-node 4 -m mltl run CONFIG.toml

How a chain runs under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment):

- **Process group.** :func:`setup` joins the group that torchrun describes (``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``): NCCL on CUDA, where rank r uses ``cuda:LOCAL_RANK``,
  gloo on CPU. The engine is PyTorch's :class:`~torch.nn.parallel.DistributedDataParallel`; nothing here
  averages gradients by hand.
- **Data.** Every rank holds the stage's data (resident on its device, or streamed from the host) and
  draws the same seeded permutation of the training split each epoch. A global batch of
  ``train.batch_size`` images is the same slice of that permutation as in a single process; rank r trains
  on its positions ``r, r + W, r + 2W, ...`` of it (the strided split of ``DistributedSampler``, done on
  the device-resident index tensor). Each rank's loss is its share of the global batch's mean
  (``sum over its images / global batch size * W``), so DDP's gradient average equals the gradient of the
  global batch's mean exactly, also for a short last batch and with class weights. With no BatchNorm
  and no dropout, W processes therefore train the same model as one process, up to the order of float
  additions (``tests/test_ddp.py``). A global batch in which some rank would get fewer than 2 images is
  skipped (one process skips a batch of 1).
- **Augmentation** parameters are drawn per position of the epoch's order from the shared generator, so
  every image gets the flip, angle or crop it would get in one process.
- **Dropout** masks come from the global torch generator, seeded per rank (``seed + rank`` offset), so
  ranks do not repeat each other's masks; a checkpoint stores every rank's generator state.
- **BatchNorm.** By default each rank normalises with its local batch statistics and DDP broadcasts rank
  0's running statistics at every forward; mltl also broadcasts them before every validation so all
  ranks score the same model. ``train.sync_batch_norm = true`` converts the trainable BatchNorm layers to
  :class:`~torch.nn.SyncBatchNorm` for the stage (global batch statistics) and back to plain BatchNorm
  afterwards. Frozen BatchNorm layers stay in eval mode either way.
- **Validation.** The validation split is cut into W contiguous parts; each rank scores its part and the
  probabilities are all-gathered in order, so every rank computes the same metrics from the same numbers,
  and the early-stopping and best-epoch decisions (and a stop request from SIGINT/SIGTERM) are
  additionally broadcast from rank 0. Test predictions are computed on every rank over the whole split.
- **The run directory** is chosen and locked by rank 0 and broadcast; only rank 0 writes (state,
  checkpoints, weights, metrics, reports, console output): :mod:`mltl.running.rundir`'s writers do nothing on
  other ranks. ``--resume`` works under torchrun (every rank reads rank 0's checkpoint), so the run
  directory must be on a filesystem all ranks see (always true on one machine).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from typing import Any, TypeVar

import attrs
import torch
from torch import nn

from ..errors import UserError

T = TypeVar("T")


@attrs.frozen
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_writer(self) -> bool:
        return self.rank == 0


_info = DistInfo()
_we_initialised = False


def info() -> DistInfo:
    """This process's place in the group (rank 0 of 1 when not distributed)."""
    return _info


def active() -> bool:
    return _info.active


def is_writer() -> bool:
    """Whether this process writes the run directory (rank 0, or the only process)."""
    return _info.is_writer


def env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise UserError(f"WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} is not a number; launch with torchrun") from None


def setup(device_spec: str) -> torch.device | None:
    """Join torchrun's process group when ``WORLD_SIZE`` > 1; return this rank's device (None: not distributed).

    ``device_spec`` is the run's device setting: ``auto``/``cuda`` use ``cuda:LOCAL_RANK`` with NCCL when
    CUDA is present, ``cpu`` (or no CUDA) uses the CPU with gloo. Calling it again reuses the group.
    """
    global _info, _we_initialised
    world = env_world_size()
    if world <= 1:
        return None
    import torch.distributed as dist

    try:
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    except (KeyError, ValueError):
        raise UserError("WORLD_SIZE is set but RANK/LOCAL_RANK are not: launch distributed runs with "
                        "torchrun --nproc-per-node N -m mltl run CONFIG") from None
    use_cuda = device_spec != "cpu" and not device_spec.startswith("mps") and torch.cuda.is_available()
    if device_spec.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f'device "{device_spec}" was asked for but CUDA is not available here; use --device cpu')
    if use_cuda:
        if local >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA device(s): start at "
                            f"most that many processes per node (--nproc-per-node)")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo",
                                timeout=datetime.timedelta(minutes=int(os.environ.get("MLTL_DIST_TIMEOUT_MIN", "30"))))
        _we_initialised = True
        import atexit

        atexit.register(_teardown)
    _info = DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local)
    return device


def _teardown() -> None:
    import torch.distributed as dist

    if _we_initialised and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        import torch.distributed as dist

        dist.barrier()


def broadcast_object(obj: T) -> T:
    """Rank 0's ``obj`` on every rank (pickled; small objects only)."""
    if not active():
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    if not active():
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * _info.world_size
    dist.all_gather_object(out, obj)
    return out


def on_rank0(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and hand its result to every rank; a UserError on rank 0 is raised on all
    ranks (so that no rank waits forever for one that gave up)."""
    if not active():
        return fn()
    result: tuple[str, Any] = ("ok", None)
    if is_writer():
        try:
            result = ("ok", fn())
        except UserError as exc:
            result = ("error", str(exc))
            broadcast_object(result)
            raise
        except BaseException as exc:
            broadcast_object(("error", f"rank 0 failed: {type(exc).__name__}: {exc}"))
            raise
    result = broadcast_object(result)
    if result[0] == "error":
        raise UserError(result[1])
    return result[1]


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on any rank (one small all-reduce)."""
    if not active():
        return flag
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if active():
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def gather_rows(local: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Every rank's ``local`` rows (rank r holds ``sizes[r]`` rows), concatenated in rank order, on every rank."""
    if not active():
        return local
    import torch.distributed as dist

    width = max(sizes)
    pad = local.new_zeros((width, *local.shape[1:]))
    pad[: local.shape[0]] = local
    parts = [torch.empty_like(pad) for _ in sizes]
    dist.all_gather(parts, pad.contiguous())
    return torch.cat([p[:k] for p, k in zip(parts, sizes)])


def batches(n: int, batch_size: int) -> list[tuple[int, int, slice]]:
    """The epoch's global batches ``[start, stop)`` of the order and this rank's positions in each.

    One process: every batch, except a last batch of a single image (a BatchNorm cannot train on one).
    Under DDP: rank r takes positions ``start + r, start + r + W, ...`` (the strided split of
    ``DistributedSampler``); a batch in which some rank would get fewer than 2 images is skipped.
    """
    w, r = _info.world_size, _info.rank
    out = []
    for i in range(0, n, batch_size):
        j = min(i + batch_size, n)
        if (j - i) // w < 2 and n > 1:
            continue
        out.append((i, j, slice(i + r, j, w)))
    return out


def shard_bounds(n: int) -> list[tuple[int, int]]:
    """Contiguous ``[start, stop)`` parts of ``n`` rows, one per rank (sizes differ by at most one)."""
    w = _info.world_size
    cuts = [n * r // w for r in range(w + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


def broadcast_buffers(module: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank."""
    if not active():
        return
    import torch.distributed as dist

    with torch.no_grad():
        for b in module.buffers():
            dist.broadcast(b, src=0)


def wrap(net: nn.Module, device: torch.device) -> nn.Module:
    """``net`` inside DistributedDataParallel (a no-op when not distributed)."""
    if not active():
        return net
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(net, device_ids=[device.index] if device.type == "cuda" else None)


def to_sync_batch_norm(net: nn.Module) -> dict[str, type]:
    """Replace the BatchNorm layers of ``net`` by SyncBatchNorm in place (same parameter and buffer
    objects); return their original classes by module path, for :func:`from_sync_batch_norm`."""
    originals = {name: type(m) for name, m in net.named_modules()
                 if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, nn.SyncBatchNorm)}
    for name, cls in originals.items():
        _replace(net, name, _convert_bn(net.get_submodule(name), nn.SyncBatchNorm))
    return originals


def from_sync_batch_norm(net: nn.Module, originals: dict[str, type]) -> None:
    for name, cls in originals.items():
        _replace(net, name, _convert_bn(net.get_submodule(name), cls))


def _convert_bn(m: nn.Module, cls: type) -> nn.Module:
    out = cls(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
    if m.affine:
        out.weight, out.bias = m.weight, m.bias  # the same Parameter objects (requires_grad kept)
    out.running_mean, out.running_var, out.num_batches_tracked = m.running_mean, m.running_var, m.num_batches_tracked
    out.train(m.training)
    return out


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)
