"""Did the intermediate stage help? The same target under three chains, side by side.

From a chain config (at least two stages), ``mltl compare`` derives and runs:

- ``scratch``: the last stage alone, from a freshly initialised copy of the first stage's backbone
  (nothing frozen; :func:`mltl.config.scratch_stage`, which ``[run] baseline = "scratch"`` uses too); where
  the first stage sweeps backbones, the one it selected (the single-stage chain runs first to find it), so
  scratch and the chains have the same network and differ only in where its weights start;
- ``single-stage``: the first stage, then the last stage started from it;
- ``multi-stage``: the chain as written (skipped when it has only two stages: it is the single-stage one).

The last stage keeps its domain, split, seed, training settings and head in all three, so every chain is
tested on the same test images. A stage the chains share (the first stage of single- and multi-stage) is
trained once: a later chain copies it from an earlier chain of the comparison (``mltl.run(reuse=...)``).

The table gives each chain's test macro AUC with a 95% CI (class-stratified bootstrap; whole cases resampled
when the domain has patient / study groups), accuracy, and its difference from the reference (the full chain)
with a paired 95% CI and p, and one plain sentence per chain says whether the difference is clear (its CI
excludes 0): :func:`paired_difference` and :func:`verdict`, which the run report's first screen uses too.
Every target protocol is judged at one level, named in the table: a single split on its test images (p:
DeLong's test for a binary target without groups, else the paired bootstrap); a k-fold target (the default
for a small last stage) on its pooled out-of-fold predictions, every image once; repeated seeds as the mean
over the seeds, paired seed by seed (:func:`mltl.evaluation.stats.paired_bootstrap_over_draws`).

A target repeated over training fractions (``split.protocol = "fractions"``, Samala et al.'s protocol) is
also judged at every fraction (:func:`fraction_comparison`): each chain's test AUC over its draws (mean +/-
SD and every value), and the paired difference of each chain from the reference with a 95% CI and a
p-value from :func:`mltl.evaluation.stats.paired_bootstrap_over_draws` (draws and test images resampled;
draw k of a fraction trained on the same images in every chain, the plan deriving them from the split seed,
the fraction and the draw, never from the chain), and a learning-curve figure with every chain.
"""

from __future__ import annotations

import copy
import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from ..config import WEIGHT_OPTIONS, Config, effective_head, load_config, parse_config, scratch_stage
from ..errors import UserError
from ..evaluation import report
from ..evaluation.metrics import classification_metrics
from ..evaluation.report import Block, Figure, Heading, Para, Table, render_markdown
from ..evaluation.difference import ChainScores, FractionScores, Judged, aligned, judged, paired_difference, verdict
from ..evaluation.results import Predictions, StageResult
from ..evaluation.stats import (
    macro_auc,
    paired_bootstrap,
    paired_bootstrap_over_draws,
)
from ..plugins import hooks
from .rundir import (RunFiles, StageFiles, choose_run_dir, read_predictions, served, write_json_atomic,
                     write_text_atomic)

if TYPE_CHECKING:
    from .chain import RunResult


MAX_RESAMPLES = 100_000  # bootstrap resamples: each is a row of test-image indices held in memory


@attrs.frozen(eq=False)
class Comparison:
    """What :func:`compare` wrote (``out``, with ``comparison.md``) and its table, one row per chain;
    ``fractions``: for a target repeated over training fractions, the per-fraction comparison
    (:func:`fraction_comparison`), else empty."""

    out: Path
    rows: tuple[dict[str, Any], ...]
    fractions: tuple[dict[str, Any], ...] = ()


def chains(config: Config) -> dict[str, dict[str, Any]]:
    """The raw configs of the chains to compare, by name."""
    raw = config.raw
    stages = raw["stages"]
    if len(stages) < 2:
        raise UserError(f"{config.source}: mltl compare needs a chain of at least two stages")
    first, last = stages[0], stages[-1]
    if "backbone" not in first:
        raise UserError(f"{config.source}: stages[0] needs a backbone for mltl compare")
    head = effective_head(stages, len(stages) - 1)
    out: dict[str, dict[str, Any]] = {}
    out["scratch"] = {**copy.deepcopy(raw), "stages": [scratch_stage(stages)]}

    single_target = {k: copy.deepcopy(v) for k, v in last.items() if k != "head"}
    single_target["init"] = first["name"]
    if head is not None:
        single_target["head"] = head
    out["single-stage"] = {**copy.deepcopy(raw), "stages": [copy.deepcopy(first), single_target]}
    if len(stages) > 2:
        out["multi-stage"] = copy.deepcopy(raw)
    for name, r in out.items():
        # [run] baseline is what the scratch chain is: not trained again inside every chain
        r["run"] = {k: v for k, v in r["run"].items() if k not in ("out", "baseline")}
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

    if isinstance(n_resamples, bool) or not isinstance(n_resamples, int) or not 1 <= n_resamples <= MAX_RESAMPLES:
        raise UserError(f"--resamples must be a whole number from 1 to {MAX_RESAMPLES:,}, got {n_resamples!r}")
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
    # with resume, each chain continues its own run directory (finished stages reused, as mltl run --resume);
    # an upstream stage the chains share (single- and multi-stage's first stage) is trained once: a later chain
    # copies it from an earlier chain of this comparison (same data, settings and upstream stages, see mltl.run)
    # a first stage that sweeps backbones: the single-stage chain runs first, and scratch trains the backbone it
    # selected (the same network as the chains' targets, randomly initialised)
    order = list(derived)
    first = config.raw["stages"][0]
    swept = isinstance(first.get("backbone"), dict) and "sweep" in first["backbone"]
    if swept:
        order.remove("scratch")
        order.insert(order.index("single-stage") + 1, "scratch")
    results: dict[str, RunResult] = {}
    for name in order:
        cfg = derived[name]
        if name == "scratch" and swept:
            raw = copy.deepcopy(cfg.raw)
            raw["stages"][0]["backbone"] = selected_backbone(out_dir / "single-stage", first["name"])
            cfg = parse_config(raw, cfg.source)
        here = [out_dir / done for done in results]
        results[name] = run(cfg, out=out_dir / name, device=device,
                            resume=resume and RunFiles(out_dir / name).config.is_file(), reuse=earlier[name] + here)
    results = {name: results[name] for name in derived}  # the table's order
    return write_comparison(out_dir, results, n_resamples=n_resamples, seed=config.run.seed)


def selected_backbone(run_dir: Path, stage: str) -> dict[str, Any]:
    """The backbone table of the network that ``stage`` of the run in ``run_dir`` handed on (its served
    model's ``model.json``), without the options that load weights: what a scratch stage trains."""
    import json

    spec = json.loads(served(RunFiles(run_dir).stage(stage)).model_json.read_text())["spec"]
    return {"name": spec["backbone"], **{k: v for k, v in spec["options"].items() if k not in WEIGHT_OPTIONS}}


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
    ref_target = results[reference].stages[-1]
    ref = _evaluated(ref_target)
    rows, scored = [], []
    for name, result in results.items():
        target = result.stages[-1]
        test = _evaluated(target)
        if test.ids != ref.ids:
            raise RuntimeError("the chains were tested on different images; this is a bug in mltl compare")
        scores = classification_metrics(test.labels, test.probs, test.classes)
        boot = paired_bootstrap(test.labels, test.probs, classes=test.classes, n_resamples=n_resamples, seed=seed,
                                groups=test.groups)
        row: dict[str, Any] = {
            "chain": name,
            "stages": [s.name for s in result.stages],
            "train_images": [s.metrics["n_images"]["train"] for s in result.stages],
            "classes": [len(s.classes) for s in result.stages],
            "auc_macro": scores["auc_macro"], "auc_ci95": [boot["ci_low"], boot["ci_high"]],
            "accuracy": scores["accuracy"],
            "n_test": len(test), "evaluated_on": test.split,
            "auc_level": _auc_level(target, test),
            "repeats": _repeats(target),
            "train_seconds": sum(_train_seconds(s) for s in result.stages),
            "run_dir": str(result.run_dir),
        }
        if name != reference:
            d = paired_difference(target, ref_target, n_resamples=n_resamples, seed=seed)
            row["p_vs_" + reference] = d["p"]
            row["p_resolution"] = d["p_resolution"]
            row["test"] = d["test"]
            row["diff_vs_reference"] = {k: d[k] for k in ("level", "n_images", "n_draws", "diff", "diff_ci95",
                                                          "detected")}
            row["sentence"] = verdict(d, name, reference)
        rows.append(row)
        scored.append(ChainScores(name=name, predictions=test, auc_ci95=(boot["ci_low"], boot["ci_high"])))
    fractions = None
    if all(_is_fractions(result.stages[-1]) for result in results.values()):
        fractions = fraction_comparison({name: result.stages[-1] for name, result in results.items()}, reference,
                                        n_resamples=n_resamples, seed=seed)
        by_chain = {c: tuple(FractionScores(fraction=f["fraction"], n_train=f["chains"][i]["n_train"],
                                            aucs=tuple(math.nan if v is None else v
                                                       for v in f["chains"][i]["auc_values"]))
                             for f in fractions)
                    for i, c in enumerate(results)}
        scored = [attrs.evolve(c, fractions=by_chain[c.name]) for c in scored]
    figures = [f for answer in hooks().comparison_figures(scored, out_dir)
               for f in answer or ()]
    names = [f.path.relative_to(out_dir).as_posix() if f.path.is_relative_to(out_dir) else str(f.path)
             for f in figures]
    payload: dict[str, Any] = {"reference": reference, "rows": rows, "figure": names[0] if names else None,
                               "figures": names, "n_resamples": n_resamples, "seed": seed}
    if fractions is not None:
        payload["fractions"] = fractions
        payload["fractions_method"] = FRACTIONS_METHOD
    write_json_atomic(out_dir / "comparison.json", payload)
    write_text_atomic(out_dir / "comparison.md", render(rows, reference, figures, out_dir, fractions))
    write_text_atomic(out_dir / "comparison.html", render_html(rows, reference, figures, fractions))
    return Comparison(out=out_dir, rows=tuple(rows), fractions=tuple(fractions or ()))


FRACTIONS_METHOD = (
    "Per training fraction, each chain's test macro AUC is computed from every draw's predictions.csv "
    "(repeats/<label>/); mean and sample SD (n - 1) over the draws. Draw k of a fraction trained on the same "
    "images in every chain, and every draw is tested on the same test images, so the differences are paired. "
    "The difference of a chain from the reference is the mean over draws of (chain AUC - reference AUC) for "
    "the same draw; its 95% CI and two-sided p-value come from a bootstrap (mltl.evaluation.stats."
    "paired_bootstrap_over_draws) that resamples the draws with replacement and the test images (class-"
    "stratified; whole patients where the domain has patient groups; the same resample for every draw and "
    "every chain) and takes twice the smaller share "
    "of resampled mean differences on either side of 0. A difference is called detected when the CI "
    "excludes 0. With few draws (e.g. 3) the draw resampling is coarse: read every draw's value too.")


def _is_fractions(stage: StageResult) -> bool:
    return (stage.metrics.get("protocol") or {}).get("name") == "fractions"


def _train_ids(path: Path) -> frozenset[str] | None:
    """The ids of the training split of a ``splits.csv`` (None when the file is missing)."""
    try:
        with open(path, newline="") as f:
            return frozenset(r["id"] for r in csv.DictReader(f) if r["split"] == "train")
    except OSError:
        return None


def fraction_comparison(targets: Mapping[str, StageResult], reference: str, *, n_resamples: int = 1000,
                        seed: int = 0, level: float = 0.95) -> list[dict[str, Any]]:
    """Every chain's fractions target judged at each training fraction (see :data:`FRACTIONS_METHOD`).

    ``targets``: each chain's target stage (repeated over the same fractions and draws), by chain name, in
    table order. Each draw's test predictions are read from ``repeats/<label>/predictions.csv`` (the labels
    from the stage's ``repeats.json``). Returns one dict per fraction, ascending: ``fraction``, ``n_draws``,
    ``same_training_images`` (every chain's draw k trained on the same ids, from each draw's
    ``splits.csv``), ``detected`` (chains whose CI excludes 0), ``sentence``, and ``chains``: per chain
    ``chain``, ``n_train``, ``auc_mean``, ``auc_sd``, ``auc_values`` (per draw), ``draws`` (labels) and, but
    for the reference, ``diff_vs_reference`` (``mean``, ``per_draw``, ``ci95``, ``p``, ``detected``).
    """
    import json

    draws: dict[str, dict[float, list[dict[str, Any]]]] = {}
    for name, stage in targets.items():
        files = StageFiles(stage.stage_dir)
        try:
            rows = json.loads(files.repeats_json.read_text())["rows"]
        except (OSError, ValueError, KeyError) as exc:
            raise UserError(f"{files.repeats_json}: cannot read the repeats of chain {name!r} ({exc}); "
                            f"re-run the comparison with --resume") from None
        by_fraction: dict[float, list[dict[str, Any]]] = {}
        for r in sorted((r for r in rows if r.get("fraction") is not None), key=lambda r: (r["fraction"], r["draw"])):
            by_fraction.setdefault(float(r["fraction"]), []).append(r)
        draws[name] = by_fraction
    ref_fracs = draws[reference]
    for name, by_fraction in draws.items():
        if {f: [r["draw"] for r in rs] for f, rs in by_fraction.items()} != \
                {f: [r["draw"] for r in rs] for f, rs in ref_fracs.items()}:
            raise UserError(f"chain {name!r} was repeated over other fractions or draws than {reference!r}; "
                            f"the chains of a comparison share the target's split settings (re-run mltl compare)")
    classes = tuple(targets[reference].classes)
    out = []
    for fraction, ref_rows in sorted(ref_fracs.items()):
        preds: dict[str, list[Predictions]] = {}
        train_ids: dict[str, list[frozenset[str] | None]] = {}
        ids: tuple[str, ...] | None = None
        for name, stage in targets.items():
            files = StageFiles(stage.stage_dir)
            preds[name], train_ids[name] = [], []
            for r in draws[name][fraction]:
                rep = files.repeat(r["label"])
                pred = read_predictions(rep.predictions, "test", classes)
                ids = ids if ids is not None else pred.ids
                preds[name].append(aligned(pred, ids))
                train_ids[name].append(_train_ids(rep.splits))
        same = all(train_ids[name][k] is not None and train_ids[name][k] == train_ids[reference][k]
                   for name in targets for k in range(len(ref_rows)))
        labels = preds[reference][0].labels
        groups = preds[reference][0].groups  # the first draw's, unaligned: the others share its ids
        entries = []
        for name in targets:
            aucs = [macro_auc(p.labels, p.probs) for p in preds[name]]
            finite = [a for a in aucs if math.isfinite(a)]
            n_train = [r.get("n_train") for r in draws[name][fraction] if r.get("n_train") is not None]
            entry: dict[str, Any] = {
                "chain": name, "draws": [r["label"] for r in draws[name][fraction]],
                "n_train": float(sum(n_train) / len(n_train)) if n_train else None,
                "auc_values": [a if math.isfinite(a) else None for a in aucs],
                "auc_mean": sum(finite) / len(finite) if finite else None,
                "auc_sd": _sample_sd(finite),
            }
            if name != reference:
                d = paired_bootstrap_over_draws(labels, [p.probs for p in preds[name]],
                                                [p.probs for p in preds[reference]],
                                                n_resamples=n_resamples, seed=seed, level=level, groups=groups)
                lo, hi = d["diff_ci_low"], d["diff_ci_high"]
                detected = bool(math.isfinite(lo) and math.isfinite(hi) and (lo > 0 or hi < 0))
                entry["diff_vs_reference"] = {
                    "mean": d["diff"], "per_draw": d["diffs"], "ci95": [lo, hi], "p": d["p"],
                    "p_resolution": 2.0 / n_resamples, "detected": detected}
            entries.append(entry)
        item = {"fraction": fraction, "n_draws": len(ref_rows), "same_training_images": same,
                "chains": entries,
                "detected": [e["chain"] for e in entries if (e.get("diff_vs_reference") or {}).get("detected")]}
        item["sentence"] = _fraction_sentence(item, reference)
        out.append(item)
    return out


def _sample_sd(values: Sequence[float]) -> float | None:
    if len(values) < 2:
        return None
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _num(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _fraction_label(item: Mapping[str, Any]) -> str:
    ref_n = next((e["n_train"] for e in item["chains"] if e.get("n_train") is not None), None)
    images = "" if ref_n is None else f" (~{ref_n:.0f} training images)"
    return f"{item['fraction'] * 100:g}%{images}"


def _fraction_sentence(item: Mapping[str, Any], reference: str) -> str:
    """One plain sentence: at this fraction, is a difference from the reference detected, and for whom."""
    parts = []
    for e in item["chains"]:
        d = e.get("diff_vs_reference")
        if d is None:
            continue
        lo, hi = d["ci95"]
        ci = f"95% CI {_num(lo)} to {_num(hi)}, p {_p_text(d['p'], d['p_resolution'])}"
        if d["detected"]:
            direction = "higher" if d["mean"] > 0 else "lower"
            parts.append(f"{e['chain']} is {direction} than {reference} by {abs(d['mean']):.3f} AUC ({ci}): "
                         f"a difference is detected")
        else:
            parts.append(f"{e['chain']} differs from {reference} by {d['mean']:+.3f} AUC ({ci}): no difference "
                         f"is detected (the CI includes 0)")
    n = item["n_draws"]
    where = f"At training fraction {_fraction_label(item)}, over {n} draw{'s' if n != 1 else ''}: "
    caveat = "" if item["same_training_images"] else (
        " Warning: the chains' draws did not all train on the same images (see each draw's splits.csv), so "
        "these differences are not fully paired.")
    return where + "; ".join(parts) + "." + caveat


def _evaluated(stage: StageResult) -> Predictions:
    """The predictions a chain's AUC column is computed on: the pooled out-of-fold test predictions of a
    k-fold target (every image once), else the target's test predictions (a repeated target: its
    representative repeat's)."""
    oof = StageFiles(stage.stage_dir).oof_predictions
    if (stage.metrics.get("protocol") or {}).get("pooled") and oof.is_file():
        return attrs.evolve(read_predictions(oof, "test", stage.classes), split="out-of-fold test")
    return stage.test


def _auc_level(stage: StageResult, test: Predictions) -> str:
    """The level of the AUC column, for its header: "pooled out-of-fold", "test split", or the representative
    repeat of a repeated target ("representative repeat seed-1")."""
    if test.split == "out-of-fold test":
        return "pooled out-of-fold"
    proto = stage.metrics.get("protocol")
    return f"representative repeat {proto['representative']}" if proto else "test split"


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


def _blocks(rows: list[dict[str, Any]], reference: str, figures: Sequence[Figure],
            fractions: Sequence[Mapping[str, Any]] | None = None) -> list[Block]:

    table = []
    for r in rows:
        p = r.get("p_vs_" + reference)
        lo, hi = r["auc_ci95"]
        rep = r.get("repeats")
        unit = {"kfold": "folds", "holdout": "seeds", "fractions": "draws at the largest fraction"}.get(
            rep["protocol"], rep["protocol"]) if rep else ""
        spread = "-" if not rep else (f"{rep['auc_mean']:.3f} +/- {rep['auc_sd']:.3f} ({rep['n']} {unit})"
                                      if rep["auc_sd"] is not None else f"{rep['auc_mean']:.3f}")
        d = r.get("diff_vs_reference")
        diff = "reference" if r["chain"] == reference else "-" if not d else (
            f"{d['diff']:+.3f} ({_num(d['diff_ci95'][0])} to {_num(d['diff_ci95'][1])})")
        table.append((r["chain"], " -> ".join(r["stages"]), " / ".join(map(str, r["train_images"])),
                      " / ".join(map(str, r["classes"])), f"{r['auc_macro']:.3f} ({lo:.3f}-{hi:.3f})", spread,
                      f"{r['accuracy']:.3f}", str(r["n_test"]), diff, _p_text(p, r.get("p_resolution")),
                      f"{r['train_seconds']:.0f}"))
    tests = {r["test"] for r in rows if "test" in r}
    levels = {r.get("auc_level") or _AUC_LEVEL.get(r.get("evaluated_on", "test"), "test split") for r in rows}
    auc_level = levels.pop() if len(levels) == 1 else "see each chain's report"
    diff_levels = {r["diff_vs_reference"]["level"] for r in rows if r.get("diff_vs_reference")}
    diff_level = diff_levels.pop() if len(diff_levels) == 1 else auc_level
    blocks: list[Block] = [
        Heading(1, f"Chain comparison (same target test images; against {reference})"),
        Table(("chain", "stages", "train images per stage", "classes", f"test AUC (95% CI), {auc_level}",
               "test AUC mean +/- SD over repeats", f"accuracy, {auc_level}", "n test",
               f"AUC difference vs {reference} (95% CI), {diff_level}", f"p vs {reference}", "training time (s)"),
              tuple(table)),
    ]
    sentences = [r["sentence"] for r in rows if r.get("sentence")]
    if sentences:
        blocks.append(Para("**Verdict.** " + " ".join(sentences)))
    blocks.append(Para(
        f"How to read it: AUC and accuracy are computed on the {auc_level} predictions of each chain's target "
        "(for a k-fold target the pooled out-of-fold predictions: every image once, each predicted by the fold model "
        "that did not train on it). The difference is each chain's AUC minus the reference's on the same test "
        f"images ({diff_level}), with a paired 95% CI (both chains scored on the same bootstrap resamples"
        + ("; for seeds or training draws, the draws are resampled too" if "mean over" in diff_level else "")
        + "); a difference is called clear when its CI excludes 0. "
        f"Test of the AUC difference: {', '.join(sorted(tests)) or '-'}. Each chain selects its variants on "
        "validation data only; the test images are the same for every chain. Training images per stage are those "
        "of the representative repeat; training time sums every repeat. Each chain's own run directory holds its "
        "full report (`report.html`)."))
    if fractions:
        blocks[-1] = Para(blocks[-1].text + " The target is repeated over training fractions: the AUC columns "
                          "show its representative draw at the largest fraction, the difference its mean over the "
                          "draws there; the sections below judge every fraction over all its draws.")
        blocks += _fraction_blocks(fractions, reference)
    return blocks + list(figures)


_AUC_LEVEL = {"out-of-fold test": "pooled out-of-fold", "test": "test split"}


def _fraction_blocks(fractions: Sequence[Mapping[str, Any]], reference: str) -> list[Block]:
    blocks: list[Block] = [Heading(2, f"By training fraction (every draw; paired differences against {reference})")]
    for item in fractions:
        table = []
        for e in item["chains"]:
            d = e.get("diff_vs_reference")
            spread = _num(e["auc_mean"]) + ("" if e["auc_sd"] is None else f" +/- {_num(e['auc_sd'])}")
            table.append((e["chain"], "-" if e["n_train"] is None else f"{e['n_train']:.0f}", spread,
                          ", ".join(_num(v) for v in e["auc_values"]),
                          "reference" if d is None else
                          f"{d['mean']:+.3f} ({_num(d['ci95'][0])} to {_num(d['ci95'][1])})",
                          "-" if d is None else _p_text(d["p"], d["p_resolution"])))
        blocks += [
            Heading(3, f"Training fraction {_fraction_label(item)}"),
            Table(("chain", "training images (mean)", "test AUC mean +/- SD", "every draw",
                   f"difference vs {reference} (95% CI)", "p"), tuple(table)),
            Para(item["sentence"]),
        ]
    blocks.append(Para("How: " + FRACTIONS_METHOD))
    return blocks


def render(rows: list[dict[str, Any]], reference: str, figures: Sequence[Figure] = (),
           out_dir: Path = Path("."), fractions: Sequence[Mapping[str, Any]] | None = None) -> str:
    """``comparison.md``: the table of ``rows``, the per-fraction tables of a fractions target
    (:func:`fraction_comparison`), then ``figures`` (linked relative to ``out_dir``); :func:`render_html`
    gives the same as a self-contained ``comparison.html``."""
    return render_markdown(_blocks(rows, reference, figures, fractions), out_dir)


def render_html(rows: list[dict[str, Any]], reference: str, figures: Sequence[Figure] = (),
                fractions: Sequence[Mapping[str, Any]] | None = None) -> str:
    """``comparison.html``: :func:`render`'s content with the figures embedded."""
    return report.render_html(_blocks(rows, reference, figures, fractions), "mltl chain comparison")


__all__ = ["FRACTIONS_METHOD", "ChainScores", "Comparison", "FractionScores", "Judged", "chains", "compare",
           "fraction_comparison", "judged", "paired_difference", "render", "render_html", "verdict",
           "write_comparison"]
