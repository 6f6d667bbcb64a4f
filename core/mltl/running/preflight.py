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
from ..training.train import DEFAULT_MEAN, DEFAULT_STD, check_batch_size, normalisation
from .plan import StagePlan, domain_key, load_domains, plan_stage, stage_key


@attrs.frozen(eq=False)
class ChainPlan:
    """A chain ready to train: every domain loaded (near-duplicate groups merged where asked) and every
    stage planned."""

    config: Config
    domains: dict[str, Domain]
    stages: tuple[StagePlan, ...]
    input_note: str = ""  # how the chain's input is normalised and where that comes from (resolve_input)

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


def check_networks(config: Config, registry: Registry) -> dict[str, list[Network]]:
    """Build every variant's network (untrained, tiny placeholder classes) and resolve its freeze policy,
    so an unknown backbone option or layer group fails before any training. Returns them by stage."""
    return _build_networks(config, registry)


def resolve_input(config: Config, networks: dict[str, list[Network]]) -> tuple[Config, str]:
    """The chain's ``[input]`` with its normalisation made explicit, and a sentence for the run record.

    ``[input] mean`` / ``std`` in the config win. Otherwise the backbones' own preprocessing (a pretrained
    model's, :class:`~mltl.networks.network.Preprocessing`) is used; backbones that disagree must be settled
    by the config. A network without one (trained here from scratch) gets 0.5 / 0.25.
    """
    inp = config.input
    wanted = {}
    for stage in config.stages:
        for net in networks.get(stage.name, ()):
            if net.preprocessing is not None:
                pre = net.preprocessing
                wanted.setdefault((pre.mean, pre.std), pre)
    if len(wanted) > 1 and (inp.mean is None or inp.std is None):
        listed = "; ".join(f"{p.source or 'a backbone'}: mean {list(p.mean)}, std {list(p.std)}"
                           for p in wanted.values())
        raise ConfigError(f"the chain's backbones expect different input normalisations ({listed}); one [input] "
                          f"serves the whole chain: set [input] mean and std", key="input", source=config.source)
    pre = next(iter(wanted.values()), None) if len(wanted) == 1 else None
    mean = inp.mean if inp.mean is not None else (pre.mean if pre else (DEFAULT_MEAN,))
    std = inp.std if inp.std is not None else (pre.std if pre else (DEFAULT_STD,))
    if inp.mean is not None and inp.std is not None:
        origin = "[input] mean and std of the config"
    elif pre is not None:
        origin = f"the backbone's own ({pre.source or 'its pretrained weights'})"
        if inp.mean is not None or inp.std is not None:
            origin += ", with [input] " + ("mean" if inp.mean is not None else "std") + " of the config"
    else:
        origin = "mltl's default for networks trained from scratch" + (
            ", with [input] " + ("mean" if inp.mean is not None else "std") + " of the config"
            if inp.mean is not None or inp.std is not None else "")
    notes = []
    resolved = attrs.evolve(inp, mean=mean, std=std)
    m, s = normalisation(resolved)
    notes.append(f"input normalisation (pixel/255 - mean) / std with mean {_fmt(m)}, std {_fmt(s)}: {origin}")
    if len(mean) == 3 and inp.channels == 1:
        notes.append("grey input (channels = 1): the per-channel values are averaged")
    if pre is not None:
        if pre.channels == 3 and inp.channels == 1:
            notes.append("the pretrained weights expect 3 channels; fed 1 (grey), their first convolution's RGB "
                         "filters are summed (set [input] channels = 3 to replicate grey images instead)")
        elif pre.channels == 1 and inp.channels == 3:
            notes.append("the pretrained weights expect 1 channel and are fed 3")
        if pre.input_size and pre.input_size != inp.size:
            notes.append(f"the weights were trained at {pre.input_size} px and are fed {inp.size} px ([input] size)")
    return attrs.evolve(config, input=resolved), "; ".join(notes)


def _fmt(values: tuple[float, ...]) -> str:
    return ", ".join(f"{v:g}" for v in values) if len(values) > 1 else f"{values[0]:g}"


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


def validate(config: Config, registry: Registry | None = None) -> dict[str, list[Network]]:
    """Everything that can be checked without data: plugin names and options, networks, freeze groups.
    Returns the untrained networks by stage (what :func:`resolve_input` reads)."""
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
    if config.baseline is not None:  # [run] baseline: its network is checked like a stage's (a new backbone)
        nets = check_networks(attrs.evolve(config, stages=config.stages + (config.baseline,)), registry)
        return {name: v for name, v in nets.items() if name != config.baseline.name}
    return check_networks(config, registry)


def prepare(config: Config, registry: Registry | None = None) -> ChainPlan:
    """:func:`validate`, then read every domain, refuse leakage (``docs/data-check.md``), plan every stage and
    make every variant's first split: what ``mltl run`` and ``mltl validate`` check before training."""
    registry = registry or get_registry()
    config, input_note = resolve_input(config, validate(config, registry))
    domains = audit_leakage(config, load_domains(config, registry))
    plans = []
    for i, stage in enumerate(config.stages):
        plans.append(plan_stage(config, i, domains[domain_key(stage.first)]))
        for _, cfg in stage.variants:  # a protocol or split the data cannot support fails now
            domain = domains[domain_key(cfg)]
            variant_plan = plan_stage(config, i, domain, cfg)
            variant_plan.split(domain, cfg, variant_plan.repeats[0])
    if config.baseline is not None:
        # [run] baseline = "scratch": planned as the last stage itself (its protocol, repeats, training seed and
        # so its splits), trained just before it; nothing inherits from it, and the last stage stays last
        plans.insert(len(plans) - 1, attrs.evolve(plans[-1], stage=config.baseline))
    return ChainPlan(config=config, domains=domains, stages=tuple(plans), input_note=input_note)


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
