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

import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Protocol

from .results import StageResult
from .rundir import write_text_atomic

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

    Quiet when ``MLTL_QUIET`` is set (the CLI's ``-q``); ``NO_COLOR`` is honoured by rich.
    """

    def __init__(self) -> None:
        self.quiet = bool(os.environ.get("MLTL_QUIET"))
        self.live = sys.stderr.isatty() and not self.quiet
        self._progress = None
        self._tasks: dict[str, Any] = {}

    def _print(self, text: str) -> None:
        if not self.quiet:
            print(text, file=sys.stderr, flush=True)

    def stage_started(self, stage_name: str, stage_dir: Path) -> None:
        self._print(f"[{stage_name}] started -> {stage_dir}")
        if self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("{task.fields[status]}"), TimeRemainingColumn(),
                                      transient=False)
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
        self._print(f"[{result.name}] test AUC {_fmt(m['auc_macro'])}, accuracy {_fmt(m['accuracy'])}, "
                    f"n={m['n_test']}{chosen}")

    def run_finished(self, results: list[StageResult], run_dir: Path) -> None:
        self._print(f"run finished: {run_dir}/report.md")


def write_report(run_dir: Path, config_raw: dict[str, Any], results: list[StageResult], env: dict[str, Any]) -> None:
    """``report.md``: every stage's data, model, selection and test metrics, with links to figures."""
    lines = [f"# Run report: {config_raw['run']['name']}", ""]
    lines.append(f"Device: {env.get('device')}; seed {env.get('seed')}; torch {env['packages'].get('torch', '?')}; "
                 f"started {env.get('time_utc')}. Resolved config: `config.toml`; environment: `environment.json`.")
    lines.append("")
    lines.append("Models are selected on each stage's validation split; the test split of each stage is used "
                 "once, for the selected model only.")
    lines += ["", "## Summary", "",
              "| stage | domain | classes | train / val / test | start | frozen | selected | val " 
              "metric | test AUC (95% CI) | test accuracy |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        m = r.metrics
        ci = _roc_ci(r.stage_dir)
        auc = _fmt(m["auc_macro"]) + (f" ({_fmt(ci[0])}-{_fmt(ci[1])})" if ci else "")
        n = m["n_images"]
        sel = m.get("selected_variant") or "-"
        lines.append(
            f"| {r.name} | {m['domain']} | {len(r.classes)} | {n['train']} / {n['val']} / {n['test']} | "
            f"{m['start']} | {', '.join(m['frozen']) or 'none'} | {sel} | {m['select_by']} "
            f"{_fmt(m['val']['selection_value'])} | {auc} | {_fmt(m['accuracy'])} |"
        )
    for r in results:
        m = r.metrics
        lines += ["", f"## Stage `{r.name}`", ""]
        lines.append(f"Classes: {', '.join(r.classes)}. {m['inherited']}. Trainable parameters: "
                     f"{m['trainable_parameters']:,}; best epoch {m['best_epoch']} of {m['epochs_run']}; "
                     f"training time {m['train_seconds']:.1f} s.")
        if r.selection:
            lines += ["", f"Selection by validation {r.selection['select_by']} over "
                          f"{', '.join(r.selection['swept'])}:", "",
                      "| variant | val " + r.selection["select_by"] + " | val AUC | val accuracy | best epoch |",
                      "|---|---|---|---|---|"]
            for c in r.selection["candidates"]:
                if "skipped" in c:
                    lines.append(f"| {c['variant']} (not applicable: {c['skipped'].split(': ')[-1]}) | - | - | - | - |")
                    continue
                mark = " **selected**" if c["variant"] == r.selection["selected"] else ""
                lines.append(f"| {c['variant']}{mark} | {_fmt(c['selection_value'])} | {_fmt(c['val']['auc_macro'])} | "
                             f"{_fmt(c['val']['accuracy'])} | {c['best_epoch']} |")
        per = m.get("auc_per_class") or {}
        if per:
            lines += ["", "Test AUC per class (one-vs-rest): " +
                      ", ".join(f"{k} {_fmt(v)}" for k, v in per.items()) + "."]
        cm = m["confusion_matrix"]
        lines += ["", "Test confusion matrix (rows: true, columns: predicted):", "",
                  "| | " + " | ".join(r.classes) + " |", "|---" * (len(r.classes) + 1) + "|"]
        for cls, row in zip(r.classes, cm):
            lines.append(f"| **{cls}** | " + " | ".join(str(v) for v in row) + " |")
        for png in sorted(r.stage_dir.glob("*.png")):
            lines += ["", f"![{png.stem}]({png.relative_to(run_dir).as_posix()})"]
    for png in sorted(run_dir.glob("*.png")):
        lines += ["", f"![{png.stem}]({png.name})"]
    write_text_atomic(run_dir / "report.md", "\n".join(lines) + "\n")


def _roc_ci(stage_dir: Path) -> tuple[float, float] | None:
    path = stage_dir / "roc.json"
    if not path.exists():
        return None
    try:
        lo, hi = json.loads(path.read_text())["auc_macro_ci95"]
        return float(lo), float(hi)
    except (ValueError, KeyError, TypeError):
        return None
