"""Two models on the same test images: what each is judged on, the paired difference of their AUCs with its
CI and p-value, and a one-sentence verdict.

Used by ``mltl compare`` (every chain against the reference chain) and by the run report's first screen (the
chain against its last stage trained from scratch, ``[run] baseline = "scratch"``). :class:`ChainScores` and
:class:`FractionScores` are the records the ``mltl_comparison_figures`` hook receives.

Where the test images carry patient / study groups, every CI and p-value resamples whole cases (the cluster
bootstrap of :mod:`mltl.evaluation.stats`), and DeLong's test (which treats images as independent) is not used.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from ..errors import UserError
from ..running.rundir import StageFiles, read_predictions
from .results import Predictions, StageResult
from .stats import (
    bootstrap_macro_aucs,
    delong_test,
    macro_auc,
    paired_bootstrap,
    paired_bootstrap_over_draws,
)


@attrs.frozen
class FractionScores:
    """One chain's target at one training fraction: every draw's test macro AUC, in draw order (NaN where
    undefined), and the mean number of training images over the draws."""

    fraction: float
    n_train: float
    aucs: tuple[float, ...]


@attrs.frozen(eq=False)
class ChainScores:
    """One chain's target as the comparison judges it, handed to ``mltl_comparison_figures`` hooks.

    ``predictions``: the target's test predictions (pooled out-of-fold for a k-fold target), the same
    images in the same order for every chain; ``auc_ci95``: the 95% CI of their macro AUC, as printed;
    ``fractions``: for a target repeated over training fractions, one :class:`FractionScores` per fraction
    (ascending), else empty.
    """

    name: str
    predictions: Predictions
    auc_ci95: tuple[float, float]
    fractions: tuple[FractionScores, ...] = ()


def aligned(pred: Predictions, ids: tuple[str, ...]) -> Predictions:
    """``pred`` with its rows in the order of ``ids`` (the same set of images)."""
    if pred.ids == ids:
        return pred
    where = {i: k for k, i in enumerate(pred.ids)}
    if set(where) != set(ids):
        raise RuntimeError("the draws of a fractions target were tested on different images; this is a bug in "
                           "mltl compare or a damaged run directory")
    order = [where[i] for i in ids]
    return attrs.evolve(pred, ids=ids, labels=pred.labels[order], probs=pred.probs[order],
                        groups=None if pred.groups is None else tuple(pred.groups[i] for i in order))


@attrs.frozen(eq=False)
class Judged:
    """What a target is judged on when two models are compared (:func:`paired_difference`).

    ``draws``: test predictions on the same images in the same order: one (a single split, or a k-fold
    target's pooled out-of-fold predictions) or one per repeat (seeds; draws at the largest training
    fraction), whose AUCs are then averaged. ``level``: that in words, for a table header ("pooled
    out-of-fold"); ``unit``: what a draw is ("seeds", "draws at training fraction 1"), empty for one."""

    level: str
    draws: tuple[Predictions, ...]
    unit: str = ""

    @property
    def phrase(self) -> str:
        """Where the numbers come from, for a sentence: "on the test split of 30 images"."""
        n = len(self.draws[0])
        if self.level.startswith("pooled"):
            return (f"on the pooled out-of-fold predictions of {n} images ({self.level.split('(')[-1].rstrip(')')}; "
                    f"each image tested once, by the fold model that did not train on it)")
        if len(self.draws) > 1:
            return f"averaged over {len(self.draws)} {self.unit}, each tested on the same {n} images"
        return f"on the test split of {n} images"


def judged(stage: StageResult) -> Judged:
    """The test predictions a (last) stage is judged on: k-fold, its pooled out-of-fold predictions (each image
    tested once, by the fold model that never saw it); repeated seeds, every seed; training fractions, every
    draw at the largest fraction; else its test split."""
    proto = stage.metrics.get("protocol") or {}
    files = StageFiles(stage.stage_dir)
    classes = tuple(stage.classes)
    if proto.get("pooled") and files.oof_predictions.is_file():
        pred = read_predictions(files.oof_predictions, "test", classes)
        return Judged(f"pooled out-of-fold ({proto['auc_macro']['n']} folds)", (pred,))
    if proto.get("name") in ("holdout", "fractions") and files.repeats_json.is_file():
        try:
            rows = json.loads(files.repeats_json.read_text())["rows"]
        except (OSError, ValueError, KeyError) as exc:
            raise UserError(f"{files.repeats_json}: cannot read the repeats of stage {stage.name} ({exc})") from None
        unit = "seeds"
        if proto["name"] == "fractions":
            top = max(float(r["fraction"]) for r in rows)
            rows = [r for r in rows if float(r["fraction"]) == top]
            unit = f"draws at training fraction {top:g}"
        preds = [read_predictions(files.repeat(r["label"]).predictions, "test", classes) for r in rows]
        preds = [aligned(p, preds[0].ids) for p in preds]
        return Judged(f"mean over {len(preds)} {unit}", tuple(preds), unit)
    return Judged("test split", (stage.test,))


def _mean_auc_ci(labels: Any, draws: Sequence[Any], *, n_resamples: int, seed: int,
                 level: float, groups: Sequence[Any] | None = None) -> tuple[float, float]:
    """Percentile CI of the mean macro AUC over draws, resampled as :func:`paired_bootstrap_over_draws`
    resamples a difference (the same image resamples for every draw, the draws with replacement)."""
    import numpy as np

    per = np.stack([bootstrap_macro_aucs(labels, p, n_resamples=n_resamples, seed=seed, groups=groups)
                    for p in draws])
    picks = np.random.default_rng([seed, 1]).integers(0, len(draws), size=(n_resamples, len(draws)))
    values = per[picks, np.arange(n_resamples)[:, None]].mean(axis=1)
    if np.isnan(values).any():
        return math.nan, math.nan
    lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def paired_difference(a: StageResult, b: StageResult, *, n_resamples: int = 1000, seed: int = 0,
                      level: float = 0.95) -> dict[str, Any]:
    """Model a against model b on the same test images: each one's macro AUC with its 95% CI, the difference
    a - b with its paired 95% CI and a two-sided p-value, at the level :func:`judged` gives (the same for both).

    One set of predictions each (a single split, or pooled out-of-fold): the CIs from
    :func:`~mltl.evaluation.stats.paired_bootstrap` (both models on the same class-stratified resamples), p from
    DeLong's test for two classes, else from that bootstrap. Several draws each (seeds, training fractions):
    mean AUCs over the draws, the difference's CI and p from
    :func:`~mltl.evaluation.stats.paired_bootstrap_over_draws` (draws and images resampled). ``detected``: the
    CI of the difference excludes 0. Raises :class:`UserError` when the two were not tested on the same images.
    """
    ja, jb = judged(a), judged(b)
    if len(ja.draws) != len(jb.draws) or ja.level != jb.level:
        raise UserError(f"stages {a.name} and {b.name} were evaluated differently ({ja.level}; {jb.level}); "
                        f"a paired comparison needs the same protocol")
    ids = ja.draws[0].ids
    try:
        bd = [aligned(p, ids) for p in jb.draws]
    except RuntimeError:
        raise UserError(f"stages {a.name} and {b.name} were tested on different images; a paired comparison "
                        f"needs the same test images (the same domain, split settings and seed)") from None
    labels, classes = ja.draws[0].labels, ja.draws[0].classes
    groups = ja.draws[0].groups  # patient / study keys: the cluster bootstrap resamples whole cases
    pa, pb = [p.probs for p in ja.draws], [p.probs for p in bd]
    out: dict[str, Any] = {"level": ja.level, "phrase": ja.phrase, "unit": ja.unit, "n_images": len(ids),
                           "n_cases": None if groups is None else len(set(groups)), "n_draws": len(pa),
                           "n_resamples": n_resamples, "seed": seed}
    if len(pa) == 1:
        boot = paired_bootstrap(labels, pa[0], pb[0], classes=classes, n_resamples=n_resamples, seed=seed,
                                level=level, groups=groups)
        boot_b = paired_bootstrap(labels, pb[0], classes=classes, n_resamples=n_resamples, seed=seed, level=level,
                                  groups=groups)
        auc_a, auc_b = macro_auc(labels, pa[0]), macro_auc(labels, pb[0])
        ci_a, ci_b = [boot["ci_low"], boot["ci_high"]], [boot_b["ci_low"], boot_b["ci_high"]]
        diff_ci = [boot["diff_ci_low"], boot["diff_ci_high"]]
        # DeLong treats images as independent: with cases of several images, the cluster bootstrap's p
        if len(classes) == 2 and groups is None and math.isfinite(auc_a) and math.isfinite(auc_b):
            p, test, resolution = delong_test(labels, pa[0][:, 1], pb[0][:, 1])["p"], "DeLong", None
        else:
            p, test, resolution = boot["p"], "paired bootstrap of the macro-AUC difference", 2.0 / n_resamples
    else:
        d = paired_bootstrap_over_draws(labels, pa, pb, n_resamples=n_resamples, seed=seed, level=level,
                                        groups=groups)
        aucs_a, aucs_b = [macro_auc(labels, x) for x in pa], [macro_auc(labels, x) for x in pb]
        auc_a, auc_b = sum(aucs_a) / len(aucs_a), sum(aucs_b) / len(aucs_b)
        ci_a = list(_mean_auc_ci(labels, pa, n_resamples=n_resamples, seed=seed, level=level, groups=groups))
        ci_b = list(_mean_auc_ci(labels, pb, n_resamples=n_resamples, seed=seed, level=level, groups=groups))
        diff_ci = [d["diff_ci_low"], d["diff_ci_high"]]
        p, test, resolution = d["p"], "paired bootstrap over draws and test images", 2.0 / n_resamples
        out.update({"auc_values_a": aucs_a, "auc_values_b": aucs_b, "diff": d["diff"]})
    lo, hi = diff_ci
    out.setdefault("diff", auc_a - auc_b)
    out.update({"auc_a": auc_a, "auc_ci95_a": ci_a, "auc_b": auc_b, "auc_ci95_b": ci_b,
                "diff_ci95": diff_ci, "p": p, "p_resolution": resolution, "test": test,
                "detected": bool(math.isfinite(lo) and math.isfinite(hi) and (lo > 0 or hi < 0))})
    return out


def verdict(d: Mapping[str, Any], a: str, b: str) -> str:
    """One plain sentence on :func:`paired_difference`'s result ``d``: "A reaches an AUC 0.051 higher than B
    (95% CI -0.020 to +0.120): no clear difference on these 120 images (...)". A difference counts as clear
    when its 95% CI excludes 0."""
    diff, (lo, hi) = d["diff"], d["diff_ci95"]
    on = (f"these {d['n_images']} test images" + (f" of {d['n_cases']} cases" if d.get("n_cases") else "")
          + (f" and {d['n_draws']} {d['unit']}" if d["n_draws"] > 1 else ""))
    subject = a[:1].upper() + a[1:]
    if not (math.isfinite(diff) and math.isfinite(lo) and math.isfinite(hi)):
        return f"{subject} and {b} cannot be compared on {on}: an AUC is undefined (a class is missing)."
    ci = f"95% CI {lo:+.3f} to {hi:+.3f}"
    how = "the same AUC as" if diff == 0 else f"an AUC {abs(diff):.3f} {'higher' if diff > 0 else 'lower'} than"
    if d["detected"]:
        return (f"{subject} reaches {how} {b} ({ci}): a clear difference on {on} (the CI excludes 0; the CI "
                f"also says how large it may be).")
    return (f"{subject} reaches {how} {b} ({ci}): no clear difference on {on} (the CI includes 0, so these "
            f"data fit no difference as well as a difference either way).")


__all__ = ["ChainScores", "FractionScores", "Judged", "aligned", "judged", "paired_difference", "verdict"]
