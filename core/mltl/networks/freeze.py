"""Freeze policies: which layer groups of a network keep their weights during a stage.

A policy is written as a string in the config:

- a range of group names in network order: ``"C1-C3"`` (C1, C2 and C3), ``"C1-F2"``;
- a single group ``"C1"`` or a comma-separated list ``"C1,C3"``;
- a named policy registered by a plugin; built-ins: ``"none"``, ``"inherited"`` (every group whose
  weights came from the earlier stage: the paper's "everything but the new layers") and
  ``"all-but-classifier"`` (linear probing).

Frozen groups get ``requires_grad=False`` and their BatchNorm layers stay in eval mode; see
:class:`mltl.Network`.
"""

from __future__ import annotations

import attrs

from ..errors import ConfigError, did_you_mean
from .network import Network


@attrs.frozen
class FreezePolicy:
    """A freeze policy as written in a config; :meth:`resolve` turns it into group names for a network."""

    spec: str = "none"

    def resolve(self, network: Network, registry, *, key: str = "", source: str = "") -> frozenset[str]:
        spec = self.spec.strip()
        if spec in registry.names("freeze policy"):
            groups = frozenset(registry.get("freeze policy", spec).factory(network))
            unknown = groups - set(network.groups)
            if unknown:
                raise ValueError(f"freeze policy {spec!r} named unknown groups {sorted(unknown)}")
            return groups
        order = network.group_names()
        frozen: set[str] = set()
        for part in (p.strip() for p in spec.split(",")):
            if "-" in part:
                first, _, last = part.partition("-")
                i, j = (_index(order, name.strip(), spec, registry, key, source) for name in (first, last))
                if j < i:
                    raise ConfigError(f'range "{part}" runs backwards; network order is {"-".join(order)}',
                                      key=key, source=source)
                frozen.update(order[i : j + 1])
            else:
                frozen.add(order[_index(order, part, spec, registry, key, source)])
        return frozenset(frozen)


def _index(order: list[str], name: str, spec: str, registry, key: str, source: str) -> int:
    if name in order:
        return order.index(name)
    valid = order + registry.names("freeze policy")
    raise ConfigError(
        f'freeze policy "{spec}": this network has no layer group "{name}"{did_you_mean(name, valid)} '
        f"(groups in order: {', '.join(order)})",
        key=key, source=source,
    )


def freeze_none(network: Network) -> list[str]:
    """Train every layer."""
    return []


def freeze_inherited(network: Network) -> list[str]:
    """Freeze every group whose weights came from the earlier stage; train only the new layers."""
    return sorted(network.inherited)


def freeze_all_but_classifier(network: Network) -> list[str]:
    """Train only the classifier (linear probing)."""
    return [g for g in network.group_names() if g != "classifier"]
