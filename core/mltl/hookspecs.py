"""Every hook a plugin can implement, documented in one place.

A plugin is a module (or object) whose functions are marked with :data:`hookimpl` and named after the
specs below. Installed plugins announce themselves through the entry-point group ``mltl``; mltl's own
built-ins are registered through the same hooks (see ``mltl.builtins``).

The ``register_*`` hooks are called once, when the registry is first needed. Each receives a
``register`` callable; call it once per thing you provide::

    from mltl import hookimpl

    @hookimpl
    def register_domains(register):
        register("dermoscopy", load_dermoscopy)

Factories are called with the options written in the config as keyword arguments. mltl checks the
option names against the factory's signature (so a typo gets a "did you mean" message naming the key)
and the values against its annotations where they are plain types (``int``, ``float``, ``str``,
``bool``, ``list``). Raise :class:`mltl.UserError` for a bad value; say which option and how to fix it.

The ``mltl_*`` event hooks are called while a chain runs, in every installed plugin, for loggers and
trackers. Reporters chosen in the config receive the same events as methods (see
:mod:`mltl.reporting`). Under ``torchrun`` both are called in the rank-0 process only, once per run.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("mltl")
hookimpl = pluggy.HookimplMarker("mltl")


@hookspec
def register_domains(register):
    """Provide labelled image sources.

    ``register(name, factory)``: ``factory(**options) -> mltl.Domain``. The options are the keys of the
    stage's ``domain`` table other than ``plugin``.
    """


@hookspec
def register_backbones(register):
    """Provide networks.

    ``register(name, factory)``: ``factory(*, in_chans: int, image_size: int, **options) -> mltl.Trunk``,
    a feature extractor with named layer groups (``C1``.., ``F1``..) in input-to-output order. mltl adds
    the classifier head. The options are the keys of the stage's ``backbone`` table other than ``name``.
    """


@hookspec
def register_freeze_policies(register):
    """Provide named freeze policies (besides layer ranges such as ``"C1-C3"``, which the core parses).

    ``register(name, resolve, description)``: ``resolve(network: mltl.Network) -> Iterable[str]`` gives the
    layer-group names to freeze.
    """


@hookspec
def register_reporters(register):
    """Provide reporters: objects told about a run as it happens (see :class:`mltl.reporting.Reporter`).

    ``register(name, factory)``: ``factory(**options) -> reporter``. A run uses the reporters named in
    ``[run] reporters`` (default: all registered ones).
    """


@hookspec
def mltl_stage_started(stage_name: str, stage_dir):
    """A stage begins (before its data is loaded)."""


@hookspec
def mltl_epoch_ended(stage_name: str, variant: str, epoch: int, metrics: dict):
    """One training epoch of one variant of a stage ended; ``metrics`` holds ``loss`` and validation metrics."""


@hookspec
def mltl_stage_finished(result):
    """A stage finished: ``result`` is a :class:`mltl.results.StageResult` (selected model, test split)."""


@hookspec
def mltl_run_finished(results, run_dir):
    """The whole chain finished: ``results`` lists every stage's :class:`mltl.results.StageResult`."""
