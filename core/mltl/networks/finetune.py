"""Fine-tuning methods for small targets, selected per stage in ``[stages.train]``.

All of them work on the network's named layer groups (``C1``.., ``F1``.., ``N1``.., ``classifier``; see
:class:`mltl.Network`) and never touch a group the stage's freeze policy froze.

- **Layer-wise learning-rate decay** (``lr_decay = d``): the classifier trains at ``lr``, the group below
  it at ``lr * d``, the next at ``lr * d**2`` .., counted in network order over *all* groups (frozen ones
  included, so a group's rate does not depend on the freeze policy).
- **Differential learning rates** (``group_lr = { C1 = 0.1, classifier = 2.0 }``): multipliers of ``lr``
  per group; multiplied with the decay when both are given. Groups not named keep a multiplier of 1.
  Both are optimizer parameter groups (one per layer group) whose *initial* learning rates differ; the
  stage's schedule (warm-up, cosine, step) multiplies each group's initial rate by the same factor, as
  :class:`torch.optim.lr_scheduler.LambdaLR` does, so the ratios hold at every step.
- **Gradual unfreezing** (``unfreeze_every = N``): the head (``N1``.. and ``classifier``) trains alone for
  ``probe_epochs`` epochs (default ``N``), then the trunk groups join one at a time from the top (the
  deepest first), one every ``N`` epochs: trunk group ``j`` (0 = deepest) joins at epoch
  ``probe_epochs + N * j`` (0-based). Groups the freeze policy froze are skipped and never join.
- **Linear probing, then fine-tuning** (``probe_epochs = P`` without ``unfreeze_every``): the head trains
  alone for ``P`` epochs, then every group the freeze policy left trainable.
- **L2-SP** (``l2sp = alpha``, ``l2sp_beta = beta``; Li, Grandvalet & Davoine, ICML 2018): the loss gains
  ``alpha/2 * ||w - w0||^2`` over the parameters that came from the earlier stage (the groups the network
  inherited; for a stage with a new backbone, the trunk, i.e. its pretrained weights), where ``w0`` is the
  network's state when the stage *started* -- in a chain, stage k-1's selected weights, not ImageNet's.
  Those parameters get no weight decay (they are pulled to ``w0``, not to 0). ``beta/2 * ||w||^2`` applies
  to the new layers (the rest). Frozen parameters are constants and add nothing.

Groups that wait to be unfrozen are frozen exactly like policy-frozen ones while they wait:
``requires_grad=False`` *and* their BatchNorm layers in eval mode (running statistics untouched), so a
waiting group's state is the one it started from when it joins. They are in the optimizer from the first
epoch (with no gradient the optimizer skips them: no momentum, no weight decay), so the optimizer's
parameter groups have the same structure at every epoch and a resumed checkpoint restores them exactly.

With none of these set, training uses one parameter group as before, bit for bit.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, did_you_mean

HEAD_PREFIX = "N"
CLASSIFIER = "classifier"


def uses_groups(cfg: Any) -> bool:
    """Whether ``cfg`` (a TrainConfig) asks for any method that needs per-group handling."""
    return bool(cfg.lr_decay is not None or cfg.group_lr or cfg.unfreeze_every is not None
                or cfg.probe_epochs is not None or cfg.l2sp is not None or cfg.l2sp_beta is not None)


def _is_head(group: str) -> bool:
    return group == CLASSIFIER or (group.startswith(HEAD_PREFIX) and group[1:].isdigit())


def check(net: nn.Module, cfg: Any, *, key: str = "train", source: str = "") -> None:
    """A :class:`ConfigError` when ``cfg``'s fine-tuning settings cannot apply to ``net`` (after its freeze
    policy is set): an unknown group in ``group_lr``, or a probe phase in which nothing would train."""
    if not uses_groups(cfg):
        return
    groups = getattr(net, "groups", None)
    if groups is None:
        raise ConfigError("fine-tuning methods need an mltl Network with named layer groups", key=key, source=source)
    names = list(groups)
    for name in cfg.group_lr or {}:
        if name not in groups:
            hint = did_you_mean(name, names)
            raise ConfigError(f'no layer group "{name}" in this network{hint if "did you" in hint else ""} '
                              f"(groups in order: {', '.join(names)})", key=f"{key}.group_lr", source=source)
    if cfg.unfreeze_every is not None or cfg.probe_epochs is not None:
        trainable_head = [g for g in names if _is_head(g) and g not in net.frozen]
        if not trainable_head:
            which = "unfreeze_every" if cfg.unfreeze_every is not None else "probe_epochs"
            raise ConfigError("the freeze policy froze the whole head, so nothing would train while the trunk "
                              "waits; leave the classifier trainable", key=f"{key}.{which}", source=source)


class FineTuning:
    """The per-stage state of the fine-tuning methods: parameter groups, the unfreezing schedule, L2-SP.

    Create it after the freeze policy is set and before the optimizer; it records the policy's frozen
    groups and, for L2-SP, the network's weights at this moment (the anchor).
    """

    def __init__(self, net: nn.Module, cfg: Any) -> None:
        self.net, self.cfg = net, cfg
        self.active = uses_groups(cfg)
        if not self.active:
            return
        check(net, cfg)
        self.policy: frozenset[str] = frozenset(net.frozen)
        names = net.group_names()
        self.order = names
        trunk_groups = [g for g in names if not _is_head(g)]
        # every parameter the freeze policy left trainable, assigned to exactly one layer group; parameters
        # outside every group (e.g. a backbone's final norm) join the deepest trunk group, or the classifier
        owner: dict[int, str] = {}
        for g in names:
            for p in net.group_parameters(g):
                owner.setdefault(id(p), g)
        fallback_trunk = trunk_groups[-1] if trunk_groups else CLASSIFIER
        self.members: dict[str, list[nn.Parameter]] = {g: [] for g in names}
        for pname, p in net.named_parameters():
            if not p.requires_grad:
                continue
            g = owner.get(id(p)) or (fallback_trunk if pname.startswith("trunk.") else CLASSIFIER)
            self.members[g].append(p)
        # the unfreezing schedule: the epoch (0-based) at which each waiting trunk group joins
        self.joins: dict[str, int] = {}
        if cfg.unfreeze_every is not None or cfg.probe_epochs is not None:
            probe = cfg.probe_epochs if cfg.probe_epochs is not None else cfg.unfreeze_every
            waiting = [g for g in reversed(trunk_groups) if g not in self.policy]  # deepest first
            for j, g in enumerate(waiting):
                self.joins[g] = probe + (cfg.unfreeze_every * j if cfg.unfreeze_every is not None else 0)
        # L2-SP: the anchor is the state the stage starts from, for the groups that came from the earlier
        # stage (or, for a new backbone, its trunk: its pretrained weights)
        self.anchored: list[tuple[nn.Parameter, torch.Tensor]] = []
        self.plain: list[nn.Parameter] = []
        if cfg.l2sp is not None or cfg.l2sp_beta is not None:
            source_groups = set(net.inherited) if net.inherited else set(trunk_groups)
            for g in names:
                for p in self.members[g]:
                    if g in source_groups:
                        self.anchored.append((p, p.detach().clone()))
                    else:
                        self.plain.append(p)

    # ---------------------------------------------------------------- optimizer

    def lr_multiplier(self, group: str) -> float:
        """The factor on ``lr`` of a layer group: ``lr_decay ** k`` (k = 0 for the classifier, 1 for the group
        below it, ...) times its ``group_lr`` multiplier."""
        cfg = self.cfg
        k = len(self.order) - 1 - self.order.index(group)
        mult = (cfg.lr_decay ** k) if cfg.lr_decay is not None else 1.0
        return mult * float((cfg.group_lr or {}).get(group, 1.0))

    def param_groups(self, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """One optimizer parameter group per layer group with trainable parameters, classifier first (so
        ``opt.param_groups[0]["lr"]`` is the classifier's rate), each with its own initial rate; with L2-SP
        the anchored groups get no weight decay."""
        anchored = {id(p) for p, _ in self.anchored}
        out = []
        for g in reversed(self.order):
            params = self.members[g]
            if not params:
                continue
            wd = 0.0 if self.cfg.l2sp is not None and any(id(p) in anchored for p in params) else weight_decay
            out.append({"params": params, "lr": lr * self.lr_multiplier(g), "weight_decay": wd, "group": g})
        return out

    # ---------------------------------------------------------------- schedule

    def waiting(self, epoch: int) -> frozenset[str]:
        """Trunk groups that still wait to be unfrozen in ``epoch`` (0-based)."""
        return frozenset(g for g, at in self.joins.items() if epoch < at)

    def begin_epoch(self, epoch: int) -> None:
        """Freeze the policy's groups and the groups still waiting in this epoch (weights and BatchNorm)."""
        if not self.active or not self.joins:
            return
        waiting = self.waiting(epoch)
        self.net.set_frozen(self.policy | waiting)
        for g, params in self.members.items():  # also parameters outside any group, assigned to one above
            for p in params:
                p.requires_grad_(g not in waiting)

    def end(self) -> None:
        """Back to the freeze policy alone (every waiting group trainable again), after training."""
        if self.active and self.joins:
            self.net.set_frozen(self.policy)
            for params in self.members.values():
                for p in params:
                    p.requires_grad_(True)

    # ---------------------------------------------------------------- L2-SP

    def penalty(self) -> torch.Tensor | None:
        """``alpha/2 ||w - w0||^2`` over the anchored parameters plus ``beta/2 ||w||^2`` over the new ones,
        counting only parameters that train now; None when L2-SP is off."""
        cfg = self.cfg
        if not self.active or (cfg.l2sp is None and cfg.l2sp_beta is None):
            return None
        total = None
        if cfg.l2sp:
            terms = [(p - w0).pow(2).sum() for p, w0 in self.anchored if p.requires_grad]
            if terms:
                total = 0.5 * cfg.l2sp * torch.stack(terms).sum()
        if cfg.l2sp_beta:
            terms = [p.pow(2).sum() for p in self.plain if p.requires_grad]
            if terms:
                extra = 0.5 * cfg.l2sp_beta * torch.stack(terms).sum()
                total = extra if total is None else total + extra
        return total
