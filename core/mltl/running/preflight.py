"""Everything checked before the first stage trains, the same for ``mltl run`` and ``mltl validate``.

:func:`validate` checks what needs no data (plugin names and options, reporters, every variant's network
and freeze policy). :func:`prepare` then reads every domain, audits duplicates across splits and stages,
plans each stage (:mod:`mltl.running.plan`) and makes every variant's first split, so a bad path, a leak or a split
the data cannot make in the last stage fails in seconds, not after hours of training.
"""

from __future__ import annotations

import attrs
import torch

from ..config import Config
from ..data.datacheck import audit_leakage
from ..data.domain import Domain
from ..errors import ConfigError, UserError
from ..evaluation.reporting import make_reporters
from ..networks.finetune import check as check_finetuning
from ..networks.freeze import FreezePolicy
from ..networks.network import HeadSpec, Network, build_network, derive, make_spec
from ..plugins import Registry, check_options, get_registry
from .plan import StagePlan, domain_key, load_domains, plan_stage, stage_key


@attrs.frozen(eq=False)
class ChainPlan:
    """A chain ready to train: every domain loaded (near-duplicate groups merged where asked) and every
    stage planned."""

    config: Config
    domains: dict[str, Domain]
    stages: tuple[StagePlan, ...]

    def domain(self, cfg) -> Domain:
        return self.domains[domain_key(cfg)]


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f'device "{spec}" was asked for but CUDA is not available here; use --device cpu or auto')
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f'device "{spec}" was asked for but MPS is not available here; use --device cpu or auto')
    return dev


def check_networks(config: Config, registry: Registry) -> None:
    """Build every variant's network (untrained, tiny placeholder classes) and resolve its freeze policy,
    so an unknown backbone option or layer group fails before any training."""
    built: dict[str, list[Network]] = {}
    for i, stage in enumerate(config.stages):
        key = stage_key(i)
        nets = []
        for _, cfg in stage.variants:
            if cfg.backbone is not None:
                spec = make_spec(cfg.backbone.name, cfg.backbone.options, config.input.channels,
                                 config.input.size, cfg.head or HeadSpec(), ("a", "b"))
                candidates = [build_network(spec, registry, key=f"{key}.backbone", source=config.source)]
            else:
                candidates = [derive(p, registry, classes=("a", "b", "c"), head=cfg.head,
                                     in_chans=config.input.channels, image_size=config.input.size,
                                     key=key, source=config.source)[0] for p in built[cfg.init]]
            errors = []
            for net in candidates:
                try:
                    net.set_frozen(FreezePolicy(cfg.freeze).resolve(net, registry, key=f"{key}.freeze",
                                                                    source=config.source))
                    check_finetuning(net, cfg.train, key=f"{key}.train", source=config.source)
                except ConfigError as exc:
                    errors.append(exc)
            if len(errors) == len(candidates):  # wrong for every network the stage may start from
                raise errors[0]
            nets.extend(candidates)
        built[stage.name] = nets


def validate(config: Config, registry: Registry | None = None) -> None:
    """Everything that can be checked without data: plugin names and options, networks, freeze groups."""
    registry = registry or get_registry()
    for i, stage in enumerate(config.stages):
        for _, cfg in stage.variants:
            item = registry.get("domain", cfg.domain.plugin, key=f"{stage_key(i)}.domain.plugin",
                                source=config.source)
            check_options(item.factory, cfg.domain.options, key=f"{stage_key(i)}.domain", source=config.source,
                          reserved={"image_size"})
    for name in config.run.reporters or ():
        registry.get("reporter", name, key="run.reporters", source=config.source)
    make_reporters(config, registry)  # names and options of the reporters, before any data is read
    check_networks(config, registry)


def prepare(config: Config, registry: Registry | None = None) -> ChainPlan:
    """:func:`validate`, then read every domain, refuse leakage (``docs/data-check.md``), plan every stage and
    make every variant's first split: what ``mltl run`` and ``mltl validate`` check before training."""
    registry = registry or get_registry()
    validate(config, registry)
    domains = audit_leakage(config, load_domains(config, registry))
    plans = []
    for i, stage in enumerate(config.stages):
        plans.append(plan_stage(config, i, domains[domain_key(stage.first)]))
        for _, cfg in stage.variants:  # a protocol or split the data cannot support fails now
            domain = domains[domain_key(cfg)]
            variant_plan = plan_stage(config, i, domain, cfg)
            variant_plan.split(domain, cfg, variant_plan.repeats[0])
    return ChainPlan(config=config, domains=domains, stages=tuple(plans))
