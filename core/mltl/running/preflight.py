"""Everything checked before the first stage trains, the same for ``mltl run`` and ``mltl validate``.

:func:`validate` checks what needs no data (plugin names and options, reporters, every variant's network
and freeze policy). :func:`prepare` then reads every domain, audits duplicates across splits and stages,
plans each stage (:mod:`mltl.running.plan`) and makes every variant's first split, so a bad path, a leak or a split
the data cannot make in the last stage fails in seconds, not after hours of training.
"""

from __future__ import annotations

import os
from pathlib import Path

import attrs
import torch

from ..config import SEED_MAX, Config
from ..data.datacheck import audit_leakage
from ..data.domain import Domain
from ..errors import ConfigError, UserError
from ..evaluation.reporting import make_reporters
from ..networks.finetune import check as check_finetuning
from ..networks.freeze import FreezePolicy
from ..networks.network import HeadSpec, Network, build_network, derive, make_spec
from ..plugins import Registry, check_options, get_registry
from ..training.train import check_batch_size
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


# Training holds about four copies of the parameters (weights, gradients, two optimiser moments).
TRAINING_COPIES = 4


def memory_bytes() -> int | None:
    """This machine's physical memory (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def check_network_sizes(config: Config, registry: Registry, memory: int | None = None) -> None:
    """Count every variant's parameters on the ``meta`` device (no memory allocated) and refuse a network
    whose training state (:data:`TRAINING_COPIES` float32 copies) exceeds this machine's memory, before the
    real build below allocates and initialises it (a large ``[input] size`` makes a flattening backbone's
    dense layers huge; so do wide ``head.dense`` layers)."""
    memory = memory if memory is not None else memory_bytes()
    if not memory:
        return
    try:
        with torch.device("meta"):
            nets = _build_networks(config, registry)
    except UserError:
        raise
    except Exception:  # noqa: BLE001 -- a backbone that cannot be built on "meta": the real build checks it
        return
    for i, stage in enumerate(config.stages):
        for net in nets.get(stage.name, []):
            n = sum(p.numel() for p in net.parameters())
            need = n * 4 * TRAINING_COPIES
            if need > memory:
                raise ConfigError(
                    f"the network has {n:,} parameters ({n * 4 / 1e9:.1f} GB of float32 weights, about "
                    f"{need / 1e9:.0f} GB to train), more than this machine's {memory / 1e9:.0f} GB of memory; "
                    f"lower [input] size or the head's dense widths, or choose a smaller backbone",
                    key=stage_key(i), source=config.source)


def check_seed_options(config: Config) -> None:
    """A domain or backbone option named ``seed`` (or ``*_seed``) must be a seed numpy accepts."""
    for i, stage in enumerate(config.stages):
        for _, cfg in stage.variants:
            tables = [("domain", cfg.domain.options)]
            if cfg.backbone is not None:
                tables.append(("backbone", cfg.backbone.options))
            for where, options in tables:
                for name, value in options.items():
                    if (name == "seed" or str(name).endswith("_seed")) and isinstance(value, int) \
                            and not isinstance(value, bool) and not 0 <= value <= SEED_MAX:
                        raise ConfigError(f"{value} must be a seed from 0 to {SEED_MAX} (2**32 - 1)",
                                          key=f"{stage_key(i)}.{where}.{name}", source=config.source)


def check_output_names(config: Config, reporters: list) -> None:
    """A stage folder must not be a file or folder that a reporter writes in the run directory."""
    outputs = {}
    for rep in reporters:
        for attr in ("file", "log_dir"):
            value = getattr(rep, attr, None)
            if isinstance(value, str):
                outputs[value.lower()] = f"{type(rep).__name__} {attr}"
    for i, stage in enumerate(config.stages):
        if stage.name.lower() in outputs:
            raise ConfigError(f'stage name "{stage.name}" is also the name of what a reporter writes in the run '
                              f'directory ({outputs[stage.name.lower()]}); rename the stage or the reporter option',
                              key=f"{stage_key(i)}.name", source=config.source)


def check_networks(config: Config, registry: Registry) -> None:
    """Build every variant's network (untrained, tiny placeholder classes) and resolve its freeze policy,
    so an unknown backbone option or layer group fails before any training."""
    _build_networks(config, registry)


def _build_networks(config: Config, registry: Registry) -> dict[str, list[Network]]:
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
                    check_batch_size(net, cfg.train, key=f"stages.{stage.name}.train", source=config.source)
                except ConfigError as exc:
                    errors.append(exc)
            if len(errors) == len(candidates):  # wrong for every network the stage may start from
                raise errors[0]
            nets.extend(candidates)
        built[stage.name] = nets
    return built


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
    reporters = make_reporters(config, registry)  # names and options of the reporters, before any data is read
    check_output_names(config, reporters)
    check_seed_options(config)
    check_network_sizes(config, registry)
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


def check_not_inside_data(config: Config, run_dir: Path) -> None:
    """Refuse a run directory inside a folder a domain reads (its figures would become training images of
    the next run, and a data check would report them as leakage)."""
    where = run_dir.expanduser().resolve()
    for i, stage in enumerate(config.stages):
        for _, cfg in stage.variants:
            for option, value in cfg.domain.options.items():
                if not isinstance(value, str) or not value or not Path(value).expanduser().is_dir():
                    continue
                folder = Path(value).expanduser().resolve()
                if where == folder or folder in where.parents:
                    raise UserError(f"{config.source}: the run directory {run_dir} is inside {folder}, which "
                                    f"{stage_key(i)}.domain.{option} reads: the run's files would become its "
                                    f"data; put the run elsewhere (--out, or run from another folder)")
