"""Study 2's summary table: every BreastMNIST configuration, chosen on validation, reported on test.

    python examples/studies/breastmnist_summary.py runs/study-breastmnist runs/study-breastmnist-l2sp \
        runs/study-breastmnist-resnet18

Reads each `mltl compare` folder given (official split, `split.seeds` repeats) and prints, per chain: the
validation AUC of the selected variant (mean over seeds), the test AUC and accuracy (mean +/- SD over
seeds), and the ensemble of the seeds (their probabilities averaged), with its bootstrap 95% CI. The
configuration to report as "best" is the one with the highest *validation* AUC; the test columns are
never used to choose.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import accuracy_score, roc_auc_score

from mltl.evaluation.stats import paired_bootstrap


def read(path: Path, split: str) -> tuple[list[str], np.ndarray, np.ndarray, list[str]]:
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == split]
    classes = [k[2:] for k in rows[0] if k.startswith("p_")]
    ids = [r["id"] for r in rows]
    y = np.array([classes.index(r["label"]) for r in rows])
    p = np.array([[float(r[f"p_{c}"]) for c in classes] for r in rows])
    return ids, y, p, classes


def chain_rows(folder: Path, n_resamples: int) -> list[dict]:
    out = []
    for chain in ("scratch", "single-stage", "multi-stage"):
        reps = sorted((folder / chain / "target" / "repeats").glob("seed-*"))
        if not reps or not all((r / "metrics.json").is_file() for r in reps):
            continue
        val_auc, test_auc, test_acc, probs = [], [], [], {"val": [], "test": []}
        for r in reps:
            m = json.loads((r / "metrics.json").read_text())
            val_auc.append(m["val"]["auc_macro"])
            test_auc.append(m["auc_macro"])
            test_acc.append(m["accuracy"])
            for split in ("val", "test"):
                ids, y, p, classes = read(r / "predictions.csv", split)
                order = np.argsort(ids)
                probs[split].append((np.asarray(ids)[order], y[order], p[order]))
        ens = {}
        for split, parts in probs.items():
            ids0, y0, _ = parts[0]
            assert all((ids == ids0).all() and (y == y0).all() for ids, y, _ in parts), "seeds saw other images"
            p = np.mean([p for _, _, p in parts], axis=0)
            ens[split] = (y0, p)
        y, p = ens["test"]
        boot = paired_bootstrap(y, p, classes=tuple(classes), n_resamples=n_resamples, seed=0)
        selected = json.loads((reps[0] / "metrics.json").read_text()).get("selected_variant")
        out.append({"config": folder.name, "chain": chain, "seeds": len(reps), "selected_seed1": selected,
                    "val_auc": val_auc, "test_auc": test_auc, "test_acc": test_acc,
                    "ens_val_auc": float(roc_auc_score(ens["val"][0], ens["val"][1][:, 1])),
                    "ens_test_auc": float(roc_auc_score(y, p[:, 1])),
                    "ens_test_ci": [boot["ci_low"], boot["ci_high"]],
                    "ens_test_acc": float(accuracy_score(y, p.argmax(1)))})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--resamples", type=int, default=1000)
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()
    rows = [r for f in args.folders for r in chain_rows(f, args.resamples)]
    sd = lambda v: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0  # noqa: E731
    print("| configuration | chain | val AUC, mean over seeds | test AUC, mean +/- SD (values) | test accuracy, mean "
          "| ensemble of the seeds: val AUC | ensemble: test AUC (95% CI) | ensemble: test accuracy |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['chain']} | {np.mean(r['val_auc']):.3f} | {np.mean(r['test_auc']):.3f} +/- "
              f"{sd(r['test_auc']):.3f} ({', '.join(f'{v:.3f}' for v in r['test_auc'])}) | "
              f"{np.mean(r['test_acc']):.3f} | {r['ens_val_auc']:.3f} | {r['ens_test_auc']:.3f} "
              f"({r['ens_test_ci'][0]:.3f}-{r['ens_test_ci'][1]:.3f}) | {r['ens_test_acc']:.3f} |")
    best = max(rows, key=lambda r: np.mean(r["val_auc"]))
    best_ens = max(rows, key=lambda r: r["ens_val_auc"])
    print(f"\nbest single-model configuration by validation AUC: {best['config']} / {best['chain']} "
          f"(val {np.mean(best['val_auc']):.3f}): test AUC {np.mean(best['test_auc']):.3f} +/- {sd(best['test_auc']):.3f}")
    print(f"best seed ensemble by validation AUC: {best_ens['config']} / {best_ens['chain']} "
          f"(val {best_ens['ens_val_auc']:.3f}): test AUC {best_ens['ens_test_auc']:.3f} "
          f"({best_ens['ens_test_ci'][0]:.3f}-{best_ens['ens_test_ci'][1]:.3f})")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
