"""Did the intermediate stage help? The same target under three chains, side by side.

From a chain config (at least two stages), ``mltl compare`` derives and runs:

- ``scratch``: the last stage alone, from a freshly initialised copy of the first stage's backbone
  (nothing frozen);
- ``single-stage``: the first stage, then the last stage started from it;
- ``multi-stage``: the chain as written (skipped when it has only two stages: it is the single-stage one).

The last stage keeps its domain, split, seed, training settings and head in all three, so every chain is
tested on the same test images. The table gives each chain's test macro AUC with a 95% CI (paired,
class-stratified bootstrap), accuracy, and the test of its difference from the full chain: DeLong's test
for a binary target, the paired bootstrap for a multi-class macro AUC. A k-fold target (the default for a
small last stage) is judged on its pooled out-of-fold predictions, every image once, and the table adds
the mean +/- SD over folds.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from ..config import Config, load_config, parse_config
from ..errors import UserError
from ..evaluation import report
from ..evaluation.metrics import classification_metrics
from ..evaluation.report import Block, Figure, Heading, Para, Table, render_markdown
from ..evaluation.results import Predictions, StageResult
from ..evaluation.stats import delong_test, paired_bootstrap
from ..plugins import hooks
from .rundir import (
    RunFiles,
    StageFiles,
    choose_run_dir,
    read_predictions,
    write_json_atomic,
    write_text_atomic,
)

if TYPE_CHECKING:
    from .chain import RunResult


@attrs.frozen(eq=False)
class Comparison:
    """What :func:`compare` wrote (``out``, with ``comparison.md``) and its table, one row per chain."""

    out: Path
    rows: tuple[dict[str, Any], ...]


def _effective_head(stages: list[dict[str, Any]], index: int) -> dict[str, Any] | None:
    """The head table the last stage ends up with: its own, or the one it inherits down the init chain."""
    by_name = {s["name"]: s for s in stages}
    stage = stages[index]
    while stage is not None:
        if "head" in stage:
            return copy.deepcopy(stage["head"])
        stage = by_name.get(stage.get("init", ""))
    return None


def chains(config: Config) -> dict[str, dict[str, Any]]:
    """The raw configs of the chains to compare, by name."""
    raw = config.raw
    stages = raw["stages"]
    if len(stages) < 2:
        raise UserError(f"{config.source}: mltl compare needs a chain of at least two stages")
    first, last = stages[0], stages[-1]
    if "backbone" not in first:
        raise UserError(f"{config.source}: stages[0] needs a backbone for mltl compare")
    head = _effective_head(stages, len(stages) - 1)
    out: dict[str, dict[str, Any]] = {}

    scratch_target = {k: copy.deepcopy(v) for k, v in last.items() if k not in ("init", "freeze", "head")}
    scratch_target["backbone"] = copy.deepcopy(first["backbone"])
    if head is not None:
        scratch_target["head"] = head
    out["scratch"] = {**copy.deepcopy(raw), "stages": [scratch_target]}

    single_target = {k: copy.deepcopy(v) for k, v in last.items() if k != "head"}
    single_target["init"] = first["name"]
    if head is not None:
        single_target["head"] = head
    out["single-stage"] = {**copy.deepcopy(raw), "stages": [copy.deepcopy(first), single_target]}
    if len(stages) > 2:
        out["multi-stage"] = copy.deepcopy(raw)
    for name, r in out.items():
        r["run"] = {k: v for k, v in r["run"].items() if k != "out"}
        r["run"]["name"] = f"{raw['run']['name']}-{name}"
    return out


def compare(config: Config | str | Path, *, overrides: list[str] | tuple[str, ...] = (), out: str | Path | None = None,
            device: str | None = None, n_resamples: int = 1000, resume: bool = False,
            reuse: str | Path | None = None) -> Comparison:
    """The config's target trained from scratch, single-stage and multi-stage, compared on the same test images.

    Runs the three chains into ``out`` (default ``runs/<name>-compare[-N]``) and writes ``comparison.md``
    (:func:`write_comparison`): each chain's test AUC with bootstrap confidence intervals (``n_resamples``
    resamples, seeded with the config's ``run.seed``) and paired tests against the multi-stage chain.

    ``reuse`` names an earlier comparison folder (or one run directory): each chain copies the stages that
    the same-named chain there (or that run) finished from the same data, settings and upstream stages,
    instead of training them again (see :func:`mltl.run`).
    """
    from .chain import run

    if not isinstance(config, Config):
        config = load_config(config, overrides)
    derived = {name: parse_config(raw, f"{config.source} ({name})") for name, raw in chains(config).items()}
    if resume and out is None:
        raise UserError("--resume: name the comparison folder to continue with --out")
    out_dir = Path(out) if resume else choose_run_dir(str(out) if out is not None else None,
                                                       f"{config.run.name}-compare")
    out_dir.mkdir(parents=True, exist_ok=True)
    earlier: dict[str, list[Path]] = {name: [] for name in derived}
    if reuse is not None:
        reuse = Path(reuse)
        for name in derived:  # the same-named chain of an earlier comparison first, then a plain run directory
            earlier[name] = [p for p in (reuse / name, reuse) if RunFiles(p).config.is_file()]
        if not any(earlier.values()):
            raise UserError(f"--reuse {reuse}: neither a comparison folder (with scratch/, single-stage/, ..) nor "
                            f"an mltl run directory (no config.toml); name a folder that mltl compare or "
                            f"mltl run wrote")
    # with resume, each chain continues its own run directory (finished stages reused, as mltl run --resume)
    results = {name: run(cfg, out=out_dir / name, device=device,
                         resume=resume and RunFiles(out_dir / name).config.is_file(), reuse=earlier[name])
               for name, cfg in derived.items()}
    return write_comparison(out_dir, results, n_resamples=n_resamples, seed=config.run.seed)


@attrs.frozen(eq=False)
class ChainScores:
    """One chain's target as the comparison judges it, handed to ``mltl_comparison_figures`` hooks.

    ``predictions``: the target's test predictions (pooled out-of-fold for a k-fold target), the same
    images in the same order for every chain; ``auc_ci95``: the 95% CI of their macro AUC, as printed.
    """

    name: str
    predictions: Predictions
    auc_ci95: tuple[float, float]


def write_comparison(out_dir: Path, results: Mapping[str, RunResult], *, n_resamples: int = 1000,
                     seed: int = 0) -> Comparison:
    """Compare finished chains on their last stage and write ``comparison.json``, ``.md`` and ``.html``.

    ``results``: the chains' runs by name, in table order (``multi-stage`` is the reference when present,
    else ``single-stage``). Each target's macro-AUC CI and the paired test of its difference from the
    reference come from :func:`mltl.evaluation.stats.paired_bootstrap` with ``n_resamples`` and ``seed``; the figures
    come from the plugins' ``mltl_comparison_figures`` hooks.
    """
    out_dir = Path(out_dir)
    reference = "multi-stage" if "multi-stage" in results else "single-stage"
    ref = _evaluated(results[reference].stages[-1])
    rows, scored = [], []
    for name, result in results.items():
        target = result.stages[-1]
        test = _evaluated(target)
        if test.ids != ref.ids:
            raise RuntimeError("the chains were tested on different images; this is a bug in mltl compare")
        scores = classification_metrics(test.labels, test.probs, test.classes)
        boot = paired_bootstrap(test.labels, test.probs, None if name == reference else ref.probs,
                                classes=test.classes, n_resamples=n_resamples, seed=seed)
        row: dict[str, Any] = {
            "chain": name,
            "stages": [s.name for s in result.stages],
            "train_images": [s.metrics["n_images"]["train"] for s in result.stages],
            "classes": [len(s.classes) for s in result.stages],
            "auc_macro": scores["auc_macro"], "auc_ci95": [boot["ci_low"], boot["ci_high"]],
            "accuracy": scores["accuracy"],
            "n_test": len(test), "evaluated_on": test.split,
            "repeats": _repeats(target),
            "train_seconds": sum(_train_seconds(s) for s in result.stages),
            "run_dir": str(result.run_dir),
        }
        if name != reference:
            if len(test.classes) == 2:
                d = delong_test(test.labels, test.probs[:, 1], ref.probs[:, 1])
                row["p_vs_" + reference] = d["p"]
                row["test"] = "DeLong"
            else:
                row["p_vs_" + reference] = boot["p"]
                # 0 means no resample reversed the difference: p is below what n_resamples can resolve
                row["p_resolution"] = 2.0 / n_resamples
                row["test"] = "paired bootstrap of the macro-AUC difference"
        rows.append(row)
        scored.append(ChainScores(name=name, predictions=test, auc_ci95=(boot["ci_low"], boot["ci_high"])))
    figures = [f for answer in hooks().comparison_figures(scored, out_dir)
               for f in answer or ()]
    names = [f.path.relative_to(out_dir).as_posix() if f.path.is_relative_to(out_dir) else str(f.path)
             for f in figures]
    write_json_atomic(out_dir / "comparison.json", {"reference": reference, "rows": rows,
                                                    "figure": names[0] if names else None, "figures": names,
                                                    "n_resamples": n_resamples, "seed": seed})
    write_text_atomic(out_dir / "comparison.md", render(rows, reference, figures, out_dir))
    write_text_atomic(out_dir / "comparison.html", render_html(rows, reference, figures))
    return Comparison(out=out_dir, rows=tuple(rows))


def _evaluated(stage: StageResult) -> Predictions:
    """The predictions a chain is judged on: the pooled out-of-fold test predictions of a k-fold target
    (every image once), else the target's test predictions."""
    oof = StageFiles(stage.stage_dir).oof_predictions
    if (stage.metrics.get("protocol") or {}).get("pooled") and oof.is_file():
        return attrs.evolve(read_predictions(oof, "test", stage.classes), split="out-of-fold test", groups=None)
    return stage.test


def _repeats(stage: StageResult) -> dict[str, Any] | None:
    proto = stage.metrics.get("protocol")
    if not proto:
        return None
    return {"protocol": proto["name"], "n": proto["auc_macro"]["n"], "auc_mean": proto["auc_macro"]["mean"],
            "auc_sd": proto["auc_macro"]["sd"]}


def _train_seconds(stage: StageResult) -> float:
    proto = stage.metrics.get("protocol")
    return float(proto["train_seconds_total"]) if proto else float(stage.metrics["train_seconds"])


def _p_text(p: float | None, resolution: float | None) -> str:
    """``0.0123``; ``< 0.002`` for a bootstrap p below its resolution (no resample reversed the sign)."""
    if p is None:
        return "-"
    if resolution is not None and p < resolution:
        return f"< {resolution:.3g}"
    return f"{p:.3g}"


def _blocks(rows: list[dict[str, Any]], reference: str, figures: Sequence[Figure]) -> list[Block]:

    table = []
    for r in rows:
        p = r.get("p_vs_" + reference)
        lo, hi = r["auc_ci95"]
        rep = r.get("repeats")
        spread = "-" if not rep else (f"{rep['auc_mean']:.3f} +/- {rep['auc_sd']:.3f} ({rep['n']} {rep['protocol']})"
                                      if rep["auc_sd"] is not None else f"{rep['auc_mean']:.3f}")
        table.append((r["chain"], " -> ".join(r["stages"]), " / ".join(map(str, r["train_images"])),
                      " / ".join(map(str, r["classes"])), f"{r['auc_macro']:.3f} ({lo:.3f}-{hi:.3f})", spread,
                      f"{r['accuracy']:.3f}", str(r["n_test"]), _p_text(p, r.get("p_resolution")),
                      f"{r['train_seconds']:.0f}"))
    tests = {r["test"] for r in rows if "test" in r}
    evaluated = {r.get("evaluated_on", "test") for r in rows}
    blocks: list[Block] = [
        Heading(1, f"Chain comparison (same target test images; p against {reference})"),
        Table(("chain", "stages", "train images per stage", "classes", "test AUC (95% CI)",
               "AUC mean +/- SD over repeats", "accuracy", "n test", f"p vs {reference}", "training time (s)"),
              tuple(table)),
        Para(f"Test of the AUC difference: {', '.join(sorted(tests))}. AUC, CI, accuracy and p are computed on the "
             f"{' / '.join(sorted(evaluated))} predictions (for a k-fold target: every image once, each predicted "
             "by the fold model that did not train on it). Each chain selects its variants on validation data "
             "only; the test images are the same for every chain. Training images per stage are those of the "
             "representative repeat; training time sums every repeat. Each chain's own run directory holds its "
             "full report (`report.html`)."),
    ]
    return blocks + list(figures)


def render(rows: list[dict[str, Any]], reference: str, figures: Sequence[Figure] = (),
           out_dir: Path = Path(".")) -> str:
    """``comparison.md``: the table of ``rows``, then ``figures`` (linked relative to ``out_dir``);
    :func:`render_html` gives the same as a self-contained ``comparison.html``."""
    return render_markdown(_blocks(rows, reference, figures), out_dir)


def render_html(rows: list[dict[str, Any]], reference: str, figures: Sequence[Figure] = ()) -> str:
    """``comparison.html``: :func:`render`'s content with the figures embedded."""
    return report.render_html(_blocks(rows, reference, figures), "mltl chain comparison")


__all__ = ["ChainScores", "Comparison", "chains", "compare", "render", "render_html", "write_comparison"]
