"""The tables of study 4 (docs/results.md) from the runs of examples/studies/covid_study.py.

    python examples/studies/covid_summary.py runs/study-covid [--resamples 2000]

Reads every chain's target predictions (each repeat's ``predictions.csv``; for k-fold the pooled
``oof_predictions.csv``), all tested on the same images, and writes OUT/summary.md and OUT/summary.json:

- image level: macro AUC (for two classes the AUC of ``p_covid``) over the test slices;
- patient level: each patient's slice probabilities averaged (as the ``evaluation`` reporter's default
  ``case_aggregate = "mean"``), the AUC over patients;
- CIs and p-values over patients: at image level the cluster bootstrap (whole patients drawn, class-stratified
  by patient; ``mltl.evaluation.stats`` with ``groups=``), at patient level the bootstrap of patients;
- repeated trainings (seeds, draws): mean +/- SD over them with every value, and the paired difference from
  scratch as ``paired_bootstrap_over_draws`` (draws and patients resampled; draw k of each chain trained on
  the same images); the seed ensemble (probabilities averaged over the repeats) with its CI;
- k-fold: the pooled out-of-fold predictions (every slice once), ``paired_bootstrap`` over patients.

It also rebuilds ``mltl compare``'s comparison of the fractions protocol (comparison.md and the figure
learning_curve_chains.png) from the three separate runs, as OUT/compare-fractions: mltl compare itself
cannot make this comparison, because its scratch chain copies the first stage's backbone options, ImageNet
weights included.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

import numpy as np
from mltl.evaluation.stats import bootstrap_auc_ci, macro_auc, paired_bootstrap, paired_bootstrap_over_draws

NAMES = {
    "scratch": "scratch (random init)",
    "imagenet": "ImageNet -> COVID-CT",
    "imagenet-organa": "ImageNet -> OrganAMNIST -> COVID-CT",
    "natural-organa": "natural (scratch) -> OrganAMNIST -> COVID-CT",
    "gfe-natural-organa": "GFE-II: natural -> OrganAMNIST -> COVID-CT",
    "scratch-long": "scratch, 24 epochs (3x)",
}
CLASSES = ("non-covid", "covid")


def read(path: Path, split: str | None = "test") -> dict:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        classes = [c[2:] for c in reader.fieldnames if c.startswith("p_")]
        rows = [r for r in reader if split is None or r["split"] == split]
    rows.sort(key=lambda r: r["id"])
    return {"ids": [r["id"] for r in rows],
            "labels": np.array([classes.index(r["label"]) for r in rows]),
            "groups": [r["group"] for r in rows] if all(r["group"] for r in rows) else None,
            "probs": np.array([[float(r["p_" + c]) for c in classes] for r in rows])}


def by_patient(pred: dict) -> dict:
    """Mean probability per patient; the patient's label (all its slices share it here)."""
    keys = sorted(set(pred["groups"]))
    index = {k: i for i, k in enumerate(keys)}
    g = np.array([index[k] for k in pred["groups"]])
    probs = np.zeros((len(keys), len(CLASSES)))
    np.add.at(probs, g, pred["probs"])
    probs /= np.bincount(g, minlength=len(keys))[:, None]
    labels = np.zeros(len(keys), dtype=int)
    for k in range(len(keys)):
        labels[k] = np.bincount(pred["labels"][g == k]).argmax()
    return {"ids": keys, "labels": labels, "probs": probs, "groups": None}


def stats_of(preds: list[dict], n: int) -> dict:
    """Mean +/- SD over repeats, image and patient level, and the ensemble's AUC with CIs over patients."""
    img = [macro_auc(p["labels"], p["probs"]) for p in preds]
    pat = [macro_auc(bp["labels"], bp["probs"]) for bp in map(by_patient, preds)]
    ens = {**preds[0], "probs": np.mean([p["probs"] for p in preds], axis=0)}
    ens_p = by_patient(ens)
    return {
        "image_auc": img, "patient_auc": pat,
        "image_mean": float(np.mean(img)), "image_sd": float(np.std(img, ddof=1)) if len(img) > 1 else None,
        "patient_mean": float(np.mean(pat)), "patient_sd": float(np.std(pat, ddof=1)) if len(pat) > 1 else None,
        "ensemble_image_auc": macro_auc(ens["labels"], ens["probs"]),
        "ensemble_image_ci": bootstrap_auc_ci(ens["labels"], ens["probs"], n_resamples=n, groups=ens["groups"]),
        "ensemble_patient_auc": macro_auc(ens_p["labels"], ens_p["probs"]),
        "ensemble_patient_ci": bootstrap_auc_ci(ens_p["labels"], ens_p["probs"], n_resamples=n),
        "n_images": len(preds[0]["ids"]), "n_patients": len(ens_p["ids"]),
        "n_patients_by_class": np.bincount(ens_p["labels"]).tolist(),
    }


def diff_of(a: list[dict], b: list[dict], n: int) -> dict:
    """a - b, paired over draws (draw k with draw k) and over patients; image and patient level."""
    assert all(x["ids"] == a[0]["ids"] for x in a + b), "chains tested on different images"
    img = paired_bootstrap_over_draws(a[0]["labels"], [x["probs"] for x in a], [x["probs"] for x in b],
                                      n_resamples=n, groups=a[0]["groups"])
    pa, pb = [by_patient(x) for x in a], [by_patient(x) for x in b]
    pat = paired_bootstrap_over_draws(pa[0]["labels"], [x["probs"] for x in pa], [x["probs"] for x in pb],
                                      n_resamples=n)
    return {"image": {k: img[k] for k in ("diff", "diffs", "diff_ci_low", "diff_ci_high", "p", "unit", "n_units")},
            "patient": {k: pat[k] for k in ("diff", "diffs", "diff_ci_low", "diff_ci_high", "p", "unit", "n_units")}}


def pooled_diff(a: dict, b: dict, n: int) -> dict:
    img = paired_bootstrap(a["labels"], a["probs"], b["probs"], classes=CLASSES, n_resamples=n, groups=a["groups"])
    pa, pb = by_patient(a), by_patient(b)
    pat = paired_bootstrap(pa["labels"], pa["probs"], pb["probs"], classes=CLASSES, n_resamples=n)
    return {"image": {"diff": macro_auc(a["labels"], a["probs"]) - macro_auc(b["labels"], b["probs"]),
                      **{k: img[k] for k in ("diff_ci_low", "diff_ci_high", "p", "unit", "n_units")}},
            "patient": {"diff": macro_auc(pa["labels"], pa["probs"]) - macro_auc(pb["labels"], pb["probs"]),
                        **{k: pat[k] for k in ("diff_ci_low", "diff_ci_high", "p", "unit", "n_units")}}}


def repeats(stage: Path) -> list[dict]:
    return json.loads((stage / "repeats.json").read_text())["rows"]


def seconds(run_dir: Path) -> tuple[float, float | None]:
    """(training seconds of the stages this run trained, summed over repeats; the run's wall seconds from
    state.json). A target run's upstream stages were copied (--reuse): only its target is counted."""
    total = 0.0
    stages = ["target"] if (run_dir / "target").is_dir() else [p.name for p in run_dir.iterdir() if p.is_dir()]
    for name in stages:
        m = run_dir / name / "metrics.json"
        if not m.is_file():
            continue
        reps = list((run_dir / name / "repeats").glob("*/metrics.json"))
        if reps:
            total += sum(float(json.loads(r.read_text()).get("train_seconds") or 0.0) for r in reps)
        else:
            total += float(json.loads(m.read_text()).get("train_seconds") or 0.0)
    state = run_dir / "state.json"
    wall = json.loads(state.read_text()).get("seconds") if state.is_file() else None
    return total, wall


def f3(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def ci(c) -> str:
    return f"({f3(c[0])}-{f3(c[1])})"


def p_text(p: float, n: int) -> str:
    return f"< {2 / n:.4f}".rstrip("0") if p == 0 else f"{p:.3f}"


def dtext(d: dict, n: int) -> str:
    return f"{d['diff']:+.3f} ({d['diff_ci_low']:+.3f} to {d['diff_ci_high']:+.3f}), p {p_text(d['p'], n)}"


def mean_sd(m: float, sd: float | None, values: list[float]) -> str:
    vals = ", ".join(f"{v:.3f}" for v in values)
    return f"{m:.3f} +/- {sd:.3f} ({vals})" if sd is not None else f"{m:.3f}"


def learning_curve(root: Path, chains: dict[str, Path], n: int) -> Path | None:
    """mltl compare's fraction comparison and figure, from three finished runs (scratch / single / multi)."""
    from mltl.running.chain import RunResult
    from mltl.running.compare import write_comparison
    from mltl.running.rundir import StageFiles, read_stage

    results = {}
    for name, run_dir in chains.items():
        stages = []
        for stage_dir in sorted(p.parent for p in run_dir.glob("*/metrics.json")):
            stages.append(read_stage(StageFiles(stage_dir), stage_dir.name, network=False)[0])
        order = ["source", "intermediate", "target"]
        stages.sort(key=lambda s: order.index(s.name) if s.name in order else 9)
        results[name] = RunResult(run_dir=run_dir, stages=tuple(stages))
    out = root / "compare-fractions"
    out.mkdir(exist_ok=True)
    write_comparison(out, results, n_resamples=n, seed=0)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("root", type=Path)
    p.add_argument("--resamples", type=int, default=2000)
    a = p.parse_args()
    root, n = a.root, a.resamples
    out: dict = {"resamples": n}
    md: list[str] = [f"# Study 4 summary ({root})", "",
                     f"Bootstrap: {n} resamples, seed 0; CIs and p-values over patients.", ""]

    # ---- (a) official split, 3 trainings per chain: fraction 1.0 draws (fractions runs) or seeds
    official: dict[str, list[dict]] = {}
    times: dict[str, float] = {}
    for chain in NAMES:
        fr, sd = root / "fractions" / chain / "target", root / "seeds" / chain / "target"
        if chain == "scratch-long":
            fr, sd = root / "none", root / "seeds-long" / "scratch" / "target"
        if (fr / "repeats.json").is_file():
            labels = [r["label"] for r in repeats(fr) if r.get("fraction") == 1.0]
            official[chain] = [read(fr / "repeats" / lab / "predictions.csv") for lab in labels]
        elif (sd / "repeats.json").is_file():
            labels = [r["label"] for r in repeats(sd)]
            official[chain] = [read(sd / "repeats" / lab / "predictions.csv") for lab in labels]
    if "scratch" in official:
        rows = []
        md += ["## (a) Official split, 3 trainings per chain", "",
               ("| chain | image AUC, mean +/- SD (values) | patient AUC, mean +/- SD (values) | ensemble image AUC (95% CI) "
               "| ensemble patient AUC (95% CI) | image AUC minus scratch (95% CI), p | patient AUC minus scratch "
               "(95% CI), p |"), "|---|---|---|---|---|---|---|"]
        for chain, preds in official.items():
            s = stats_of(preds, n)
            row = {"chain": chain, **s}
            cells = [NAMES[chain], mean_sd(s["image_mean"], s["image_sd"], s["image_auc"]),
                     mean_sd(s["patient_mean"], s["patient_sd"], s["patient_auc"]),
                     f"{s['ensemble_image_auc']:.3f} {ci(s['ensemble_image_ci'])}",
                     f"{s['ensemble_patient_auc']:.3f} {ci(s['ensemble_patient_ci'])}"]
            if chain != "scratch" and len(preds) == len(official["scratch"]):
                d = diff_of(preds, official["scratch"], n)
                row["vs_scratch"] = d
                cells += [dtext(d["image"], n), dtext(d["patient"], n)]
            else:
                cells += ["-", "-"]
            rows.append(row)
            md.append("| " + " | ".join(cells) + " |")
        s0 = stats_of(official["scratch"], n)
        md += ["", (f"Test: {s0['n_images']} slices of {s0['n_patients']} patients (non-covid, covid: "
                   f"{s0['n_patients_by_class']}).")]
        if "imagenet" in official and "imagenet-organa" in official:
            d = diff_of(official["imagenet-organa"], official["imagenet"], n)
            out["a_multi_vs_single"] = d
            md += ["", (f"ImageNet -> OrganAMNIST -> COVID-CT minus ImageNet -> COVID-CT: image {dtext(d['image'], n)}; "
                       f"patient {dtext(d['patient'], n)}.")]
        out["a"] = rows
        md.append("")

    # ---- (c) fractions
    frac_chains = [c for c in ("scratch", "imagenet", "imagenet-organa")
                   if (root / "fractions" / c / "target" / "repeats.json").is_file()]
    if "scratch" in frac_chains:
        md += ["## (c) Training fractions of the official training split (3 draws each)", "",
               ("| fraction | training slices (mean) | chain | image AUC, mean +/- SD (values) | patient AUC, mean +/- SD "
               "| image AUC minus scratch (95% CI), p | patient AUC minus scratch (95% CI), p |"),
               "|---|---|---|---|---|---|---|"]
        per: dict[str, dict[float, list[dict]]] = {}
        ntrain: dict[str, dict[float, float]] = {}
        for c in frac_chains:
            st = root / "fractions" / c / "target"
            per[c], ntrain[c] = {}, {}
            for r in repeats(st):
                per[c].setdefault(float(r["fraction"]), []).append((r["draw"], r["label"], r.get("n_train")))
            for f, items in per[c].items():
                items.sort()
                ntrain[c][f] = float(np.mean([x[2] for x in items if x[2] is not None] or [math.nan]))
                per[c][f] = [read(st / "repeats" / lab / "predictions.csv") for _, lab, _ in items]
        rows = []
        for f in sorted(per["scratch"]):
            for c in frac_chains:
                if f not in per[c]:
                    continue
                s = stats_of(per[c][f], n)
                row = {"fraction": f, "chain": c, "n_train": ntrain[c][f], **s}
                cells = [f"{f:g}", f"{ntrain[c][f]:.0f}", NAMES[c],
                         mean_sd(s["image_mean"], s["image_sd"], s["image_auc"]),
                         mean_sd(s["patient_mean"], s["patient_sd"], s["patient_auc"])]
                if c != "scratch":
                    d = diff_of(per[c][f], per["scratch"][f], n)
                    row["vs_scratch"] = d
                    cells += [dtext(d["image"], n), dtext(d["patient"], n)]
                else:
                    cells += ["-", "-"]
                if c == "imagenet-organa" and "imagenet" in per and f in per["imagenet"]:
                    row["vs_imagenet"] = diff_of(per[c][f], per["imagenet"][f], n)
                rows.append(row)
                md.append("| " + " | ".join(cells) + " |")
        md += ["", "Multi-stage minus single-stage (ImageNet -> OrganAMNIST -> COVID-CT minus ImageNet -> COVID-CT):", ""]
        for row in rows:
            if "vs_imagenet" in row:
                d = row["vs_imagenet"]
                md.append(f"- fraction {row['fraction']:g}: image {dtext(d['image'], n)}; patient {dtext(d['patient'], n)}")
        out["c"] = rows
        md.append("")
        if len(frac_chains) == 3:
            try:
                cmp_dir = learning_curve(root, {"scratch": root / "fractions" / "scratch",
                                                "single-stage": root / "fractions" / "imagenet",
                                                "multi-stage": root / "fractions" / "imagenet-organa"}, n)
                md += [(f"mltl compare's fraction comparison (scratch / single-stage = ImageNet -> COVID-CT / "
                       f"multi-stage = ImageNet -> OrganAMNIST -> COVID-CT): {cmp_dir}/comparison.md, "
                       f"{cmp_dir}/learning_curve_chains.png"), ""]
            except Exception as exc:  # noqa: BLE001  (report it, keep the tables)
                md += [f"(learning-curve comparison failed: {type(exc).__name__}: {exc})", ""]

    # ---- (b) k-fold
    kf = {c: read(root / "kfold" / c / "target" / "oof_predictions.csv", None) for c in NAMES
          if (root / "kfold" / c / "target" / "oof_predictions.csv").is_file()}
    if "scratch" in kf:
        md += ["## (b) 5 patient-grouped folds over all 746 slices (pooled out-of-fold)", "",
               ("| chain | image AUC (95% CI) | patient AUC (95% CI) | per-fold image AUC, mean +/- SD (values) "
               "| image AUC minus scratch (95% CI), p | patient AUC minus scratch (95% CI), p |"),
               "|---|---|---|---|---|---|"]
        rows = []
        for c, pred in kf.items():
            pat = by_patient(pred)
            folds = [r["auc_macro"] if "auc_macro" in r else r.get("auc") for r in repeats(root / "kfold" / c / "target")]
            folds = [float(x) for x in folds if x is not None]
            row = {"chain": c, "image_auc": macro_auc(pred["labels"], pred["probs"]),
                   "image_ci": bootstrap_auc_ci(pred["labels"], pred["probs"], n_resamples=n, groups=pred["groups"]),
                   "patient_auc": macro_auc(pat["labels"], pat["probs"]),
                   "patient_ci": bootstrap_auc_ci(pat["labels"], pat["probs"], n_resamples=n),
                   "fold_aucs": folds, "n_images": len(pred["ids"]), "n_patients": len(pat["ids"]),
                   "n_patients_by_class": np.bincount(pat["labels"]).tolist()}
            cells = [NAMES[c], f"{row['image_auc']:.3f} {ci(row['image_ci'])}",
                     f"{row['patient_auc']:.3f} {ci(row['patient_ci'])}",
                     mean_sd(float(np.mean(folds)), float(np.std(folds, ddof=1)), folds) if len(folds) > 1 else "n/a"]
            if c != "scratch":
                d = pooled_diff(pred, kf["scratch"], n)
                row["vs_scratch"] = d
                cells += [dtext(d["image"], n), dtext(d["patient"], n)]
            else:
                cells += ["-", "-"]
            rows.append(row)
            md.append("| " + " | ".join(cells) + " |")
        r0 = rows[0]
        md += ["", (f"Every slice tested once: {r0['n_images']} slices of {r0['n_patients']} patients "
                   f"(non-covid, covid: {r0['n_patients_by_class']}).")]
        if "imagenet" in kf and "imagenet-organa" in kf:
            d = pooled_diff(kf["imagenet-organa"], kf["imagenet"], n)
            out["b_multi_vs_single"] = d
            md += ["", (f"ImageNet -> OrganAMNIST -> COVID-CT minus ImageNet -> COVID-CT: image {dtext(d['image'], n)}; "
                       f"patient {dtext(d['patient'], n)}.")]
        out["b"] = rows
        md.append("")

    # ---- (d) BreastMNIST, official split, 3 seeds (no patient ids: every image its own case)
    br = {}
    for c in NAMES:
        st = root / "breast" / c / "target"
        if (st / "repeats.json").is_file():
            br[c] = [read(st / "repeats" / r["label"] / "predictions.csv", "test") for r in repeats(st)]
    if br:
        classes = json.loads((root / "breast" / next(iter(br)) / "target" / "metrics.json").read_text())["classes"]
        md += ["## (d) BreastMNIST, official split (546 / 78 / 156), 3 seeds", "",
               "| chain | test AUC, mean +/- SD (values) | seed ensemble AUC (95% CI) | minus scratch (95% CI), p |",
               "|---|---|---|---|"]
        rows = []
        for c, preds in br.items():
            img = [macro_auc(x["labels"], x["probs"]) for x in preds]
            ens = np.mean([x["probs"] for x in preds], axis=0)
            row = {"chain": c, "auc": img, "ensemble_auc": macro_auc(preds[0]["labels"], ens),
                   "ensemble_ci": bootstrap_auc_ci(preds[0]["labels"], ens, n_resamples=n)}
            cells = [NAMES[c].replace("COVID-CT", "BreastMNIST"),
                     mean_sd(float(np.mean(img)), float(np.std(img, ddof=1)), img),
                     f"{row['ensemble_auc']:.3f} {ci(row['ensemble_ci'])}"]
            if c != "scratch" and "scratch" in br:
                d = paired_bootstrap_over_draws(preds[0]["labels"], [x["probs"] for x in preds],
                                                [x["probs"] for x in br["scratch"]], n_resamples=n)
                row["vs_scratch"] = {k: d[k] for k in ("diff", "diffs", "diff_ci_low", "diff_ci_high", "p")}
                cells.append(dtext(d, n))
            else:
                cells.append("-")
            rows.append(row)
            md.append("| " + " | ".join(cells) + " |")
        md += ["", f"(classes {classes}; the AUC is that of the second class's probability)", ""]
        out["d"] = rows

    # ---- wall time of each run
    md += ["## Time per run (training seconds of the stages trained there, summed over repeats; the run wall time)", ""]
    for run_dir in sorted(root.glob("*/*/config.toml")):
        d = run_dir.parent
        train, wall = seconds(d)
        times[str(d.relative_to(root))] = {"train_seconds": train, "wall_seconds": wall}
        md.append(f"- {d.relative_to(root)}: training {train:.0f} s, run wall time "
                  f"{'n/a' if wall is None else f'{wall:.0f} s'}")
    out["train_seconds"] = times
    (root / "summary.json").write_text(json.dumps(out, indent=1, default=float))
    (root / "summary.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
