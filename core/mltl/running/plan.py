"""The plan of a chain: each stage's domain, protocol, repeats and train/val/test splits, made in one place.

``mltl run``, ``mltl validate``, ``mltl data check``, ``mltl rank``, ``--resume`` and ``--reuse`` all take
their splits from here, so they cannot drift apart: :func:`load_domains` reads every distinct domain once,
:func:`plan_stage` resolves a stage's protocol and repeats, and :meth:`StagePlan.split` makes the indices of
one repeat of one variant. :func:`mltl.running.preflight.prepare` puts these together before anything trains.
"""

from __future__ import annotations

import json
import zlib

import attrs
import numpy as np

from ..config import Config, Stage, StageConfig
from ..data.domain import Domain, check_split_classes, deal_groups, kfold_assignment, make_splits, subsample
from ..plugins import Registry
from .protocols import Repeat, plan_repeats, resolve_protocol, splits_from_file


def domain_key(cfg: StageConfig) -> str:
    """Stages (and sweep variants) whose domain tables are equal share one loaded domain."""
    return json.dumps([cfg.domain.plugin, cfg.domain.options], sort_keys=True, default=str)


def stage_key(index: int) -> str:
    """How messages name a stage's table in the config: ``stages[2]``."""
    return f"stages[{index}]"


def load_domains(config: Config, registry: Registry) -> dict[str, Domain]:
    """Every distinct domain of the chain, loaded once (keyed by :func:`domain_key`)."""
    out: dict[str, Domain] = {}
    for i, stage in enumerate(config.stages):
        for _, cfg in stage.variants:
            k = domain_key(cfg)
            if k in out:
                continue
            dom = registry.create("domain", cfg.domain.plugin, cfg.domain.options,
                                  key=f"{stage_key(i)}.domain", source=config.source,
                                  extra={"image_size": config.input.size})
            if not isinstance(dom, Domain):
                raise TypeError(f"domain plugin {cfg.domain.plugin!r} returned {type(dom).__name__}, not mltl.Domain")
            out[k] = dom
    return out


@attrs.frozen
class StagePlan:
    """How one stage is trained and evaluated: its protocol, its repeats, its seed, and its splits."""

    config: Config = attrs.field(repr=False)
    index: int
    stage: Stage
    protocol: str  # "holdout", "kfold" or "fractions" (never "auto")
    repeats: tuple[Repeat, ...]
    seed: int  # the training seed of every variant (a repeat adds its seed_offset)

    @property
    def key(self) -> str:
        return stage_key(self.index)

    @property
    def last(self) -> bool:
        return self.index == len(self.config.stages) - 1

    def where(self, cfg: StageConfig | None = None) -> str:
        """The prefix of a message about this stage's data."""
        return f"{self.config.source}: {self.key} ({(cfg or self.stage.first).domain.plugin}): "

    def split(self, domain: Domain, cfg: StageConfig, rep: Repeat) -> dict[str, np.ndarray]:
        """The train/val/test indices of repeat ``rep`` of variant ``cfg`` (holdout, fold or training fraction)."""
        sp, where = cfg.split, self.where(cfg)
        split_seed = self.config.run.seed if sp.seed is None else sp.seed
        if sp.file is not None:
            splits = splits_from_file(domain, sp.file, where)
        elif rep.fold is not None:
            fold = kfold_assignment(domain, sp.folds, seed=split_seed, where=where)
            rest = np.flatnonzero(fold != rep.fold)
            dealt = deal_groups(domain, rest, {"val": sp.val}, seed=split_seed + 1 + rep.fold,
                                min_per_class=sp.min_per_class, where=where)
            splits = {"train": dealt["train"], "val": dealt["val"], "test": np.flatnonzero(fold == rep.fold)}
        else:
            splits = make_splits(domain, val=sp.val, test=sp.test, seed=split_seed,
                                 min_per_class=sp.min_per_class, where=where)
        if rep.fraction is not None:
            splits = {**splits, "train": subsample(domain, splits["train"], rep.fraction,
                                                   seed=split_seed * 7919 + 1000 * rep.fraction_index + rep.draw)}
        check_split_classes(domain, splits, where)
        return splits

    def repeat(self, label: str) -> Repeat | None:
        """The repeat of this label (``""`` for a single holdout), or None."""
        return next((r for r in self.repeats if r.label == label), None)


def plan_stage(config: Config, index: int, domain: Domain, cfg: StageConfig | None = None) -> StagePlan:
    """The plan of stage ``index``, whose (first variant's) domain is ``domain``; ``cfg`` resolves the protocol
    of another variant instead (a sweep over split settings)."""
    stage = config.stages[index]
    cfg = cfg or stage.first
    protocol = resolve_protocol(cfg.split, last=index == len(config.stages) - 1, domain=domain,
                                key=f"{stage_key(index)}.split", source=config.source)
    # the same for every variant (a fair comparison), and for a stage of this name in any chain (mltl compare)
    seed = config.run.seed * 1000 + zlib.crc32(stage.name.encode()) % 1000
    return StagePlan(config=config, index=index, stage=stage, protocol=protocol,
                     repeats=tuple(plan_repeats(cfg.split, protocol)), seed=seed)


def partition(plan: StagePlan, domain: Domain, cfg: StageConfig) -> np.ndarray:
    """Per image, where the run puts it: ``train``/``val``/``test`` of the holdout (or ``split.file``) split,
    or ``fold-k`` (its test fold) under k-fold. A fractions stage trains on subsets of the holdout training
    split; the whole split is given (the audit treats every image that may be trained on as trained on)."""
    part = np.full(len(domain), "", dtype=object)
    if plan.protocol == "kfold" and cfg.split.file is None:
        split_seed = plan.config.run.seed if cfg.split.seed is None else cfg.split.seed
        fold = kfold_assignment(domain, cfg.split.folds, seed=split_seed, where=plan.where(cfg))
        return np.array([f"fold-{f + 1}" for f in fold], dtype=object)
    for s, idx in plan.split(domain, cfg, Repeat(label="")).items():
        part[idx] = s
    return part


__all__ = ["StagePlan", "domain_key", "load_domains", "partition", "plan_stage", "stage_key"]

