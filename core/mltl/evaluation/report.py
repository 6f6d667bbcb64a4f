"""The run's report (``report.md`` and a self-contained ``report.html``), and ``mltl report RUN_DIR``.

The report is built from what is on disk in the run directory, never from the training process: each
finished stage's ``metrics.json``, ``selection.json`` and ``repeats.json``, and what plugins add through
the ``mltl_report_stage`` and ``mltl_report_run`` hooks (mltl-roc adds its reporters' CIs, case level,
calibration and figures, read from the files they wrote). So :func:`regenerate` (``mltl report``) rebuilds
it for a finished or interrupted run without retraining: it re-creates the stage results from
``metrics.json`` and ``predictions.csv``, replays the reporters' ``stage_finished`` / ``run_finished``
events (which redraw every figure and recompute every derived number from ``predictions.csv``), then
writes both reports.

The report opens with the run's result in three plain lines (:func:`headline`, which the console prints at the
end of a run too): the last stage's AUC with its CI, and with ``[run] baseline = "scratch"`` the chain against
the last stage trained from scratch on the same test images with the paired CI of the difference; what a
reader may conclude; where the report is. Every table says which *level* it shows (one repeat; mean +/- SD
over repeats; a k-fold stage's pooled out-of-fold predictions, :func:`stage_level`), never mixing them.

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
           "Table", "Figure", "StageReport", "render_markdown", "render_html", "headline", "stage_level",
           "bootstrap_settings"]


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
    * For a k-fold stage, about its pooled out-of-fold predictions (``oof_predictions.csv``):
      ``pooled_auc_ci95``, the CI of their macro AUC (shown in the summary table and the pooled section);
      ``pooled_metrics``, rows added to the pooled metrics table; ``pooled_blocks``, shown at the end of the
      pooled section. ``summary`` cells of such a stage must be of the pooled predictions too (the level
      the summary row shows).
    """

    auc_ci95: tuple[float | None, float | None] | None = None
    n_resamples: int | None = None
    metrics: tuple[tuple[str, str], ...] = attrs.field(default=(), converter=tuple)
    summary: tuple[tuple[str, str], ...] = attrs.field(default=(), converter=tuple)
    blocks: tuple[Block, ...] = attrs.field(default=(), converter=tuple)
    figures: tuple[Figure | Para, ...] = attrs.field(default=(), converter=tuple)
    pooled_auc_ci95: tuple[float | None, float | None] | None = None
    pooled_metrics: tuple[tuple[str, str], ...] = attrs.field(default=(), converter=tuple)
    pooled_blocks: tuple[Block, ...] = attrs.field(default=(), converter=tuple)


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


def _per_class_rows(classes: Sequence[str], cm: Sequence[Sequence[int]], auc: dict[str, Any]) -> list[tuple[str, ...]]:
    """class | test images | AUC | sensitivity | specificity | PPV, from one-vs-rest AUCs and the confusion
    matrix of the arg-max prediction."""
    total = sum(sum(row) for row in cm)
    rows = []
    for k, cls in enumerate(list(classes)[:len(cm)]):
        tp = cm[k][k]
        fn = sum(cm[k]) - tp
        fp = sum(row[k] for row in cm) - tp
        tn = total - tp - fn - fp
        sens = tp / (tp + fn) if tp + fn else None
        spec = tn / (tn + fp) if tn + fp else None
        ppv = tp / (tp + fp) if tp + fp else None
        rows.append((cls, str(tp + fn), fmt(auc.get(cls)), fmt(sens), fmt(spec), fmt(ppv)))
    return rows


def _confusion(classes: Sequence[str], cm: Sequence[Sequence[int]], caption: str) -> Table:
    return Table(("true \\ predicted",) + tuple(classes),
                 tuple((f"**{cls}**",) + tuple(str(v) for v in row) for cls, row in zip(classes, cm)), caption)


def _spread_text(values: Sequence[Any]) -> tuple[float | None, float | None]:
    from statistics import mean, stdev

    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return (mean(finite) if finite else None, stdev(finite) if len(finite) > 1 else None)


def _repeats_blocks(stage: str, repeats: dict[str, Any], what: str) -> list[Block]:
    rows = repeats.get("rows") or []
    protocol = repeats.get("protocol", "?")
    blocks: list[Block] = [Heading(3, f"Repeats ({protocol}, {len(rows)} runs): every one of the {what} on its own "
                                      f"test split, and mean ± SD over them")]
    groups: dict[Any, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row.get("fraction"), []).append(row)

    summary = []
    for fraction in sorted(groups, key=lambda f: (f is None, f or 0.0)):
        members = groups[fraction]
        auc_m, auc_sd = _spread_text([m.get("auc_macro") for m in members])
        acc_m, acc_sd = _spread_text([m.get("accuracy") for m in members])
        n_train, _ = _spread_text([m.get("n_train") for m in members])
        summary.append((
            "all" if fraction is None else f"{fraction:g}",
            str(len(members)),
            fmt(n_train, 1) if n_train is not None else "n/a",
            _pm(auc_m, auc_sd),
            _pm(acc_m, acc_sd),
            ", ".join(fmt(m.get("auc_macro")) for m in members),
        ))
    blocks.append(Table(("training fraction", "runs", "mean training images", "test AUC mean ± SD",
                         "accuracy mean ± SD", "every test AUC"), tuple(summary),
                        "Level: every run on its own test images, then mean ± SD over the runs (SD: sample "
                        "standard deviation, n - 1). Each run selects its variant on its own validation split "
                        "and is tested once on its own test split."))
    detail = []
    for row in rows:
        def cell(v: Any) -> str:
            return "-" if v is None else fmt(v)

        detail.append((cell(row.get("fraction")), cell(row.get("fold")), cell(row.get("draw")), cell(row.get("seed")),
                       fmt(row.get("n_train")), fmt(row.get("auc_macro")), fmt(row.get("accuracy"))))
    blocks.append(Table(("fraction", "fold", "draw", "seed", "training images", "test AUC", "accuracy"),
                        tuple(detail), f"Every run, each on its own test split, from `{stage}/repeats.json`."))
    return blocks


_UNITS = {"kfold": "folds", "fractions": "draws", "holdout": "seeds"}


def bootstrap_settings(config_raw: dict[str, Any]) -> tuple[int, int]:
    """``(n_resamples, seed)`` of the CIs the report computes itself: the ``evaluation`` reporter's options
    (else the ``roc`` reporter's) in ``[run] reporter_options``, else their defaults (1000, 0), so that its
    CIs are the reporters' for the same predictions."""
    options = (config_raw.get("run") or {}).get("reporter_options") or {}
    for name in ("evaluation", "roc"):
        o = options.get(name) if isinstance(options.get(name), dict) else {}
        if "n_resamples" in o or "seed" in o:
            return int(o.get("n_resamples", 1000)), int(o.get("seed", 0))
    return 1000, 0


def _pooled(r: StageResult) -> Any:
    """A k-fold stage's pooled out-of-fold predictions (``oof_predictions.csv``), else None."""
    from ..running.rundir import read_predictions

    oof = StageFiles(Path(r.stage_dir)).oof_predictions
    if not (r.metrics.get("protocol") or {}).get("pooled") or not oof.is_file():
        return None
    try:
        return read_predictions(oof, "test", tuple(r.classes))
    except (OSError, KeyError, ValueError):
        return None


def _cluster_note(groups: Any) -> str:
    """What the bootstrap resampled, for a caption: whole cases when the predictions carry case keys."""
    return "" if groups is None else (f", resampling whole cases ({len(set(groups))} patients / studies) rather than "
                                      f"single images (cluster bootstrap)")


def _ci_of(pred: Any, settings: tuple[int, int]) -> tuple[float, float] | None:
    from .stats import bootstrap_auc_ci, scored_classes

    if not len(pred) or not scored_classes(pred.labels, pred.probs):
        return None
    n_resamples, seed = settings
    return bootstrap_auc_ci(pred.labels, pred.probs, n_resamples=n_resamples, seed=seed, groups=pred.groups)


def stage_level(r: StageResult, parts: Sequence[StageReport] = (), settings: tuple[int, int] = (1000, 0)
                ) -> dict[str, Any]:
    """What a stage's row of the summary table shows, all of one level (named in ``level``): a k-fold stage's
    pooled out-of-fold predictions, else its test split (a repeated stage: its representative repeat's).
    ``auc``, ``ci`` (a plugin's when given, else the stratified bootstrap with ``settings``), ``accuracy``,
    ``n``; and over the repeats of a repeated stage ``mean``, ``sd``, ``n_repeats``, ``unit``."""
    from .metrics import classification_metrics

    m = r.metrics
    proto = m.get("protocol") or {}
    out: dict[str, Any] = {}
    pooled = _pooled(r)
    if pooled is not None:
        scores = classification_metrics(pooled.labels, pooled.probs, r.classes)
        ci = next((p.pooled_auc_ci95 for p in parts if p.pooled_auc_ci95 is not None), None) or _ci_of(pooled, settings)
        out.update(level=f"pooled out-of-fold ({len(pooled)} images, {proto['auc_macro']['n']} folds)",
                   auc=scores["auc_macro"], ci=ci, accuracy=scores["accuracy"], n=len(pooled),
                   predictions=pooled, scores=scores)
    else:
        ci = next((p.auc_ci95 for p in parts if p.auc_ci95 is not None), None) or _ci_of(r.test, settings)
        level = (f"representative repeat {proto.get('representative')} ({m.get('n_test')} test images)" if proto
                 else f"test split ({m.get('n_test')} images)")
        out.update(level=level, auc=m.get("auc_macro"), ci=ci, accuracy=m.get("accuracy"), n=m.get("n_test"))
    if isinstance(proto.get("auc_macro"), dict):
        unit = _UNITS.get(proto.get("name"), "repeats")
        if proto.get("headline"):
            unit += f" at {proto['headline']}"
        out.update(mean=proto["auc_macro"]["mean"], sd=proto["auc_macro"]["sd"], n_repeats=proto["auc_macro"]["n"],
                   unit=unit)
    return out


def _pooled_blocks(r: StageResult, level: dict[str, Any], parts: Sequence[StageReport],
                   settings: tuple[int, int]) -> list[Block]:
    """The pooled out-of-fold section of a k-fold stage: metrics, per class, confusion matrix, all pooled."""
    scores, pred = level["scores"], level["predictions"]
    rows = [("macro ROC AUC (95% CI)", fmt(scores["auc_macro"]) + _ci(level["ci"]))]
    rows += [row for p in parts for row in p.pooled_metrics]
    rows += [("accuracy", fmt(scores["accuracy"])), ("balanced accuracy", fmt(scores["balanced_accuracy"])),
             ("cross-entropy", fmt(scores["loss"])), ("images", str(len(pred)))]
    n_res = next((p.n_resamples for p in parts if p.pooled_auc_ci95 is not None), None) or settings[0]
    out: list[Block] = [
        Heading(3, f"Pooled out-of-fold predictions ({len(pred)} images, each tested once)"),
        Para(f"Every fold's test predictions together (`{r.name}/oof_predictions.csv`): each image is predicted once, "
             "by the model of the fold that did not train on it. These are several models' scores pooled; the "
             "spread between the folds is in the next section."),
        Table(("metric", "value (pooled out-of-fold)"), tuple(rows),
              f"CI: stratified bootstrap percentile interval, {n_res} resamples{_cluster_note(pred.groups)}. "
              "Recomputable from `oof_predictions.csv`."),
        Table(("class", "images", "AUC (one-vs-rest)", "sensitivity", "specificity", "PPV"),
              tuple(_per_class_rows(r.classes, scores["confusion_matrix"], scores["auc_per_class"])),
              "Pooled out-of-fold: sensitivity, specificity and PPV of the arg-max prediction for each class "
              "against the rest."),
        _confusion(r.classes, scores["confusion_matrix"],
                   "Pooled out-of-fold confusion matrix (rows: true class, columns: predicted class)."),
    ]
    return out + [b for p in parts for b in p.pooled_blocks]


def _backbone_named(stage: StageResult) -> str:
    """`` (`gfe-1`)`` from a stage's record of how its network started (``start``: "new gfe-1"), or ""."""
    start = str(stage.metrics.get("start") or "")
    return f" (`{start[4:]}`)" if start.startswith("new ") else ""


def _stage_blocks(r: StageResult, parts: Sequence[StageReport], level: dict[str, Any], settings: tuple[int, int],
                  baseline: bool = False) -> list[Block]:

    m = r.metrics
    d = Path(r.stage_dir)
    repeats = _load(StageFiles(d).repeats_json)
    p = m.get("protocol") or {}
    rep = p.get("representative")
    title = f"Stage `{r.name}`" + (" (baseline: the last stage trained from scratch)" if baseline else "")
    out: list[Block] = [Heading(2, title)]
    if p:
        served = (f"the stage's final model (`{r.name}/final/`, trained on all its non-test data after the repeats and "
                  "not evaluated itself: the numbers are the repeats') is what a later stage starts from and "
                  "`mltl predict` serves" if m.get("final_model") else
                  "its model is the one a later stage starts from and `mltl predict` serves")
        out.append(Para(f"Protocol: **{p['name']}**: {protocol_line(p)}. "
                        + ("Below: the pooled out-of-fold predictions, then every fold, then the representative "
                           if level.get("predictions") is not None else "Below: every run, then the representative ")
                        + f"repeat `{rep}`, one of the measured repeats ({served}; every repeat is in "
                        f"`{r.name}/repeats.json` and `{r.name}/repeats/`)."))
    at = f" ({rep})" if rep else ""
    out.append(Para(f"Classes: {', '.join(r.classes)}. {m.get('inherited', '')}. Trainable parameters: "
                    f"{m.get('trainable_parameters', 0):,}; best epoch {m.get('best_epoch')} of "
                    f"{m.get('epochs_run')}; training time {fmt(m.get('train_seconds'), 1)} s{at}."))
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
        out += [Heading(3, f"Selection among variants{at}"),
                Para(f"Selected by {sel.get('rule', 'validation ' + sel['select_by'])} over "
                     f"{', '.join(sel['swept'])}, on the validation split only ({sel.get('ties', '')})."),
                Table(("variant", f"selection value (val {sel['select_by']})", "val AUC", "val accuracy",
                       "best epoch"), tuple(rows))]
    if level.get("predictions") is not None:
        out += _pooled_blocks(r, level, parts, settings)
    if repeats:
        out += _repeats_blocks(r.name, repeats, _UNITS.get(p.get("name"), "repeats"))

    headline = next((x for x in parts if x.auc_ci95 is not None), None)
    metric_rows = [("macro ROC AUC (95% CI)", fmt(m.get("auc_macro")) + _ci(headline and headline.auc_ci95))]
    metric_rows += [row for x in parts for row in x.metrics]
    metric_rows += [
        ("accuracy", fmt(m.get("accuracy"))),
        ("balanced accuracy", fmt(m.get("balanced_accuracy"))),
        ("cross-entropy", fmt(m.get("loss"))),
        ("test images", fmt(m.get("n_test"))),
    ]
    n_res = headline.n_resamples if headline else None
    where = f"representative repeat `{rep}`: its own test split" if rep else "test split"
    out += [Heading(3, f"Test metrics ({where}, {m.get('n_test')} images)"),
            Table(("metric", f"value ({rep or 'test split'})"), tuple(metric_rows),
                  "AUC one-vs-rest (binary: of the second class); CI: stratified bootstrap percentile interval"
                  + (f", {n_res} resamples" if n_res else "") + _cluster_note(r.test.groups)
                  + ". Recomputable from `predictions.csv`."),
            Table(("class", "test images", "AUC (one-vs-rest)", "sensitivity", "specificity", "PPV"),
                  tuple(_per_class_rows(r.classes, m.get("confusion_matrix") or [], m.get("auc_per_class") or {})),
                  f"{rep or 'Test split'}: sensitivity, specificity and PPV of the arg-max prediction for each "
                  f"class against the rest.")]
    cm = m.get("confusion_matrix") or []
    if cm:
        out.append(_confusion(r.classes, cm, f"{'Test' if not rep else rep + ':'} confusion matrix (rows: true class, "
                                             f"columns: predicted class)."))
    out += [b for x in parts for b in x.blocks]
    figures: list[Block] = [b for x in parts for b in x.figures]
    shown = {Path(b.path).name for b in figures + [b for x in parts for b in (*x.blocks, *x.pooled_blocks)]
             if isinstance(b, Figure)}
    figures += [Figure(f, f.stem) for f in sorted(d.glob("*.png")) if f.name not in shown]
    if figures:
        out.append(Heading(3, "Figures"))
    out += figures
    return out


def _ci_text(ci: Any) -> str:
    if not ci or ci[0] is None or ci[1] is None or not all(math.isfinite(float(v)) for v in ci):
        return "no CI"
    return f"95% CI {fmt(ci[0])}-{fmt(ci[1])}"


def headline(run_dir: Path, config_raw: dict[str, Any], results: Sequence[StageResult],
             unfinished: Sequence[str] = (), levels: dict[str, dict[str, Any]] | None = None
             ) -> tuple[list[str], list[Block]]:
    """The report's first screen: three plain lines (the result with its CI; what a reader may conclude; where
    the report is) and, with ``[run] baseline = "scratch"``, the table of the chain against the last stage
    trained from scratch on the same test images (both AUCs with CIs, the paired CI of their difference,
    from :func:`mltl.evaluation.difference.paired_difference`). The console prints the same three lines."""
    from ..config import baseline_name
    from .difference import judged, paired_difference, verdict

    run_dir = Path(run_dir)
    where = (f"Full report: {RunFiles(run_dir).report_html} (also {RunFiles(run_dir).report_md.name}): every "
             f"stage's tables and figures.")
    base_name = baseline_name(config_raw)
    names = [s.get("name") for s in config_raw.get("stages") or [] if isinstance(s, dict)] or [
        r.name for r in results if r.name != base_name]
    by_name = {r.name: r for r in results}
    target = by_name.get(names[-1]) if names else None
    if target is None:
        unfinished_line = (f"Result: the last stage{f' `{names[-1]}`' if names else ''} has not finished, so there "
                           f"is no result yet.")
        return [unfinished_line, "Nothing can be concluded yet.", where], []
    n_resamples, seed = bootstrap_settings(config_raw)
    chain = " -> ".join(n for n in names if n in by_name)
    baseline = by_name.get(base_name) if base_name else None
    if baseline is None:
        lv = (levels or {}).get(target.name) or stage_level(target, hooks().report_stage(target), (n_resamples, seed))
        rep = (target.metrics.get("protocol") or {}).get("representative")
        on = (judged(target).phrase if lv.get("predictions") is not None else
              f"on the test split of {lv['n']} images" + (f" (representative repeat {rep})" if rep else ""))
        first = (f"Result: {on}, the chain ({chain}) reaches test AUC {fmt(lv['auc'])} ({_ci_text(lv['ci'])})"
                 + (f"; over its {lv['n_repeats']} {lv['unit']}: {_pm(lv['mean'], lv['sd'])} (mean ± SD)"
                    if "mean" in lv and lv.get("predictions") is None else "") + ".")
        why = ("the run was interrupted before it finished" if base_name and base_name in unfinished
               else "set `[run] baseline = \"scratch\"` to train one, or run `mltl compare`")
        second = (f"No baseline was trained ({why}), so this run alone cannot say whether the chain does better "
                  f"than training the last stage from scratch.")
        return [first, second, where], []
    d = paired_difference(target, baseline, n_resamples=n_resamples, seed=seed)
    mean = "mean " if d["n_draws"] > 1 else ""
    first = (f"Result: {d['phrase']}, the chain ({chain}) reaches {mean}test AUC {fmt(d['auc_a'])} "
             f"({_ci_text(d['auc_ci95_a'])}) and the last stage trained from scratch {fmt(d['auc_b'])} "
             f"({_ci_text(d['auc_ci95_b'])}): a difference of {d['diff']:+.3f} (95% CI {d['diff_ci95'][0]:+.3f} to "
             f"{d['diff_ci95'][1]:+.3f}).")
    second = verdict(d, "the chain", "training the last stage from scratch")
    p = d["p"]
    p_text = "-" if p is None or not math.isfinite(p) else (
        f"< {d['p_resolution']:.3g}" if d["p_resolution"] and p < d["p_resolution"] else f"{p:.3g}")
    level = d["level"]
    table = Table(("model", "stages", f"test AUC (95% CI), {level}", "test images"), (
        ("the chain", chain, fmt(d["auc_a"]) + _ci(d["auc_ci95_a"]), str(d["n_images"])),
        ("from scratch (baseline)", f"{baseline.name}", fmt(d["auc_b"]) + _ci(d["auc_ci95_b"]), str(d["n_images"])),
        ("difference (chain - scratch)", "paired: same images" + (f", same {d['unit']}" if d["unit"] else ""),
         f"{d['diff']:+.3f} ({d['diff_ci95'][0]:+.3f} to {d['diff_ci95'][1]:+.3f}); p {p_text}", str(d["n_images"])),
    ), f"The baseline `{baseline.name}` is the last stage trained from scratch: the backbone the chain's first stage "
       f"selected{_backbone_named(baseline)}, randomly initialised, with the last stage's head, training settings, "
       f"protocol and the very same splits: the same network as the chain's, started from random weights. CIs: "
       f"class-stratified bootstrap percentile intervals, {n_resamples} resamples (seed {seed})"
       + (f", resampling whole cases ({d['n_cases']} patients / studies), not single images" if d["n_cases"] else "")
       + "; the difference's CI is paired (both models scored on the same resamples"
       + ("; the draws resampled too" if d["n_draws"] > 1 else "") + f"). p: {d['test']}.")
    blocks: list[Block] = [table]
    if d["n_draws"] == 1:
        from .difference import ChainScores

        scores = [ChainScores(name=n, predictions=j.draws[0], auc_ci95=tuple(ci))
                  for n, j, ci in (("the chain", judged(target), d["auc_ci95_a"]),
                                   ("from scratch", judged(baseline), d["auc_ci95_b"]))]
        blocks += [b for answer in hooks().comparison_figures(scores, run_dir) for b in answer or ()]
    return [first, second, where], blocks


def build(run_dir: Path, config_raw: dict[str, Any], results: Sequence[StageResult], env: dict[str, Any],
          unfinished: Sequence[str] = ()) -> list[Block]:
    """The report as a list of blocks (headings, paragraphs, tables, figures)."""
    from ..config import baseline_name

    run_dir = Path(run_dir)
    name = (config_raw.get("run") or {}).get("name", run_dir.name)
    settings = bootstrap_settings(config_raw)
    base_name = baseline_name(config_raw)
    # the baseline last, after the chain (it trains just before the last stage)
    results = [r for r in results if r.name != base_name] + [r for r in results if r.name == base_name]
    parts = {r.name: hooks().report_stage(r) for r in results}
    levels = {r.name: stage_level(r, parts[r.name], settings) for r in results}
    blocks: list[Block] = [Heading(1, f"Run report: {name}")]
    lines, first_screen = headline(run_dir, config_raw, results, unfinished, levels)
    blocks += [Para(line) for line in lines] + first_screen
    torch_version = (env.get("packages") or {}).get("torch", "?")
    blocks.append(Para(f"Device: {env.get('device')}; seed {env.get('seed')}; torch {torch_version}; started "
                       f"{env.get('time_utc')}. Resolved config: `config.toml`; environment: `environment.json`."))
    blocks.append(Para("Models are selected on each stage's validation split; the test split of each stage is used "
                       "once, for the selected model only."))
    if unfinished:
        blocks.append(Para(f"**Unfinished stages** (no `metrics.json`; the run was interrupted or failed): "
                           f"{', '.join(unfinished)}. Continue with `mltl run CONFIG --resume --out {run_dir}`."))
    extra_columns = list(dict.fromkeys(column for r in results for p in parts[r.name] for column, _ in p.summary))
    header = ("stage", "domain", "classes", "train / val / test", "start", "frozen", "selected", "val metric",
              "evaluated on (the level of the next columns)", "test AUC (95% CI)", "test accuracy") + tuple(
        extra_columns) + ("test AUC mean ± SD over repeats",)
    rows = []
    for r in results:
        m = r.metrics
        lv = levels[r.name]
        n = m.get("n_images") or {}
        rep = (m.get("protocol") or {}).get("representative")
        at = f" ({rep})" if rep else ""
        cells = {column: value for p in reversed(parts[r.name]) for column, value in p.summary}
        spread = (f"{_pm(lv['mean'], lv['sd'])} over {lv['n_repeats']} {lv['unit']}" if "mean" in lv else "-")
        label = r.name + (" (baseline: from scratch)" if r.name == base_name else "")
        rows.append((label, str(m.get("domain")), str(len(r.classes)),
                     f"{n.get('train')} / {n.get('val')} / {n.get('test')}{at}", str(m.get("start")),
                     ", ".join(m.get("frozen") or []) or "none",
                     (m["selected_variant"] + at) if m.get("selected_variant") else "-",
                     f"{m.get('select_by')} {fmt((m.get('val') or {}).get('selection_value'))}{at}", lv["level"],
                     fmt(lv["auc"]) + _ci(lv["ci"]), fmt(lv["accuracy"]))
                    + tuple(cells.get(c, "-") for c in extra_columns) + (spread,))
    caption = ("Each row's AUC, CI, accuracy" + (" and case-level AUC" if extra_columns else "")
               + " are of the predictions named in \"evaluated on\": a k-fold stage's pooled out-of-fold predictions "
               "(every image once), else the stage's test split (a repeated stage: its representative repeat's). "
               "Train / val / test, selected variant and val metric of a repeated stage "
               f"are its representative repeat's. CI: stratified bootstrap, {settings[0]} resamples unless a "
               "reporter's options say otherwise, resampling whole cases where the domain gives patient / study "
               "groups. The last column is the mean ± sample SD of the repeats' own test "
               "AUCs.")
    blocks += [Heading(2, "Summary"), Table(header, tuple(rows), caption)]
    for r in results:
        blocks += _stage_blocks(r, parts[r.name], levels[r.name], settings, baseline=r.name == base_name)
    run_figs: list[Block] = [b for answer in hooks().report_run(list(results), run_dir)
                             for b in answer or ()]
    shown = {Path(b.path).name for b in run_figs + first_screen if isinstance(b, Figure)}
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
    from ..config import baseline_name

    base_name = baseline_name(config_raw)
    if base_name:  # [run] baseline: trained just before the last stage
        names.insert(len(names) - 1, base_name)
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
        # the report's own CIs with the options the reporters were replayed with
        run_raw = {**(config_raw.get("run") or {}), "reporter_options": options}
        write_report(run_dir, {**config_raw, "run": run_raw}, results, env, unfinished)
    return RegeneratedReport(run_dir=run_dir, finished=tuple(r.name for r in results), unfinished=unfinished,
                             reporters=tuple(wanted))
