"""The run's report (``report.md`` and a self-contained ``report.html``), and ``mltl report RUN_DIR``.

The report is built from what is on disk in the run directory, never from the training process: each
finished stage's ``metrics.json``, ``selection.json`` and ``repeats.json``, and what plugins add through
the ``mltl_report_stage`` and ``mltl_report_run`` hooks (mltl-roc adds its reporters' CIs, case level,
calibration and figures, read from the files they wrote). So :func:`regenerate` (``mltl report``) rebuilds
it for a finished or interrupted run without retraining: it re-creates the stage results from
``metrics.json`` and ``predictions.csv``, replays the reporters' ``stage_finished`` / ``run_finished``
events (which redraw every figure and recompute every derived number from ``predictions.csv``), then
writes both reports.

A report is a list of blocks (:class:`Heading`, :class:`Para`, :class:`Table`, :class:`Figure`),
rendered as markdown by :func:`render_markdown` and as HTML by :func:`render_html`. ``report.html`` needs
nothing else: its figures are embedded as base64 ``data:`` URIs and its style sheet is inline, so it can
be mailed or archived on its own.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

from ..errors import UserError
from ..plugins import get_registry, hooks
from ..running.rundir import Damaged, RunFiles, RunLock, StageFiles, read_stage, write_text_atomic
from .reporting import call, fmt, protocol_line
from .results import StageResult

__all__ = ["write_report", "regenerate", "parse_reporter_options", "RegeneratedReport", "Heading", "Para",
           "Table", "Figure", "StageReport", "render_markdown", "render_html"]


# ------------------------------------------------------------------------------------------ blocks


@attrs.frozen
class Heading:
    """A section heading; ``level`` 1 is the report's title."""

    level: int
    text: str


@attrs.frozen
class Para:
    """A paragraph; backquoted code and ``**bold**`` text are rendered as such in HTML."""

    text: str


@attrs.frozen
class Table:
    """A table of text cells, with an optional caption below it."""

    header: tuple[str, ...] = attrs.field(converter=tuple)
    rows: tuple[tuple[str, ...], ...] = attrs.field(converter=lambda rows: tuple(tuple(r) for r in rows))
    caption: str = ""


@attrs.frozen
class Figure:
    """A PNG file and its caption: linked from ``report.md``, embedded in ``report.html``."""

    path: Path = attrs.field(converter=Path)
    caption: str


Block = Heading | Para | Table | Figure


@attrs.frozen
class StageReport:
    """What a plugin adds to one stage's section of the report (the ``mltl_report_stage`` hook).

    * ``auc_ci95``: ``(low, high)`` of the stage's test macro AUC, shown beside it in the summary table
      and the test-metrics table (the first plugin to give one is shown); ``n_resamples``: the bootstrap
      resamples behind it, named in the table's caption.
    * ``metrics``: ``(name, value)`` rows added to the test-metrics table, after the macro AUC.
    * ``summary``: ``(column, value)`` cells added to the stage's row of the run's summary table (a
      column shows "-" for the stages without a value).
    * ``blocks``: shown after the stage's test metrics, in the order given.
    * ``figures``: :class:`Figure` blocks (and a :class:`Para` where a figure is missing) shown under the
      stage's "Figures" heading, before the stage folder's other PNGs.
    """

    auc_ci95: tuple[float | None, float | None] | None = None
    n_resamples: int | None = None
    metrics: tuple[tuple[str, str], ...] = attrs.field(default=(), converter=tuple)
    summary: tuple[tuple[str, str], ...] = attrs.field(default=(), converter=tuple)
    blocks: tuple[Block, ...] = attrs.field(default=(), converter=tuple)
    figures: tuple[Figure | Para, ...] = attrs.field(default=(), converter=tuple)


def _ci(ci: Any) -> str:
    if not ci or ci[0] is None or ci[1] is None:
        return ""
    return f" ({fmt(ci[0])}-{fmt(ci[1])})"


def _pm(mean: Any, sd: Any) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "n/a"
    return fmt(mean) + (f" ± {fmt(sd)}" if sd is not None and not (isinstance(sd, float) and math.isnan(sd))
                         else "")


def _load(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------------------------ the content


def _per_class_rows(r: StageResult) -> list[tuple[str, ...]]:
    """class | test images | AUC | sensitivity | specificity | PPV, from metrics.json (its one-vs-rest AUCs
    and the confusion matrix of the arg-max prediction)."""
    m = r.metrics
    auc = m.get("auc_per_class") or {}
    cm = m.get("confusion_matrix") or []
    total = sum(sum(row) for row in cm)
    rows = []
    for k, cls in enumerate(r.classes[:len(cm)]):
        tp = cm[k][k]
        fn = sum(cm[k]) - tp
        fp = sum(row[k] for row in cm) - tp
        tn = total - tp - fn - fp
        sens = tp / (tp + fn) if tp + fn else None
        spec = tn / (tn + fp) if tn + fp else None
        ppv = tp / (tp + fp) if tp + fp else None
        rows.append((cls, str(tp + fn), fmt(auc.get(cls)), fmt(sens), fmt(spec), fmt(ppv)))
    return rows


def _repeats_blocks(stage: str, repeats: dict[str, Any]) -> list[Block]:
    from statistics import mean, stdev

    rows = repeats.get("rows") or []
    protocol = repeats.get("protocol", "?")
    blocks: list[Block] = [Heading(3, f"Repeats ({protocol}, {len(rows)} runs)")]
    groups: dict[Any, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row.get("fraction"), []).append(row)

    def finite(values: Sequence[Any]) -> list[float]:
        return [float(v) for v in values if v is not None and math.isfinite(float(v))]

    summary = []
    for fraction in sorted(groups, key=lambda f: (f is None, f or 0.0)):
        members = groups[fraction]
        aucs, accs = finite([m.get("auc_macro") for m in members]), finite([m.get("accuracy") for m in members])
        n_train = finite([m.get("n_train") for m in members])
        summary.append((
            "all" if fraction is None else f"{fraction:g}",
            str(len(members)),
            fmt(mean(n_train), 1) if n_train else "n/a",
            _pm(mean(aucs) if aucs else None, stdev(aucs) if len(aucs) > 1 else None),
            _pm(mean(accs) if accs else None, stdev(accs) if len(accs) > 1 else None),
            ", ".join(fmt(m.get("auc_macro")) for m in members),
        ))
    blocks.append(Table(("training fraction", "runs", "mean training images", "test AUC mean ± SD",
                         "accuracy mean ± SD", "every test AUC"), tuple(summary),
                        "SD: sample standard deviation (n - 1). Each run selects its variant on its own "
                        "validation split and is tested once on its own test split."))
    detail = []
    for row in rows:
        def cell(v: Any) -> str:
            return "-" if v is None else fmt(v)

        detail.append((cell(row.get("fraction")), cell(row.get("fold")), cell(row.get("draw")), cell(row.get("seed")),
                       fmt(row.get("n_train")), fmt(row.get("auc_macro")), fmt(row.get("accuracy"))))
    blocks.append(Table(("fraction", "fold", "draw", "seed", "training images", "test AUC", "accuracy"),
                        tuple(detail), f"Every run, from `{stage}/repeats.json`."))
    return blocks


def _stage_blocks(r: StageResult, parts: Sequence[StageReport]) -> list[Block]:

    m = r.metrics
    d = Path(r.stage_dir)
    repeats = _load(StageFiles(d).repeats_json)
    out: list[Block] = [Heading(2, f"Stage `{r.name}`")]
    if m.get("protocol"):
        p = m["protocol"]
        out.append(Para(f"Protocol: **{p['name']}**: {protocol_line(p)}. The figures and tables below are those "
                        f"of the representative repeat `{p.get('representative')}`; every repeat is in "
                        f"`{r.name}/repeats.json` and `{r.name}/repeats/`."))
    out.append(Para(f"Classes: {', '.join(r.classes)}. {m.get('inherited', '')}. Trainable parameters: "
                    f"{m.get('trainable_parameters', 0):,}; best epoch {m.get('best_epoch')} of "
                    f"{m.get('epochs_run')}; training time {fmt(m.get('train_seconds'), 1)} s."))
    if r.selection:
        sel = r.selection
        rows = []
        for c in sel["candidates"]:
            if "skipped" in c:
                rows.append((f"{c['variant']} (not applicable: {c['skipped'].split(': ')[-1]})", "-", "-", "-", "-"))
                continue
            mark = " **selected**" if c["variant"] == sel["selected"] else ""
            rows.append((f"{c['variant']}{mark}", fmt(c["selection_value"]), fmt(c["val"]["auc_macro"]),
                         fmt(c["val"]["accuracy"]), str(c["best_epoch"])))
        out += [Heading(3, "Selection among variants"),
                Para(f"Selected by {sel.get('rule', 'validation ' + sel['select_by'])} over "
                     f"{', '.join(sel['swept'])}, on the validation split only ({sel.get('ties', '')})."),
                Table(("variant", f"selection value (val {sel['select_by']})", "val AUC", "val accuracy",
                       "best epoch"), tuple(rows))]

    headline = next((p for p in parts if p.auc_ci95 is not None), None)
    metric_rows = [("macro ROC AUC (95% CI)", fmt(m.get("auc_macro")) + _ci(headline and headline.auc_ci95))]
    metric_rows += [row for p in parts for row in p.metrics]
    metric_rows += [
        ("accuracy", fmt(m.get("accuracy"))),
        ("balanced accuracy", fmt(m.get("balanced_accuracy"))),
        ("cross-entropy", fmt(m.get("loss"))),
        ("test images", fmt(m.get("n_test"))),
    ]
    n_res = headline.n_resamples if headline else None
    out += [Heading(3, "Test metrics"),
            Table(("metric", "value"), tuple(metric_rows),
                  "AUC one-vs-rest (binary: of the second class); CI: stratified bootstrap percentile interval"
                  + (f", {n_res} resamples" if n_res else "") + ". Recomputable from `predictions.csv`."),
            Table(("class", "test images", "AUC (one-vs-rest)", "sensitivity", "specificity", "PPV"),
                  tuple(_per_class_rows(r)),
                  "Sensitivity, specificity and PPV of the arg-max prediction for each class against the rest.")]
    cm = m.get("confusion_matrix") or []
    if cm:
        out.append(Table(("true \\ predicted",) + tuple(r.classes),
                         tuple((f"**{cls}**",) + tuple(str(v) for v in row) for cls, row in zip(r.classes, cm)),
                         "Test confusion matrix (rows: true class, columns: predicted class)."))
    out += [b for p in parts for b in p.blocks]
    if repeats:
        out += _repeats_blocks(r.name, repeats)
    figures: list[Block] = [b for p in parts for b in p.figures]
    shown = {Path(b.path).name for b in figures if isinstance(b, Figure)}
    figures += [Figure(p, p.stem) for p in sorted(d.glob("*.png")) if p.name not in shown]
    if figures:
        out.append(Heading(3, "Figures"))
    out += figures
    return out


def build(run_dir: Path, config_raw: dict[str, Any], results: Sequence[StageResult], env: dict[str, Any],
          unfinished: Sequence[str] = ()) -> list[Block]:
    """The report as a list of blocks (headings, paragraphs, tables, figures)."""
    run_dir = Path(run_dir)
    name = (config_raw.get("run") or {}).get("name", run_dir.name)
    blocks: list[Block] = [Heading(1, f"Run report: {name}")]
    torch_version = (env.get("packages") or {}).get("torch", "?")
    blocks.append(Para(f"Device: {env.get('device')}; seed {env.get('seed')}; torch {torch_version}; started "
                       f"{env.get('time_utc')}. Resolved config: `config.toml`; environment: `environment.json`."))
    blocks.append(Para("Models are selected on each stage's validation split; the test split of each stage is used "
                       "once, for the selected model only."))
    if unfinished:
        blocks.append(Para(f"**Unfinished stages** (no `metrics.json`; the run was interrupted or failed): "
                           f"{', '.join(unfinished)}. Continue with `mltl run CONFIG --resume --out {run_dir}`."))
    parts = {r.name: hooks().report_stage(r) for r in results}
    extra_columns = list(dict.fromkeys(column for r in results for p in parts[r.name] for column, _ in p.summary))
    header = ("stage", "domain", "classes", "train / val / test", "start", "frozen", "selected", "val metric",
              "test AUC (95% CI)", "test accuracy") + tuple(extra_columns)
    rows = []
    for r in results:
        m = r.metrics
        ci = next((p.auc_ci95 for p in parts[r.name] if p.auc_ci95 is not None), None)
        n = m.get("n_images") or {}
        proto = m.get("protocol")
        auc = (_pm(proto["auc_macro"]["mean"], proto["auc_macro"]["sd"]) + f" over {proto['auc_macro']['n']}"
               if proto and isinstance(proto.get("auc_macro"), dict) else fmt(m.get("auc_macro")) + _ci(ci))
        cells = {column: value for p in reversed(parts[r.name]) for column, value in p.summary}
        rows.append((r.name, str(m.get("domain")), str(len(r.classes)),
                     f"{n.get('train')} / {n.get('val')} / {n.get('test')}", str(m.get("start")),
                     ", ".join(m.get("frozen") or []) or "none", m.get("selected_variant") or "-",
                     f"{m.get('select_by')} {fmt((m.get('val') or {}).get('selection_value'))}", auc,
                     fmt(m.get("accuracy"))) + tuple(cells.get(c, "-") for c in extra_columns))
    blocks += [Heading(2, "Summary"), Table(header, tuple(rows),
                                            "A repeated stage shows mean ± SD over its repeats.")]
    for r in results:
        blocks += _stage_blocks(r, parts[r.name])
    run_figs: list[Block] = [b for answer in hooks().report_run(list(results), run_dir)
                             for b in answer or ()]
    shown = {Path(b.path).name for b in run_figs if isinstance(b, Figure)}
    run_figs += [Figure(p, p.stem) for p in sorted(run_dir.glob("*.png")) if p.name not in shown]
    if run_figs:
        blocks.append(Heading(2, "Run figures"))
        blocks += run_figs
    return blocks


# -------------------------------------------------------------------------------------- rendering


def render_markdown(blocks: Sequence[Any], run_dir: Path) -> str:
    lines: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            lines += ["#" * b.level + " " + b.text, ""]
        elif isinstance(b, Para):
            lines += [b.text, ""]
        elif isinstance(b, Table):
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in b.header) + " |")
            lines.append("|" + "---|" * len(b.header))
            for row in b.rows:
                lines.append("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |")
            lines.append("")
            if b.caption:
                lines += [b.caption, ""]
        elif isinstance(b, Figure):
            rel = b.path.relative_to(run_dir).as_posix() if b.path.is_relative_to(run_dir) else b.path.as_posix()
            lines += [f"![{b.path.stem}]({rel})", "", f"*{b.caption}*", ""]
    return "\n".join(lines).rstrip("\n") + "\n"


_STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #1d1d1f; line-height: 1.45; }
h1 { border-bottom: 2px solid #333; padding-bottom: .2em; }
h2 { border-bottom: 1px solid #bbb; padding-bottom: .15em; margin-top: 2em; }
h3 { margin-top: 1.4em; }
table { border-collapse: collapse; margin: .6em 0; font-size: 0.92em; }
th, td { border: 1px solid #c8c8c8; padding: .28em .6em; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
tr:nth-child(even) td { background: #fafafa; }
caption { caption-side: bottom; text-align: left; font-size: 0.88em; color: #555; padding-top: .3em; }
figure { margin: 1em 0 1.6em 0; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.9em; color: #444; }
code { background: #f3f3f3; padding: 0 .25em; border-radius: 3px; }
"""


def _inline(text: str) -> str:
    out = html.escape(text, quote=False)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)


def render_html(blocks: Sequence[Any], title: str) -> str:
    parts = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>{html.escape(title)}</title>", f"<style>{_STYLE}</style>", "</head>", "<body>"]
    for b in blocks:
        if isinstance(b, Heading):
            parts.append(f"<h{b.level}>{_inline(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            parts.append(f"<p>{_inline(b.text)}</p>")
        elif isinstance(b, Table):
            parts.append("<table>")
            if b.caption:
                parts.append(f"<caption>{_inline(b.caption)}</caption>")
            parts.append("<thead><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in b.header) + "</tr></thead>")
            parts.append("<tbody>")
            for row in b.rows:
                parts.append("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>")
            parts.append("</tbody></table>")
        elif isinstance(b, Figure):
            data = base64.b64encode(b.path.read_bytes()).decode("ascii")
            parts.append(f'<figure><img alt="{html.escape(b.path.stem)}" src="data:image/png;base64,{data}">'
                         f"<figcaption>{_inline(b.caption)}</figcaption></figure>")
    parts += ["</body>", "</html>"]
    return "\n".join(parts) + "\n"


def write_report(run_dir: Path, config_raw: dict[str, Any], results: Sequence[StageResult], env: dict[str, Any],
                 unfinished: Sequence[str] = ()) -> None:
    """Write ``report.md`` (figures linked) and ``report.html`` (figures embedded) into ``run_dir``."""
    run_dir = Path(run_dir)
    blocks = build(run_dir, config_raw, results, env, unfinished)
    write_text_atomic(RunFiles(run_dir).report_md, render_markdown(blocks, run_dir))
    title = f"mltl run report: {(config_raw.get('run') or {}).get('name', run_dir.name)}"
    write_text_atomic(RunFiles(run_dir).report_html, render_html(blocks, title))


# ------------------------------------------------------------------------------------ mltl report


@attrs.frozen
class RegeneratedReport:
    run_dir: Path
    finished: tuple[str, ...]
    unfinished: tuple[str, ...]
    reporters: tuple[str, ...]


def _stage_result(files: StageFiles) -> StageResult:
    try:
        return read_stage(files, files.root.name, network=False)[0]
    except Damaged as exc:
        raise UserError(f"{files.root}: the finished stage's files are damaged ({exc}); "
                        f"re-run the stage (delete {files.metrics} and resume the run)") from None


def parse_reporter_options(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``["evaluation.case_aggregate=max", "roc.n_resamples=2000"]`` -> ``{"evaluation": {...}, "roc": {...}}``.
    Values are read as TOML (numbers, booleans, quoted strings, lists); anything else is a plain string."""

    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        reporter, dot, option = key.strip().partition(".")
        if not sep or not dot or not reporter or not option or "." in option:
            raise UserError(f"--set {item!r}: write REPORTER.OPTION=VALUE, e.g. evaluation.case_aggregate=max")
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()
        out.setdefault(reporter, {})[option] = value
    return out


def regenerate(run_dir: str | Path, *, reporter_options: dict[str, dict[str, Any]] | None = None,
               reporters: Sequence[str] | None = None) -> RegeneratedReport:
    """Rebuild every report of a finished or interrupted run directory without retraining.

    Stages with a ``metrics.json`` are re-reported; the others (interrupted) are listed as unfinished.
    ``reporters``: names to replay (default: the run's ``[run] reporters``, else every installed one);
    ``reporter_options``: per reporter name, the options to create it with (e.g.
    ``{"evaluation": {"case_aggregate": "max"}}``).
    """
    run_dir = Path(run_dir)
    files = RunFiles(run_dir)
    config_path = files.config
    if not config_path.is_file():
        raise UserError(f"{run_dir}: not an mltl run directory (no config.toml); give the folder `mltl run` made")
    try:
        config_raw = tomllib.loads(config_path.read_text())
        names = [s["name"] for s in config_raw["stages"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{config_path}: damaged ({exc}); the report cannot name the run's stages") from None
    env = _load(files.environment) or {}
    registry = get_registry()
    options = dict(reporter_options or {})
    wanted = list(reporters) if reporters is not None else (
        list((config_raw.get("run") or {}).get("reporters") or []) or registry.names("reporter"))
    if (config_raw.get("run") or {}).get("reporters") == [] and reporters is None:
        wanted = []
    unknown = sorted(set(options) - set(wanted))
    if unknown:
        raise UserError(f'--set {unknown[0]}.*: reporter "{unknown[0]}" is not among the reporters replayed '
                        f"({', '.join(wanted) or 'none'})")
    # the run's own [run] reporter_options, then --set on top, option by option
    saved = (config_raw.get("run") or {}).get("reporter_options") or {}
    options = {n: {**(saved.get(n) if isinstance(saved.get(n), dict) else {}), **options.get(n, {})}
               for n in wanted if n in saved or n in options}
    created = [registry.create("reporter", n, options.get(n, {}), key=f"report --set {n}", source=str(run_dir))
               for n in wanted]
    with RunLock(run_dir):
        results = [_stage_result(files.stage(n)) for n in names if files.stage(n).metrics.is_file()]
        unfinished = tuple(n for n in names if not files.stage(n).metrics.is_file())
        for result in results:
            call(created, "stage_finished", result=result)
        if results:
            call(created, "run_finished", results=results, run_dir=run_dir)
        write_report(run_dir, config_raw, results, env, unfinished)
    return RegeneratedReport(run_dir=run_dir, finished=tuple(r.name for r in results), unfinished=unfinished,
                             reporters=tuple(wanted))
