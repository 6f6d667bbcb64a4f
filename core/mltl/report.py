"""The run's report (``report.md`` and a self-contained ``report.html``), and ``mltl report RUN_DIR``.

The report is built from what is on disk in the run directory, never from the training process: each
finished stage's ``metrics.json`` and ``selection.json``, and where reporters wrote them ``evaluation.json``,
``calibration.json``, ``roc.json``, ``gradcam.json``, ``repeats.json`` and the PNG figures. So
:func:`regenerate` (``mltl report``) rebuilds it for a finished or interrupted run without retraining:
it re-creates the stage results from ``metrics.json`` and ``predictions.csv``, replays the reporters'
``stage_finished`` / ``run_finished`` events (which redraw every figure and recompute every derived
number from ``predictions.csv``), then writes both reports.

``report.html`` needs nothing else: its figures are embedded as base64 ``data:`` URIs and its style sheet is
inline, so it can be mailed or archived on its own.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

from .errors import UserError
from .reporting import _fmt
from .results import StageResult
from .rundir import RunLock, write_text_atomic

__all__ = ["write_report", "regenerate", "parse_reporter_options", "RegeneratedReport"]

# the order figures appear in a stage's section; any other PNG follows, alphabetically
FIGURES = {
    "roc.png": "ROC curves per class (one-vs-rest) and their macro average, on the test split.",
    "training.png": "Training curves: training and validation loss, validation AUC per epoch; every sweep "
                    "variant faint, the selected one bold.",
    "calibration.png": "Reliability diagram (calibration) of the test predictions.",
    "learning_curve.png": "Learning curve: mean test AUC +/- 1 SD over the draws at each training fraction, "
                          "every draw as a point.",
    "gradcam.png": "Grad-CAM overlays: where the network looked for the class it predicted, for the most "
                   "confident correct and wrong test images of each class.",
}
RUN_FIGURES = {"roc_stages.png": "Macro ROC curve of every stage, each on its own test split (the stages' "
                                 "test sets differ, so the curves are not a paired comparison)."}


# ------------------------------------------------------------------------------------------ blocks


@attrs.frozen
class Heading:
    level: int
    text: str


@attrs.frozen
class Para:
    text: str  # inline `code` and **bold** are rendered in HTML


@attrs.frozen
class Table:
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    caption: str = ""


@attrs.frozen
class Figure:
    path: Path
    caption: str


def _ci(ci: Any) -> str:
    if not ci or ci[0] is None or ci[1] is None:
        return ""
    return f" ({_fmt(ci[0])}-{_fmt(ci[1])})"


def _pm(mean: Any, sd: Any) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "n/a"
    return _fmt(mean) + (f" ± {_fmt(sd)}" if sd is not None and not (isinstance(sd, float) and math.isnan(sd))
                         else "")


def _load(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------------------------ the content


def _per_class_rows(r: StageResult, evaluation: dict[str, Any] | None) -> list[tuple[str, ...]]:
    """class | test images | AUC | sensitivity | specificity | PPV; from evaluation.json (scikit-learn),
    else from metrics.json's confusion matrix."""
    m = r.metrics
    auc = (evaluation or {}).get("image", {}).get("auc_per_class") or m.get("auc_per_class") or {}
    per = (evaluation or {}).get("image", {}).get("per_class")
    rows = []
    cm = m.get("confusion_matrix") or []
    total = sum(sum(row) for row in cm)
    for k, cls in enumerate(r.classes):
        if per and cls in per:
            p = per[cls]
            sens, spec, ppv, support = p["sensitivity"], p["specificity"], p["ppv"], p["support"]
        elif cm:
            tp = cm[k][k]
            fn = sum(cm[k]) - tp
            fp = sum(row[k] for row in cm) - tp
            tn = total - tp - fn - fp
            sens = tp / (tp + fn) if tp + fn else None
            spec = tn / (tn + fp) if tn + fp else None
            ppv = tp / (tp + fp) if tp + fp else None
            support = tp + fn
        else:
            continue
        rows.append((cls, str(support), _fmt(auc.get(cls)), _fmt(sens), _fmt(spec), _fmt(ppv)))
    return rows


def _repeats_blocks(stage: str, repeats: dict[str, Any]) -> list[Any]:
    from statistics import mean, stdev

    rows = repeats.get("rows") or []
    protocol = repeats.get("protocol", "?")
    blocks: list[Any] = [Heading(3, f"Repeats ({protocol}, {len(rows)} runs)")]
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
            _fmt(mean(n_train), 1) if n_train else "n/a",
            _pm(mean(aucs) if aucs else None, stdev(aucs) if len(aucs) > 1 else None),
            _pm(mean(accs) if accs else None, stdev(accs) if len(accs) > 1 else None),
            ", ".join(_fmt(m.get("auc_macro")) for m in members),
        ))
    blocks.append(Table(("training fraction", "runs", "mean training images", "test AUC mean ± SD",
                         "accuracy mean ± SD", "every test AUC"), tuple(summary),
                        "SD: sample standard deviation (n - 1). Each run selects its variant on its own "
                        "validation split and is tested once on its own test split."))
    detail = []
    for row in rows:
        def cell(v: Any) -> str:
            return "-" if v is None else _fmt(v)

        detail.append((cell(row.get("fraction")), cell(row.get("fold")), cell(row.get("draw")), cell(row.get("seed")),
                       _fmt(row.get("n_train")), _fmt(row.get("auc_macro")), _fmt(row.get("accuracy"))))
    blocks.append(Table(("fraction", "fold", "draw", "seed", "training images", "test AUC", "accuracy"),
                        tuple(detail), f"Every run, from `{stage}/repeats.json`."))
    return blocks


def _stage_blocks(run_dir: Path, r: StageResult) -> list[Any]:
    from .reporting import protocol_line

    m = r.metrics
    d = Path(r.stage_dir)
    evaluation = _load(d / "evaluation.json")
    cal = _load(d / "calibration.json")
    roc = _load(d / "roc.json")
    repeats = _load(d / "repeats.json")
    gradcam = _load(d / "gradcam.json")
    out: list[Any] = [Heading(2, f"Stage `{r.name}`")]
    if m.get("protocol"):
        p = m["protocol"]
        out.append(Para(f"Protocol: **{p['name']}**: {protocol_line(p)}. The figures and tables below are those "
                        f"of the representative repeat `{p.get('representative')}`; every repeat is in "
                        f"`{r.name}/repeats.json` and `{r.name}/repeats/`."))
    out.append(Para(f"Classes: {', '.join(r.classes)}. {m.get('inherited', '')}. Trainable parameters: "
                    f"{m.get('trainable_parameters', 0):,}; best epoch {m.get('best_epoch')} of "
                    f"{m.get('epochs_run')}; training time {_fmt(m.get('train_seconds'), 1)} s."))
    if r.selection:
        sel = r.selection
        rows = []
        for c in sel["candidates"]:
            if "skipped" in c:
                rows.append((f"{c['variant']} (not applicable: {c['skipped'].split(': ')[-1]})", "-", "-", "-", "-"))
                continue
            mark = " **selected**" if c["variant"] == sel["selected"] else ""
            rows.append((f"{c['variant']}{mark}", _fmt(c["selection_value"]), _fmt(c["val"]["auc_macro"]),
                         _fmt(c["val"]["accuracy"]), str(c["best_epoch"])))
        out += [Heading(3, "Selection among variants"),
                Para(f"Selected by {sel.get('rule', 'validation ' + sel['select_by'])} over "
                     f"{', '.join(sel['swept'])}, on the validation split only ({sel.get('ties', '')})."),
                Table(("variant", f"selection value (val {sel['select_by']})", "val AUC", "val accuracy",
                       "best epoch"), tuple(rows))]

    image = (evaluation or {}).get("image") or {}
    ci = image.get("auc_macro_ci95") or (roc or {}).get("auc_macro_ci95")
    n_res = (evaluation or roc or {}).get("n_resamples")
    metric_rows = [
        ("macro ROC AUC (95% CI)", _fmt(m.get("auc_macro")) + _ci(ci)),
        ("micro ROC AUC", _fmt(image.get("auc_micro")) if image else "n/a (no evaluation.json)"),
        ("accuracy", _fmt(m.get("accuracy"))),
        ("balanced accuracy", _fmt(m.get("balanced_accuracy"))),
        ("cross-entropy", _fmt(m.get("loss"))),
        ("test images", _fmt(m.get("n_test"))),
    ]
    out += [Heading(3, "Test metrics"),
            Table(("metric", "value"), tuple(metric_rows),
                  "AUC one-vs-rest (binary: of the second class); CI: stratified bootstrap percentile interval"
                  + (f", {n_res} resamples" if n_res else "") + ". Recomputable from `predictions.csv`."),
            Table(("class", "test images", "AUC (one-vs-rest)", "sensitivity", "specificity", "PPV"),
                  tuple(_per_class_rows(r, evaluation)),
                  "Sensitivity, specificity and PPV of the arg-max prediction for each class against the rest.")]
    pooled = (evaluation or {}).get("pooled_out_of_fold")
    if pooled:
        pi, pc = pooled["image"], pooled.get("case")
        rows_p = [("image", str(pi["n"]), _fmt(pi["auc_macro"]) + _ci(pi.get("auc_macro_ci95")), _fmt(pi["auc_micro"]),
                   _fmt(pi["accuracy"]), _fmt(pi["balanced_accuracy"]))]
        if pc:
            rows_p.append((f"case ({pc['aggregate']})", str(pc["n_cases"]),
                           _fmt(pc["auc_macro"]) + _ci(pc.get("auc_macro_ci95")), _fmt(pc["auc_micro"]),
                           _fmt(pc["accuracy"]), _fmt(pc["balanced_accuracy"])))
        out.append(Table(("pooled out-of-fold", "n", "macro ROC AUC (95% CI)", "micro ROC AUC", "accuracy",
                          "balanced accuracy"), tuple(rows_p),
                         "Every fold's test predictions together (`oof_predictions.csv`): each image tested once, "
                         "by the fold's model that never saw it. The folds' models differ, so this pools scores "
                         "of several models; the mean ± SD over folds is in the repeats table."))
    cm = m.get("confusion_matrix") or []
    if cm:
        out.append(Table(("true \\ predicted",) + tuple(r.classes),
                         tuple((f"**{cls}**",) + tuple(str(v) for v in row) for cls, row in zip(r.classes, cm)),
                         "Test confusion matrix (rows: true class, columns: predicted class)."))
    case = (evaluation or {}).get("case")
    if case:
        out += [Heading(3, "Case level"),
                Para(f"{case['n_images']} test images of {case['n_cases']} cases (patients / studies; "
                     f"{case['images_per_case']['min']}-{case['images_per_case']['max']} images each). A case's "
                     f"probabilities are the **{case['aggregate']}** of its images'; its label is "
                     f"{case['case_label_rule']} ({case['n_mixed_label_cases']} cases with mixed labels)."),
                Table(("level", "n", "macro ROC AUC (95% CI)", "accuracy", "balanced accuracy"), (
                    ("image", str(case["n_images"]), _fmt(image.get("auc_macro", m.get("auc_macro"))) + _ci(ci),
                     _fmt(m.get("accuracy")), _fmt(m.get("balanced_accuracy"))),
                    ("case", str(case["n_cases"]), _fmt(case["auc_macro"]) + _ci(case.get("auc_macro_ci95")),
                     _fmt(case["accuracy"]), _fmt(case["balanced_accuracy"])),
                ))]
    if cal:
        out += [Heading(3, "Calibration"),
                Para(f"Expected calibration error (ECE) {_fmt(cal['ece'])}, Brier score {_fmt(cal['brier'])} "
                     f"({cal['brier_definition']}). Calibration of the {cal['kind']}; {cal['binning']}; "
                     f"ECE is the count-weighted mean gap between observed frequency and mean predicted "
                     f"probability over the bins."),
                Table(("bin", "images", "mean predicted", "observed"),
                      tuple((f"[{b['lower']:.1f}, {b['upper']:.1f}{']' if i == len(cal['bins']) - 1 else ')'}",
                             str(b["count"]), _fmt(b["mean_predicted"]), _fmt(b["observed"]))
                            for i, b in enumerate(cal["bins"]) if b["count"]))]
    if repeats:
        out += _repeats_blocks(r.name, repeats)
    figures = [Figure(d / name, caption) for name, caption in FIGURES.items() if (d / name).is_file()]
    figures += [Figure(p, p.stem) for p in sorted(d.glob("*.png")) if p.name not in FIGURES]
    if figures or (gradcam and gradcam.get("skipped")):
        out.append(Heading(3, "Figures"))
    out += figures
    if gradcam and gradcam.get("skipped"):
        out.append(Para(f"Grad-CAM: no figure ({gradcam['skipped']})."))
    return out


def build(run_dir: Path, config_raw: dict[str, Any], results: Sequence[StageResult], env: dict[str, Any],
          unfinished: Sequence[str] = ()) -> list[Any]:
    """The report as a list of blocks (headings, paragraphs, tables, figures)."""
    run_dir = Path(run_dir)
    name = (config_raw.get("run") or {}).get("name", run_dir.name)
    blocks: list[Any] = [Heading(1, f"Run report: {name}")]
    torch_version = (env.get("packages") or {}).get("torch", "?")
    blocks.append(Para(f"Device: {env.get('device')}; seed {env.get('seed')}; torch {torch_version}; started "
                       f"{env.get('time_utc')}. Resolved config: `config.toml`; environment: `environment.json`."))
    blocks.append(Para("Models are selected on each stage's validation split; the test split of each stage is used "
                       "once, for the selected model only."))
    if unfinished:
        blocks.append(Para(f"**Unfinished stages** (no `metrics.json`; the run was interrupted or failed): "
                           f"{', '.join(unfinished)}. Continue with `mltl run CONFIG --resume --out {run_dir}`."))
    evaluations = {r.name: _load(Path(r.stage_dir) / "evaluation.json") or {} for r in results}
    has_case = any(e.get("case") for e in evaluations.values())
    header = ("stage", "domain", "classes", "train / val / test", "start", "frozen", "selected", "val metric",
              "test AUC (95% CI)", "test accuracy") + (("case AUC (95% CI)",) if has_case else ())
    rows = []
    for r in results:
        m = r.metrics
        ev = evaluations[r.name]
        ci = (ev.get("image") or {}).get("auc_macro_ci95") or (_load(Path(r.stage_dir) / "roc.json") or {}).get(
            "auc_macro_ci95")
        n = m.get("n_images") or {}
        proto = m.get("protocol")
        auc = (_pm(proto["auc_macro"]["mean"], proto["auc_macro"]["sd"]) + f" over {proto['auc_macro']['n']}"
               if proto and isinstance(proto.get("auc_macro"), dict) else _fmt(m.get("auc_macro")) + _ci(ci))
        row = (r.name, str(m.get("domain")), str(len(r.classes)),
               f"{n.get('train')} / {n.get('val')} / {n.get('test')}", str(m.get("start")),
               ", ".join(m.get("frozen") or []) or "none", m.get("selected_variant") or "-",
               f"{m.get('select_by')} {_fmt((m.get('val') or {}).get('selection_value'))}", auc,
               _fmt(m.get("accuracy")))
        if has_case:
            case = ev.get("case")
            row += ((_fmt(case["auc_macro"]) + _ci(case.get("auc_macro_ci95")) + f" ({case['aggregate']})")
                    if case else "-",)
        rows.append(row)
    blocks += [Heading(2, "Summary"), Table(header, tuple(rows),
                                            "A repeated stage shows mean ± SD over its repeats.")]
    for r in results:
        blocks += _stage_blocks(run_dir, r)
    run_figs = [Figure(run_dir / n, c) for n, c in RUN_FIGURES.items() if (run_dir / n).is_file()]
    run_figs += [Figure(p, p.stem) for p in sorted(run_dir.glob("*.png")) if p.name not in RUN_FIGURES]
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
    write_text_atomic(run_dir / "report.md", render_markdown(blocks, run_dir))
    title = f"mltl run report: {(config_raw.get('run') or {}).get('name', run_dir.name)}"
    write_text_atomic(run_dir / "report.html", render_html(blocks, title))


# ------------------------------------------------------------------------------------ mltl report


@attrs.frozen
class RegeneratedReport:
    run_dir: Path
    finished: tuple[str, ...]
    unfinished: tuple[str, ...]
    reporters: tuple[str, ...]


def _stage_result(stage_dir: Path) -> StageResult:
    from .chain import _read_predictions

    metrics_path = stage_dir / "metrics.json"
    try:
        metrics = json.loads(metrics_path.read_text())
        classes = tuple(metrics["classes"])
        test = _read_predictions(stage_dir / "predictions.csv", "test", classes)
        if len(test) != metrics["n_test"]:
            raise ValueError(f"predictions.csv has {len(test)} test rows, metrics.json says {metrics['n_test']}")
        sel_path = stage_dir / "selection.json"
        selection = json.loads(sel_path.read_text()) if sel_path.is_file() else None
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"{stage_dir}: the finished stage's files are damaged ({exc}); "
                        f"re-run the stage (delete {metrics_path} and resume the run)") from None
    return StageResult(name=stage_dir.name, stage_dir=stage_dir, classes=classes, test=test, metrics=metrics,
                       selection=selection)


def parse_reporter_options(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``["evaluation.case_aggregate=max", "roc.n_resamples=2000"]`` -> ``{"evaluation": {...}, "roc": {...}}``.
    Values are read as TOML (numbers, booleans, quoted strings, lists); anything else is a plain string."""
    import sys

    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib

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
    import sys

    from .plugins import get_registry
    from .reporting import call

    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib

    run_dir = Path(run_dir)
    config_path = run_dir / "config.toml"
    if not config_path.is_file():
        raise UserError(f"{run_dir}: not an mltl run directory (no config.toml); give the folder `mltl run` made")
    try:
        config_raw = tomllib.loads(config_path.read_text())
        names = [s["name"] for s in config_raw["stages"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{config_path}: damaged ({exc}); the report cannot name the run's stages") from None
    env = _load(run_dir / "environment.json") or {}
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
        results = [_stage_result(run_dir / n) for n in names if (run_dir / n / "metrics.json").is_file()]
        unfinished = tuple(n for n in names if not (run_dir / n / "metrics.json").is_file())
        for result in results:
            call(created, "stage_finished", result=result)
        if results:
            call(created, "run_finished", results=results, run_dir=run_dir)
        write_report(run_dir, config_raw, results, env, unfinished)
    return RegeneratedReport(run_dir=run_dir, finished=tuple(r.name for r in results), unfinished=unfinished,
                             reporters=tuple(wanted))
