"""The run's events, its reporters, and the console progress display.

A run announces its progress through one object, :class:`Events`, whose methods are the run-event hooks of
:mod:`mltl.hookspecs` (``mltl_run_started``, ``mltl_stage_started``, ``mltl_epoch_ended``,
``mltl_stage_finished``, ``mltl_run_finished``). Every plugin implementing them hears them; the run's
reporters are plugins of the same hooks, registered for the run's duration and called first. A reporter is
any object with some of these methods (all optional), called in this order::

    run_started(config: Config, run_dir: Path)
    stage_started(stage_name: str, stage_dir: Path)
    epoch_ended(stage_name: str, variant: str, epoch: int, metrics: dict)
    stage_finished(result: StageResult)
    run_finished(results: list[StageResult], run_dir: Path)

Plugins register reporter factories with the ``register_reporters`` hook; ``[run] reporters`` picks
which run (default: all but opt-in ones). The console display below is a built-in reporter like any other.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any, Protocol

from ..errors import ConfigError
from ..hookspecs import hookimpl
from ..plugins import Hooks, Registry, hooks
from ..running.rundir import RunFiles
from .results import StageResult

EVENTS = ("run_started", "stage_started", "epoch_ended", "stage_finished", "run_finished")


class Reporter(Protocol):  # documentation of the duck type; reporters need not inherit from it
    def run_started(self, config: Any, run_dir: Path) -> None: ...
    def stage_started(self, stage_name: str, stage_dir: Path) -> None: ...
    def epoch_ended(self, stage_name: str, variant: str, epoch: int, metrics: dict[str, Any]) -> None: ...
    def stage_finished(self, result: StageResult) -> None: ...
    def run_finished(self, results: list[StageResult], run_dir: Path) -> None: ...


def call(reporters: list[Any], event: str, **kwargs: Any) -> None:
    for reporter in reporters:
        method = getattr(reporter, event, None)
        if method is not None:
            method(**kwargs)


def fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


class ConsoleReporter:
    """Progress on stderr: rich progress bars on a terminal, a plain line every few epochs otherwise.

    Quiet when ``MLTL_QUIET`` is set (the CLI's ``-q``); with ``NO_COLOR`` set, plain lines as into a pipe.
    """

    def __init__(self, summary: Any = None) -> None:
        # summary(run_dir, config_raw, results) -> (lines, blocks): the report's first screen
        # (mltl.evaluation.report.headline, passed in by the runner), printed at the end of the run
        self.summary = summary
        self.config_raw: dict[str, Any] = {}
        self.quiet = bool(os.environ.get("MLTL_QUIET"))
        # live bars need cursor-control escape codes: not under NO_COLOR, nor into a pipe or file
        self.live = sys.stderr.isatty() and not self.quiet and not os.environ.get("NO_COLOR")
        self._progress = None
        self._tasks: dict[str, Any] = {}

    def _print(self, text: str) -> None:
        if not self.quiet:
            print(text, file=sys.stderr, flush=True)

    def run_started(self, config: Any, run_dir: Path) -> None:
        self.config_raw = dict(getattr(config, "raw", None) or {})

    def stage_started(self, stage_name: str, stage_dir: Path) -> None:
        self._print(f"[{stage_name}] started -> {stage_dir}")
        if self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            from ..cli.console import make_console

            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("{task.fields[status]}"), TimeRemainingColumn(),
                                      transient=False, console=make_console(stderr=True))  # stderr, like the lines
            self._progress.start()
            self._tasks = {}

    def epoch_ended(self, stage_name: str, variant: str, epoch: int, metrics: dict[str, Any]) -> None:
        total = metrics.get("epochs", epoch)
        status = f"loss {fmt(metrics['loss'])} val AUC {fmt(metrics['val_auc'])}"
        label = f"{stage_name}" + (f" [{variant}]" if variant else "")
        if self._progress is not None:
            if variant not in self._tasks:
                self._tasks[variant] = self._progress.add_task(label, total=total, status="")
            self._progress.update(self._tasks[variant], completed=epoch, status=status)
            return
        every = max(1, total // 5)
        if epoch == 1 or epoch % every == 0 or epoch == total:
            self._print(f"  {label} epoch {epoch}/{total}: {status}")

    def stage_finished(self, result: StageResult) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        m = result.metrics
        chosen = f" (selected {m['selected_variant']})" if m.get("selected_variant") else ""
        proto = m.get("protocol")
        if proto:
            self._print(f"[{result.name}] {protocol_line(proto)}")
        else:
            self._print(f"[{result.name}] test split ({m['n_test']} images): AUC {fmt(m['auc_macro'])}, "
                        f"accuracy {fmt(m['accuracy'])}{chosen}")

    def run_finished(self, results: list[StageResult], run_dir: Path) -> None:
        """The run's result in three plain lines (those at the top of the report): the result with its CI, what
        a reader may conclude, where the report is."""
        if self.quiet or self.summary is None:
            return
        try:
            lines, _ = self.summary(run_dir, self.config_raw, results)
        except Exception as exc:  # noqa: BLE001 -- the summary must not fail a finished run; the report says more
            lines = [f"run finished (no summary: {type(exc).__name__}: {exc})", f"Report: {RunFiles(run_dir).report_md}"]
        self._print("\n".join(["", "run finished.", *lines]))


def protocol_line(proto: dict[str, Any]) -> str:
    """One line for a repeated stage, each number with its level: mean +/- SD of the test AUC and accuracy over
    its repeats (each on its own test split), and for k-fold the pooled out-of-fold AUC and accuracy."""
    def ms(d: dict[str, Any]) -> str:
        return f"{fmt(d['mean'])} +/- {fmt(d['sd'])}" if d.get("sd") is not None else fmt(d.get("mean"))

    what = {"kfold": "folds", "fractions": "draws", "holdout": "seeds"}[proto["name"]]
    at = f" at {proto['headline']}" if proto.get("headline") else ""
    text = (f"mean +/- SD over {proto['auc_macro']['n']} {what}{at}: test AUC {ms(proto['auc_macro'])}, "
            f"accuracy {ms(proto['accuracy'])}")
    if proto.get("pooled"):
        pooled = proto["pooled"]
        text += (f"; pooled out-of-fold ({pooled['n']} images, each tested once): AUC {fmt(pooled['auc_macro'])}, "
                 f"accuracy {fmt(pooled.get('accuracy'))}")
    return text


class _ReporterHooks:
    """The run's reporters as one plugin of the run-event hooks (called before other plugins, in order)."""

    def __init__(self, reporters: list[Any]) -> None:
        self.reporters = reporters

    @hookimpl(tryfirst=True)
    def mltl_run_started(self, config: Any, run_dir: Path) -> None:
        call(self.reporters, "run_started", config=config, run_dir=run_dir)

    @hookimpl(tryfirst=True)
    def mltl_stage_started(self, stage_name: str, stage_dir: Path) -> None:
        call(self.reporters, "stage_started", stage_name=stage_name, stage_dir=stage_dir)

    @hookimpl(tryfirst=True)
    def mltl_epoch_ended(self, stage_name: str, variant: str, epoch: int, metrics: dict[str, Any]) -> None:
        call(self.reporters, "epoch_ended", stage_name=stage_name, variant=variant, epoch=epoch, metrics=metrics)

    @hookimpl(tryfirst=True)
    def mltl_stage_finished(self, result: StageResult) -> None:
        call(self.reporters, "stage_finished", result=result)

    @hookimpl(tryfirst=True)
    def mltl_run_finished(self, results: list[StageResult], run_dir: Path) -> None:
        call(self.reporters, "run_finished", results=results, run_dir=run_dir)


class Events:
    """The one path of a run's events: each method calls its ``mltl_*`` hook in every plugin
    (:class:`mltl.plugins.Hooks`), the run's reporters first. Use as a context manager: the reporters are
    plugins for its duration."""

    def __init__(self, reporters: list[Any]) -> None:
        self.reporters = reporters
        self._plugin = _ReporterHooks(reporters)
        self._hooks = hooks()

    def __enter__(self) -> Hooks:
        self._hooks.register(self._plugin, name=f"mltl-run-reporters-{id(self)}")
        return self._hooks

    def __exit__(self, *exc: Any) -> None:
        self._hooks.unregister(self._plugin)


def make_reporters(config: Any, registry: Registry) -> list[Any]:
    """The run's reporters, created with ``[run] reporter_options``: by default every installed reporter
    except opt-in ones (registered with ``opt_in=True``, used only when named in ``[run] reporters``)."""
    names = config.run.reporters if config.run.reporters is not None else [
        n for n in registry.names("reporter") if not _opt_in(registry.get("reporter", n))]
    for name in config.run.reporter_options:
        registry.get("reporter", name, key=f"run.reporter_options.{name}", source=config.source)
    options = check_reporter_options(config.run.reporter_options, names, "run.reporter_options", config.source)
    reporters = []
    for n in names:
        try:
            reporters.append(registry.create("reporter", n, options.get(n, {}), key=f"run.reporter_options.{n}",
                                             source=config.source))
        except (ValueError, TypeError) as exc:  # a reporter's own check of an option's value
            raise ConfigError(str(exc), key=f"run.reporter_options.{n}", source=config.source) from None
    return reporters


def _opt_in(item: Any) -> bool:
    return bool(getattr(item, "opt_in", False) or getattr(item.factory, "opt_in", False))


def check_reporter_options(options: dict[str, Any], names: list[str] | tuple[str, ...], key: str,
                           source: str) -> dict[str, dict[str, Any]]:
    """Check ``{reporter: {option: value}}`` names only reporters of ``names`` and holds tables."""
    for name, value in options.items():
        if name not in names:
            raise ConfigError(f'options for reporter "{name}", which this run does not use (it uses: '
                              f'{", ".join(names) or "none"}); add it to run.reporters, or remove its options',
                              key=f"{key}.{name}", source=source)
        if not isinstance(value, dict):
            raise ConfigError(f"expected a table of options, e.g. {{ n_resamples = 2000 }}, got {value!r}",
                              key=f"{key}.{name}", source=source)
    return options
