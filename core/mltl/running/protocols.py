"""Evaluation protocols of a stage: one held-out split, k-fold cross-validation, or training fractions.

A rare target of a hundred images gives one test split of a few dozen: its AUC moves by 0.05 or more with
the split alone. ``split.protocol`` makes a stage repeat itself and report the spread:

- ``holdout``: one stratified, patient-grouped train/val/test split (``split.seeds`` > 1 retrains on it
  with different seeds);
- ``kfold``: stratified, patient-grouped k folds; fold k is the test split of repeat k, a validation split
  is dealt from the other folds, so every image is tested exactly once by a model that never saw it;
- ``fractions``: Samala et al.'s protocol: the holdout split, training on a fraction of its training split
  (drawn per class, whole patients), ``draws`` draws per fraction, each draw also a new training seed;
- ``auto`` (the default): ``kfold`` for the chain's last stage when its domain has fewer than
  :data:`AUTO_KFOLD_BELOW` images and no predefined split, ``holdout`` otherwise.

Each repeat is a complete stage under ``STAGE/repeats/<label>/`` (its own variant sweep and selection on
its own validation split, test predictions, metrics). The stage directory holds the representative repeat's
files (the first fold, the first draw at the largest fraction, the first seed; its model is the one a later
stage starts from and ``mltl predict`` serves), ``repeats.json`` with every repeat's numbers, and in
``metrics.json`` a ``protocol`` section: mean, sample SD (n - 1) and every value; for k-fold also the AUC of
the pooled out-of-fold predictions (``oof_predictions.csv``).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from ..config import SplitConfig
from ..data.domain import SPLITS, Domain
from ..errors import ConfigError, UserError
from ..evaluation.metrics import classification_metrics
from ..evaluation.results import Predictions
from .rundir import StageFiles, predictions_csv

AUTO_KFOLD_BELOW = 2000


@attrs.frozen
class Repeat:
    """One training of a repeated stage."""

    label: str  # directory name under repeats/: "fold-1", "fraction-0.25-draw-2", "seed-1"
    fold: int | None = None  # 0-based test fold
    fraction: float | None = None
    fraction_index: int = 0
    draw: int = 0  # 0-based draw (fractions) or seed index (holdout)
    seed_offset: int = 0  # added to the stage's training seed

    def row(self) -> dict[str, Any]:
        return {"label": self.label, "fold": None if self.fold is None else self.fold + 1,
                "fraction": self.fraction, "draw": self.draw + 1}


def resolve_protocol(split: SplitConfig, *, last: bool, domain: Domain, key: str, source: str) -> str:
    protocol = split.protocol
    if protocol == "auto":
        small = len(domain) < AUTO_KFOLD_BELOW and domain.splits is None
        fixed = split.file is not None or split.seeds > 1  # asked for one split
        protocol = "kfold" if last and small and not fixed else "holdout"
    if protocol == "kfold" and domain.splits is not None:
        raise ConfigError("k-fold needs a domain without a predefined split (this domain brings its own "
                          'train/val/test); use protocol = "holdout" or "fractions"', key=f"{key}.protocol",
                          source=source)
    if split.file is not None and protocol != "holdout":
        raise ConfigError(f'split.file fixes one split; it works with protocol = "holdout", not "{protocol}"',
                          key=f"{key}.file", source=source)
    if split.seeds > 1 and protocol != "holdout":
        raise ConfigError(f'split.seeds repeats a holdout split; with protocol = "{protocol}" the '
                          f"{'folds' if protocol == 'kfold' else 'draws'} are the repeats",
                          key=f"{key}.seeds", source=source)
    return protocol


def plan_repeats(split: SplitConfig, protocol: str) -> list[Repeat]:
    if protocol == "kfold":
        return [Repeat(label=f"fold-{k + 1}", fold=k, seed_offset=k) for k in range(split.folds)]
    if protocol == "fractions":
        out = []
        for fi, frac in enumerate(split.fractions):
            for d in range(split.draws):
                out.append(Repeat(label=f"fraction-{frac:g}-draw-{d + 1}", fraction=frac, fraction_index=fi,
                                  draw=d, seed_offset=d))
        return out
    if split.seeds > 1:
        return [Repeat(label=f"seed-{d + 1}", draw=d, seed_offset=d) for d in range(split.seeds)]
    return [Repeat(label="")]


def splits_from_file(domain: Domain, path: str, where: str) -> dict[str, np.ndarray]:
    """A saved assignment (``splits.csv`` of an earlier run: columns id and split) applied to ``domain``.

    Every problem is one line naming the file (and the line): not UTF-8 text, not CSV, a missing column, an
    empty id, an unknown split, an id given two different splits."""
    from ..data.limits import few

    file = Path(path).expanduser()
    name = f"{where}split.file {file}"
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise UserError(f"{where}split.file: cannot read {file}: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(f"{name}: not a UTF-8 text file (byte {exc.start} is {data[exc.start:exc.start + 1]!r}); "
                        f"give the splits.csv an earlier run wrote (columns id, split)") from None
    if "\0" in text:
        line = text.count("\n", 0, text.index("\0")) + 1
        raise UserError(f"{name} line {line}: a NUL byte; this is not a CSV text file (give the splits.csv an "
                        f"earlier run wrote: columns id, split)")
    reader = csv.reader(io.StringIO(text, newline=""))
    assigned: dict[str, tuple[str, int]] = {}
    try:
        header = next(reader, None)
        columns = [h.strip() for h in header or []]
        if "id" not in columns or "split" not in columns:
            raise UserError(f"{name}: needs columns id and split (found {few(columns, 6) or 'none'})")
        i_id, i_split = columns.index("id"), columns.index("split")
        for fields in reader:
            line = reader.line_num
            if not any(f.strip() for f in fields):
                continue
            image = fields[i_id] if i_id < len(fields) else ""
            split = fields[i_split].strip() if i_split < len(fields) else ""
            if not image:
                raise UserError(f"{name} line {line}: empty id; every row needs an image id and a split")
            if split not in SPLITS:
                raise UserError(f"{name} line {line}: split {few([repr(split)])} is not one of train, val, test")
            if image in assigned and assigned[image][0] != split:
                first_split, first_line = assigned[image]
                raise UserError(f"{name} lines {first_line} and {line}: image {few([image])} is given two splits "
                                f"({first_split}, then {split}); keep one line per image")
            assigned.setdefault(image, (split, line))
    except csv.Error as exc:
        raise UserError(f"{name} line {reader.line_num}: not valid CSV ({str(exc)[:80]})") from None
    missing = [i for i in domain.ids if i not in assigned]
    if missing:
        raise UserError(f"{name} assigns no split to {len(missing)} of the domain's "
                        f"{len(domain)} images (first: {few(missing[:1])}); the data changed since that split was "
                        f"made: remove split.file to split afresh, or restore the images")
    split_of = np.array([assigned[i][0] for i in domain.ids])
    return {s: np.flatnonzero(split_of == s) for s in SPLITS}


def _spread(values: list[float]) -> dict[str, Any]:
    arr = np.asarray(values, dtype=np.float64)
    finite = arr[np.isfinite(arr)]
    return {"mean": float(finite.mean()) if len(finite) else None,
            "sd": float(finite.std(ddof=1)) if len(finite) > 1 else None,
            "n": int(len(arr)), "values": [float(v) for v in arr]}


def _pooled(tests: list[tuple[Repeat, Predictions]]) -> tuple[dict[str, Any], str]:
    """Every fold's test predictions together (each image once), as ``oof_predictions.csv``, and their metrics."""
    lines: list[str] = []
    for rep, pred in tests:
        header, *rows = predictions_csv([pred]).rstrip("\n").split("\n")
        lines += [] if lines else [f"fold,{header}"]
        lines += [f"{rep.fold + 1},{row}" for row in rows]
    labels = np.concatenate([pred.labels for _, pred in tests])
    probs = np.concatenate([pred.probs for _, pred in tests])
    m = classification_metrics(labels, probs, tests[0][1].classes)
    return {"auc_macro": m["auc_macro"], "accuracy": m["accuracy"], "balanced_accuracy": m["balanced_accuracy"],
            "n": m["n"], "file": StageFiles.OOF_PREDICTIONS}, "".join(line + "\n" for line in lines)


def summarise_repeats(protocol: str, rows: list[dict[str, Any]], repeats: list[Repeat],
                      tests: list[Predictions]) -> dict[str, Any]:
    """The ``protocol`` section of a repeated stage's metrics.json (see the module docstring)."""
    headline = rows
    representative = repeats[0].label
    summary: dict[str, Any] = {"name": protocol, "n_repeats": len(rows), "sd": "sample standard deviation (n - 1)"}
    if protocol == "fractions":
        top = max(r["fraction"] for r in rows)
        headline = [r for r in rows if r["fraction"] == top]
        representative = headline[0]["label"]
        summary["headline"] = f"training fraction {top:g}"
        summary["by_fraction"] = [
            {"fraction": f, "n_train": _spread([r["n_train"] for r in rows if r["fraction"] == f]),
             **{m: _spread([r[m] for r in rows if r["fraction"] == f])
                for m in ("auc_macro", "accuracy", "balanced_accuracy")}}
            for f in sorted({r["fraction"] for r in rows})]
    summary["representative"] = representative
    summary["train_seconds_total"] = float(sum(r["train_seconds"] for r in rows))
    for m in ("auc_macro", "accuracy", "balanced_accuracy"):
        summary[m] = _spread([r[m] for r in headline])
    if protocol == "kfold":
        summary["pooled"], summary["pooled_csv"] = _pooled(list(zip(repeats, tests)))
    return summary
