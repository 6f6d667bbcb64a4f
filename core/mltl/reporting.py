"""Reporters, the console progress display, and the run's ``report.md``.

A reporter is any object with some of these methods (all optional); the chain runner calls them in
this order::

    stage_started(stage_name: str, stage_dir: Path)
    epoch_ended(stage_name: str, variant: str, epoch: int, metrics: dict)
    stage_finished(result: StageResult)
    run_finished(results: list[StageResult], run_dir: Path)

Plugins register reporter factories with the ``register_reporters`` hook; ``[run] reporters`` picks
which run (default: all). The console display below is a built-in reporter like any other.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any, Protocol

from .results import StageResult

EVENTS = ("stage_started", "epoch_ended", "stage_finished", "run_finished")


class Reporter(Protocol):  # documentation of the duck type; reporters need not inherit from it
    def stage_started(self, stage_name: str, stage_dir: Path) -> None: ...
    def epoch_ended(self, stage_name: str, variant: str, epoch: int, metrics: dict[str, Any]) -> None: ...
    def stage_finished(self, result: StageResult) -> None: ...
    def run_finished(self, results: list[StageResult], run_dir: Path) -> None: ...


def call(reporters: list[Any], event: str, **kwargs: Any) -> None:
    for reporter in reporters:
        method = getattr(reporter, event, None)
        if method is not None:
            method(**kwargs)


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


class ConsoleReporter:
    """Progress on stderr: rich progress bars on a terminal, a plain line every few epochs otherwise.

    Quiet when ``MLTL_QUIET`` is set (the CLI's ``-q``); with ``NO_COLOR`` set, plain lines as into a pipe.
    """

    def __init__(self) -> None:
        self.quiet = bool(os.environ.get("MLTL_QUIET"))
        # live bars need cursor-control escape codes: not under NO_COLOR, nor into a pipe or file
        self.live = sys.stderr.isatty() and not self.quiet and not os.environ.get("NO_COLOR")
        self._progress = None
        self._tasks: dict[str, Any] = {}

    def _print(self, text: str) -> None:
        if not self.quiet:
            print(text, file=sys.stderr, flush=True)

    def stage_started(self, stage_name: str, stage_dir: Path) -> None:
        self._print(f"[{stage_name}] started -> {stage_dir}")
        if self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            from .console import make_console

            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("{task.fields[status]}"), TimeRemainingColumn(),
                                      transient=False, console=make_console(stderr=True))  # stderr, like the lines
            self._progress.start()
            self._tasks = {}

    def epoch_ended(self, stage_name: str, variant: str, epoch: int, metrics: dict[str, Any]) -> None:
        total = metrics.get("epochs", epoch)
        status = f"loss {_fmt(metrics['loss'])} val AUC {_fmt(metrics['val_auc'])}"
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
            self._print(f"[{result.name}] test AUC {_fmt(m['auc_macro'])}, accuracy {_fmt(m['accuracy'])}, "
                        f"n={m['n_test']}{chosen}")

    def run_finished(self, results: list[StageResult], run_dir: Path) -> None:
        self._print(f"run finished: {run_dir}/report.md")


def protocol_line(proto: dict[str, Any]) -> str:
    """One line for a repeated stage: test AUC and accuracy as mean +/- SD over its repeats."""
    def ms(d: dict[str, Any]) -> str:
        return f"{_fmt(d['mean'])} +/- {_fmt(d['sd'])}" if d.get("sd") is not None else _fmt(d.get("mean"))

    what = {"kfold": "folds", "fractions": "draws", "holdout": "seeds"}[proto["name"]]
    at = f" at {proto['headline']}" if proto.get("headline") else ""
    text = (f"test AUC {ms(proto['auc_macro'])}, accuracy {ms(proto['accuracy'])} over "
            f"{proto['auc_macro']['n']} {what}{at}")
    if proto.get("pooled"):
        text += f"; pooled out-of-fold AUC {_fmt(proto['pooled']['auc_macro'])} (n={proto['pooled']['n']})"
    return text


def write_report(run_dir: Path, config_raw: dict[str, Any], results: list[StageResult], env: dict[str, Any],
                 unfinished: tuple[str, ...] = ()) -> None:
    """``report.md`` and a self-contained ``report.html``: every stage's data, model, selection, test metrics
    (with what the reporters wrote: CIs, case level, calibration, repeats) and figures. See :mod:`mltl.report`."""
    from .report import write_report as _write

    _write(run_dir, config_raw, results, env, unfinished)
