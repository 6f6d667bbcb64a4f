"""Figures other than ROC curves: training curves, reliability diagram, learning curve.

Like :mod:`mltl_roc.roc`, figures are drawn with matplotlib's object API on an Agg canvas (no pyplot)
and written atomically as PNG.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mltl import write_bytes_atomic

__all__ = ["plot_training_curves", "plot_reliability", "plot_learning_curve", "plot_chain_learning_curves",
           "summarise_repeats"]


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> None:
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=120)
    finally:
        fig.clear()
    write_bytes_atomic(Path(path), buf.getvalue())


def _series(history: Sequence[Mapping[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """Epochs and values of ``key``, leaving out epochs where it is missing or not finite (e.g. epochs
    without validation when ``val_every`` > 1)."""
    xs, ys = [], []
    for row in history:
        v = row.get(key)
        if v is None:
            continue
        v = float(v)
        if math.isfinite(v):
            xs.append(int(row["epoch"]))
            ys.append(v)
    return np.asarray(xs), np.asarray(ys)


def plot_training_curves(histories: Mapping[str, Sequence[Mapping[str, Any]]], selected: str, path: Path,
                         title: str, best_epoch: int | None = None) -> None:
    """Training loss, validation loss and validation AUC per epoch, one line per sweep variant.

    ``histories`` maps a variant label to its ``history.json`` rows; ``selected`` is the label of the
    variant the stage kept: it is drawn bold, the others faint. ``best_epoch`` (of the selected variant)
    is marked with a vertical line.
    """
    fig = _new_figure(11.0, 4.4)
    ax_loss, ax_auc = fig.subplots(1, 2)
    for i, (label, history) in enumerate(histories.items()):
        chosen = label == selected
        colour = f"C{i % 10}"
        style = {"linewidth": 2.4 if chosen else 1.0, "alpha": 1.0 if chosen else 0.35, "color": colour}
        name = label or "trained model"
        tag = f"{name} (selected)" if chosen and len(histories) > 1 else name
        x, y = _series(history, "loss")
        ax_loss.plot(x, y, linestyle="-", label=f"{tag}: train", **style)
        x, y = _series(history, "val_loss")
        ax_loss.plot(x, y, linestyle="--", marker="o" if len(x) < 30 else None, markersize=3,
                     label=f"{tag}: validation", **style)
        x, y = _series(history, "val_auc")
        ax_auc.plot(x, y, linestyle="-", marker="o" if len(x) < 30 else None, markersize=3, label=tag, **style)
    if best_epoch:
        for ax in (ax_loss, ax_auc):
            ax.axvline(best_epoch, color="0.4", linestyle=":", linewidth=1.0)
        ax_auc.plot([], [], color="0.4", linestyle=":", label=f"best epoch ({best_epoch})")
    ax_loss.set_xlabel("Epoch")
    ax_loss.set_ylabel("Cross-entropy loss")
    ax_loss.set_title("Loss (solid: training, dashed: validation)", fontsize=10)
    ax_auc.set_xlabel("Epoch")
    ax_auc.set_ylabel("Validation macro ROC AUC")
    ax_auc.set_title("Validation AUC", fontsize=10)
    ax_auc.axhline(0.5, color="0.6", linestyle="--", linewidth=0.8)
    lo = min([0.4] + [float(np.min(_series(h, "val_auc")[1])) for h in histories.values()
                      if _series(h, "val_auc")[1].size])
    ax_auc.set_ylim(max(0.0, lo - 0.02), 1.01)
    for ax in (ax_loss, ax_auc):
        ax.grid(True, color="0.9", linewidth=0.8)
        ax.set_axisbelow(True)
        ax.xaxis.get_major_locator().set_params(integer=True)
    ax_loss.legend(fontsize=7, framealpha=0.9, ncol=1 if len(histories) < 4 else 2)
    ax_auc.legend(fontsize=7, framealpha=0.9, loc="lower right")
    fig.suptitle(title, fontsize=11)
    _save(fig, path)


def plot_reliability(cal: Mapping[str, Any], path: Path, title: str) -> None:
    """Reliability diagram of :func:`mltl_roc.evaluation.calibration` output: observed frequency against
    mean predicted probability per bin (marker area grows with the bin's count), the diagonal of perfect
    calibration, and a histogram of the predictions underneath. ECE and Brier score in the legend."""
    fig = _new_figure(6.0, 6.6)
    ax, hist = fig.subplots(2, 1, height_ratios=[3, 1], sharex=True)
    ax.plot([0, 1], [0, 1], linestyle="--", color="0.55", linewidth=1.0, label="perfect calibration")
    bins = [b for b in cal["bins"] if b["count"]]
    x = [b["mean_predicted"] for b in bins]
    y = [b["observed"] for b in bins]
    sizes = [20 + 180 * b["count"] / cal["n"] for b in bins]
    ax.plot(x, y, color="C0", linewidth=1.6,
            label=f"model: ECE {cal['ece']:.3f}, Brier {cal['brier']:.3f} (n = {cal['n']})")
    ax.scatter(x, y, s=sizes, color="C0", zorder=3)
    binary = str(cal["kind"]).startswith("binary")
    ax.set_ylabel("Observed frequency of the class" if binary else "Accuracy of the predicted class")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.grid(True, color="0.9", linewidth=0.8)
    ax.set_axisbelow(True)
    ax.legend(loc="upper left", fontsize=8.5, framealpha=0.92)
    ax.set_title(title, fontsize=11)
    edges = [cal["bins"][0]["lower"]] + [b["upper"] for b in cal["bins"]]
    counts = [b["count"] for b in cal["bins"]]
    hist.stairs(counts, edges, fill=True, color="C0", alpha=0.5)
    hist.set_ylabel("Images")
    hist.set_xlabel(("Predicted probability (" + str(cal["kind"]).split(": ", 1)[-1] + ")") if binary
                    else "Confidence (largest predicted probability)")
    hist.grid(True, color="0.9", linewidth=0.8)
    _save(fig, path)


def _sd(values: Sequence[float]) -> float:
    """Sample standard deviation (n - 1 in the denominator); NaN for fewer than two values."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    return float(np.std(v, ddof=1)) if v.size >= 2 else math.nan


def summarise_repeats(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per training fraction (one group when the rows have no fraction: folds or seeds), the number of
    repeats, mean and sample SD of the test AUC and accuracy, and every individual value (in row order).
    Undefined AUCs (null) are left out of the mean and SD and counted in ``n_auc_undefined``."""
    groups: dict[Any, list[Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r.get("fraction"), []).append(r)
    out = []
    for fraction in sorted(groups, key=lambda f: (f is None, f if f is not None else 0.0)):
        members = groups[fraction]
        aucs = [r.get("auc_macro") for r in members]
        accs = [r.get("accuracy") for r in members]
        finite_auc = [float(a) for a in aucs if a is not None and math.isfinite(float(a))]
        finite_acc = [float(a) for a in accs if a is not None and math.isfinite(float(a))]
        n_train = [r.get("n_train") for r in members if r.get("n_train") is not None]
        out.append({
            "fraction": fraction,
            "n_repeats": len(members),
            "n_train_mean": float(np.mean(n_train)) if n_train else math.nan,
            "auc_mean": float(np.mean(finite_auc)) if finite_auc else math.nan,
            "auc_sd": _sd(finite_auc),
            "accuracy_mean": float(np.mean(finite_acc)) if finite_acc else math.nan,
            "accuracy_sd": _sd(finite_acc),
            "n_auc_undefined": len(aucs) - len(finite_auc),
            "auc_values": [None if a is None else float(a) for a in aucs],
            "accuracy_values": [None if a is None else float(a) for a in accs],
        })
    return out


def plot_learning_curve(repeats_rows: Sequence[Mapping[str, Any]], path: Path,
                        title: str = "Test AUC against training-set size") -> None:
    """Mean test AUC against the training fraction with a +/- 1 SD band and every draw as a point
    (as Samala et al. 2019 plot theirs). ``repeats_rows`` are the ``rows`` of a stage's ``repeats.json``;
    rows without a ``fraction`` (folds, seeds) cannot make a curve and raise ``ValueError``."""
    rows = [r for r in repeats_rows if r.get("fraction") is not None]
    if not rows:
        raise ValueError("a learning curve needs rows with a training fraction")
    summary = [s for s in summarise_repeats(rows) if s["fraction"] is not None]
    fractions = np.asarray([s["fraction"] for s in summary], dtype=np.float64) * 100.0
    mean = np.asarray([s["auc_mean"] for s in summary])
    sd = np.nan_to_num(np.asarray([s["auc_sd"] for s in summary]), nan=0.0)

    fig = _new_figure(7.2, 5.0)
    ax = fig.add_subplot()
    pts_x, pts_y = [], []
    for r in rows:
        if r.get("auc_macro") is not None and math.isfinite(float(r["auc_macro"])):
            pts_x.append(float(r["fraction"]) * 100.0)
            pts_y.append(float(r["auc_macro"]))
    ax.fill_between(fractions, mean - sd, mean + sd, color="C0", alpha=0.2, linewidth=0, label="± 1 SD")
    ax.plot(fractions, mean, color="C0", linewidth=2.2, marker="o", label="mean test AUC")
    ax.scatter(pts_x, pts_y, s=14, color="0.25", alpha=0.6, zorder=3, label="individual draws")
    ax.axhline(0.5, color="0.6", linestyle="--", linewidth=0.9, label="chance (AUC 0.5)")
    if fractions.size and fractions.max() / max(fractions.min(), 1e-9) > 20:
        ax.set_xscale("log")
    ax.set_xticks(fractions)
    ax.set_xticklabels([f"{f:g}%" for f in fractions])
    ax.minorticks_off()
    ax.margins(x=0.08)
    for f, s in zip(fractions, summary):
        if math.isfinite(s["auc_mean"]):
            label = f"{s['auc_mean']:.2f}" + (f" ± {s['auc_sd']:.2f}" if math.isfinite(s["auc_sd"]) else "")
            ax.annotate(label, (f, s["auc_mean"]), textcoords="offset points", xytext=(0, 9), ha="center",
                        fontsize=8)
    n_draws = sorted({s["n_repeats"] for s in summary})
    ax.set_xlabel("Training fraction (share of the stage's training split)")
    ax.set_ylabel("Test macro ROC AUC")
    low = min([0.45] + pts_y + list(mean - sd))
    ax.set_ylim(max(0.0, low - 0.03), 1.02)
    ax.grid(True, color="0.9", linewidth=0.8)
    ax.set_axisbelow(True)
    ax.legend(loc="lower right", fontsize=8.5, framealpha=0.92)
    ax.set_title(f"{title} ({'/'.join(map(str, n_draws))} draws per fraction)", fontsize=11)
    _save(fig, path)


def plot_chain_learning_curves(chains: Sequence[tuple[str, Sequence[tuple[float, Sequence[float]]]]], path: Path,
                               title: str = "Target test AUC against training fraction, by chain") -> None:
    """Every chain's learning curve on one plot: mean test AUC per training fraction with a +/- 1 SD band
    over the draws, and every draw as a point (nudged sideways per chain so that chains do not hide each
    other). ``chains``: ``(name, [(fraction, [AUC of each draw, ...]), ...])`` in legend order; undefined
    AUCs (NaN / None) are left out."""
    if not chains:
        raise ValueError("no chain to draw")
    fig = _new_figure(7.6, 5.2)
    ax = fig.add_subplot()
    all_fracs = sorted({float(f) for _, curve in chains for f, _ in curve})
    if not all_fracs:
        raise ValueError("a learning curve needs at least one training fraction")
    log_x = max(all_fracs) / max(min(all_fracs), 1e-9) > 20
    lows = [0.45]
    n_draws = set()
    for i, (name, curve) in enumerate(chains):
        colour = f"C{i % 10}"
        offset = (i - (len(chains) - 1) / 2) * 0.035
        xs, means, sds = [], [], []
        for fraction, values in sorted(curve, key=lambda c: c[0]):
            finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
            n_draws.add(len(values))
            x = float(fraction) * 100.0
            x_pts = x * (1.0 + offset) if log_x else x + offset * 100.0 * (all_fracs[-1] - all_fracs[0] or 1.0) / 4
            ax.scatter([x_pts] * len(finite), finite, s=16, color=colour, alpha=0.55, zorder=3,
                       edgecolors="none")
            if finite:
                xs.append(x)
                means.append(float(np.mean(finite)))
                sds.append(_sd(finite))
                lows.append(min(finite))
        xs_a, mean_a = np.asarray(xs), np.asarray(means)
        sd_a = np.nan_to_num(np.asarray(sds, dtype=np.float64), nan=0.0)
        ax.fill_between(xs_a, mean_a - sd_a, mean_a + sd_a, color=colour, alpha=0.15, linewidth=0)
        ax.plot(xs_a, mean_a, color=colour, linewidth=2.0, marker="o", label=f"{name}: mean ± 1 SD, draws as points")
        if len(mean_a):
            lows.append(float((mean_a - sd_a).min()))
    ax.axhline(0.5, color="0.6", linestyle="--", linewidth=0.9, label="chance (AUC 0.5)")
    fracs = np.asarray(all_fracs) * 100.0
    if log_x:
        ax.set_xscale("log")
    ax.set_xticks(fracs)
    ax.set_xticklabels([f"{f:g}%" for f in fracs])
    ax.minorticks_off()
    ax.margins(x=0.08)
    ax.set_xlabel("Training fraction (share of the target's training split)")
    ax.set_ylabel("Test macro ROC AUC")
    ax.set_ylim(max(0.0, min(lows) - 0.03), 1.02)
    ax.grid(True, color="0.9", linewidth=0.8)
    ax.set_axisbelow(True)
    ax.legend(loc="lower right", fontsize=8.5, framealpha=0.92)
    ax.set_title(f"{title} ({'/'.join(map(str, sorted(n_draws)))} draws per fraction)", fontsize=11)
    _save(fig, path)
