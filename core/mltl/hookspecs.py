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
:mod:`mltl.evaluation.reporting`). Under ``torchrun`` both are called in the rank-0 process only, once per run.

The ``mltl_report_*`` and ``mltl_comparison_*`` hooks are asked, in every plugin, what to add to the run
report and to ``mltl compare``'s comparison; they answer with blocks (:class:`mltl.Heading`,
:class:`mltl.Para`, :class:`mltl.Table`, :class:`mltl.Figure`) that mltl renders as markdown and HTML.
A plugin shows what its reporters wrote without the core knowing their files.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("mltl")
hookimpl = pluggy.HookimplMarker("mltl")


@hookspec
def register_domains(register):
    """Provide labelled image sources.

    ``register(name, factory, description="", *, read_file=None, suffixes=None)``:
    ``factory(**options) -> mltl.Domain``. The options are the keys of the stage's ``domain`` table other
    than ``plugin``. ``read_file(path, **options) -> uint8 (H, W) or (C, H, W)`` (optional) is how
    ``mltl predict`` reads one new file, called with the options the stage was trained with (and
    ``image_size`` when it takes it); ``suffixes`` (optional, with ``read_file``) are the file endings
    it searches a folder for, ``""`` for files without one (default: the image-folder domain's).
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
    """Provide reporters: objects told about a run as it happens (see :class:`mltl.evaluation.reporting.Reporter`).

    ``register(name, factory, description="", *, opt_in=False)``: ``factory(**options) -> reporter``. A
    run uses the reporters named in ``[run] reporters``; by default, every registered one not marked
    ``opt_in=True``.
    """


@hookspec
def mltl_run_started(config, run_dir):
    """A run begins: ``config`` is the resolved :class:`mltl.Config` (``config.raw`` is the TOML as run, for a
    tracker to log), ``run_dir`` the run directory (``config.toml`` and ``environment.json`` are written)."""


@hookspec
def mltl_stage_started(stage_name: str, stage_dir):
    """A stage begins (before its data is loaded)."""


@hookspec
def mltl_epoch_ended(stage_name: str, variant: str, epoch: int, metrics: dict):
    """One training epoch of one variant of a stage ended; ``metrics`` holds ``loss`` and validation metrics."""


@hookspec
def mltl_stage_finished(result):
    """A stage finished: ``result`` is a :class:`mltl.evaluation.results.StageResult` (selected model, test split)."""


@hookspec
def mltl_run_finished(results, run_dir):
    """The whole chain finished: ``results`` lists every stage's :class:`mltl.evaluation.results.StageResult`."""


@hookspec
def mltl_report_stage(result):
    """Add to a finished stage's section of the run report (``report.md``, ``report.html``).

    ``result``: the stage's :class:`mltl.StageResult` (``mltl report`` rebuilds it from the run
    directory, after replaying the reporters). Return a :class:`mltl.StageReport` (the CI shown beside
    the test macro AUC, extra test-metric rows and summary columns, blocks, figures) or None. Called in
    every plugin; the first CI given is shown, everything else is shown from every plugin.
    """


@hookspec
def mltl_report_run(results, run_dir):
    """Add to the run report's closing section, "Run figures".

    Return a list of blocks (:class:`mltl.Figure`, :class:`mltl.Table`, :class:`mltl.Para`) or None;
    they are shown in the order given, before any other PNG in ``run_dir``.
    """


@hookspec
def mltl_comparison_figures(chains, out_dir):
    """Draw figures for ``mltl compare`` into ``out_dir``; return them as :class:`mltl.Figure` blocks.

    ``chains``: one :class:`mltl.evaluation.difference.ChainScores` per compared chain, in table order: its name, the
    target predictions it is judged on (the same images for every chain) and the 95% CI of their macro
    AUC printed in ``comparison.md``; for a target repeated over training fractions, also ``fractions``:
    one :class:`mltl.evaluation.difference.FractionScores` per fraction (ascending: the fraction, the mean number of
    training images, every draw's test macro AUC in draw order; draw k trained on the same images in every
    chain), empty otherwise. The figures follow the tables in ``comparison.md`` and ``comparison.html``.
    """
