"""Grad-CAM overlays of a stage's test images, through captum (``captum.attr.LayerGradCam``).

For each class, the most confidently correct and the most confidently wrong test images (up to
``per_class`` of each) are shown with the Grad-CAM map of the *predicted* class at the output of the
network's last convolutional layer group (the highest ``C<n>`` group; for GFE networks the convolution,
its ReLU and the pooling after it), upsampled bilinearly to the input size. So a reader sees where the
model looked for the class it chose, right or wrong.

The test images are rebuilt from the stage's run directory, without retraining: the network from
``model.safetensors`` (its spec in the file's metadata), the preprocessing from ``model.json`` (input size,
channels, normalisation), the images by re-creating the stage's domain from the plugin and options recorded
in ``model.json`` and picking the ``test`` rows of ``predictions.csv`` by image id. A domain that cannot be
re-created here (a plugin missing, a relative folder path from another working directory) or that no longer
holds the same images (ids or labels differ) gives no figure and a note saying why.
"""

from __future__ import annotations

import csv
import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mltl import StageFiles, UserError, unguard_csv_cell

log = logging.getLogger("mltl.roc")

__all__ = ["last_conv_group", "gradcam_maps", "stage_gradcam", "plot_gradcam_grid"]


def _captum():
    try:
        from captum.attr import LayerAttribution, LayerGradCam
    except ImportError:
        raise UserError("Grad-CAM needs captum, which is not installed: pip install captum") from None
    return LayerGradCam, LayerAttribution


def last_conv_group(net) -> str:
    """The name of the network's last convolutional layer group (``C<n>`` with the highest ``n``)."""
    convs = [g for g in net.trunk_groups if re.fullmatch(r"C\d+", g)]
    if not convs:
        raise UserError(f"Grad-CAM: the {net.spec.get('backbone')} network has no convolutional layer group "
                        f"(C1, C2, ...); its groups are {', '.join(net.group_names())}")
    return max(convs, key=lambda g: int(g[1:]))


def gradcam_maps(net, x: torch.Tensor, targets: list[int] | np.ndarray) -> np.ndarray:
    """Grad-CAM of ``targets`` (one class index per image) for the normalised float batch ``x``
    ``(N, C, H, W)``, at the output of :func:`last_conv_group`: ReLU of the gradient-weighted sum of that
    layer's channels, upsampled (bilinear) to ``(H, W)``. Returns ``(N, H, W)`` float64, not rescaled."""
    LayerGradCam, LayerAttribution = _captum()
    group = last_conv_group(net)
    layer = net.group_modules(group)[-1]
    was_training = net.training
    net.eval()
    try:
        cam = LayerGradCam(net, layer)
        attr = cam.attribute(x, target=[int(t) for t in targets], relu_attributions=True)
        up = LayerAttribution.interpolate(attr, tuple(x.shape[-2:]), interpolate_mode="bilinear")
    finally:
        net.train(was_training)
    return up.detach().squeeze(1).double().cpu().numpy()


def _test_rows(stage_dir: Path, classes: tuple[str, ...]) -> list[dict[str, Any]]:
    with open(StageFiles(stage_dir).predictions, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "test"]
    out = []
    for r in rows:
        p = np.array([float(r[f"p_{c}"]) for c in classes])
        out.append({"id": unguard_csv_cell(r["id"]), "label": classes.index(r["label"]), "probs": p, "pred": int(p.argmax())})
    return out


def _pick(rows: list[dict[str, Any]], n_classes: int, per_class: int) -> list[tuple[int, str, dict[str, Any]]]:
    """(class, "correct"/"wrong", row) for up to ``per_class`` most confident correct and wrong images of
    each class (confidence: the probability of the predicted class; ties: test order)."""
    picked = []
    for c in range(n_classes):
        for kind in ("correct", "wrong"):
            members = [r for r in rows if r["label"] == c and (r["pred"] == c) == (kind == "correct")]
            members.sort(key=lambda r: -r["probs"][r["pred"]])
            picked += [(c, kind, r) for r in members[:per_class]]
    return picked


def stage_gradcam(stage_dir: Path, *, per_class: int = 2, registry=None) -> dict[str, Any]:
    """Grad-CAM of a finished stage's sampled test images: ``gradcam.png`` and ``gradcam.json`` in
    ``stage_dir``. Returns the record written to ``gradcam.json`` (with ``skipped`` and the reason when no
    figure could be made; a missing captum raises :class:`mltl.UserError`)."""
    from mltl import InputConfig, get_registry, load_network, normalise, prepare_images, write_json_atomic

    _captum()
    stage_dir = Path(stage_dir)
    registry = registry or get_registry()
    files = StageFiles(stage_dir)
    info = json.loads(files.model_json.read_text())
    inp = InputConfig(**info["input"])
    net = load_network(files.model, registry).to("cpu")
    classes = net.classes
    record: dict[str, Any] = {"stage": stage_dir.name, "method": "captum.attr.LayerGradCam, relu_attributions=True",
                              "layer_group": last_conv_group(net), "target": "the predicted class",
                              "per_class": per_class}
    dom_info = info.get("domain") or {}
    try:
        domain = registry.create("domain", dom_info["plugin"], dict(dom_info.get("options") or {}),
                                 key="model.json domain", source=str(files.model_json),
                                 extra={"image_size": inp.size})
    except (UserError, KeyError, OSError) as exc:
        record["skipped"] = f"the stage's domain could not be re-created here ({exc})"
        write_json_atomic(stage_dir / "gradcam.json", record)
        return record
    rows = _test_rows(stage_dir, classes)
    index = {i: k for k, i in enumerate(domain.ids)}
    missing = [r["id"] for r in rows if r["id"] not in index]
    relabelled = [r["id"] for r in rows if r["id"] in index and domain.labels[index[r["id"]]] != r["label"]]
    if missing or relabelled or tuple(domain.classes) != tuple(classes):
        what = (f"{len(missing)} test image ids are not in it" if missing else
                f"{len(relabelled)} test images have other labels" if relabelled else "its classes differ")
        record["skipped"] = f"the re-created domain is not the one the stage was tested on ({what})"
        write_json_atomic(stage_dir / "gradcam.json", record)
        return record
    picked = _pick(rows, len(classes), per_class)
    if not picked:
        record["skipped"] = "the test split is empty"
        write_json_atomic(stage_dir / "gradcam.json", record)
        return record
    raw = prepare_images(domain.images[[index[r["id"]] for _, _, r in picked]], size=inp.size,
                         channels=inp.channels)
    x = normalise(raw, inp)
    maps = gradcam_maps(net, x, [r["pred"] for _, _, r in picked])
    # the probabilities the network gives now must be those in predictions.csv: same model, same images
    with torch.no_grad():
        now = torch.softmax(net.eval()(x).float(), dim=1).double().numpy()
    saved = np.stack([r["probs"] for _, _, r in picked])
    record["max_probability_difference"] = float(np.abs(now - saved).max())
    cells = [{"id": r["id"], "true": classes[c], "predicted": classes[r["pred"]], "kind": kind,
              "probability": float(r["probs"][r["pred"]]), "map_max": float(m.max())}
             for (c, kind, r), m in zip(picked, maps)]
    record["images"] = cells
    plot_gradcam_grid(raw.numpy(), maps, picked, classes, per_class, stage_dir / "gradcam.png",
                      f"Grad-CAM at {record['layer_group']}, stage {stage_dir.name} (test split; map of the "
                      f"predicted class)")
    write_json_atomic(stage_dir / "gradcam.json", record)
    return record


def plot_gradcam_grid(images: np.ndarray, maps: np.ndarray, picked: list, classes: tuple[str, ...],
                      per_class: int, path: Path, title: str) -> None:
    """One row per class: up to ``per_class`` correct then ``per_class`` wrong images, each in grey with
    its Grad-CAM map (scaled to its own maximum) overlaid in colour. Empty cells say "none"."""
    from .figures import _new_figure, _save

    n_rows, n_cols = len(classes), 2 * per_class
    fig = _new_figure(1.9 * n_cols + 0.6, 2.05 * n_rows + 0.5)
    axes = np.atleast_2d(fig.subplots(n_rows, n_cols, squeeze=False))
    cell = {}
    for k, (c, kind, row) in enumerate(picked):
        col = sum(1 for cc, kk, _ in picked[:k] if cc == c and kk == kind) + (per_class if kind == "wrong" else 0)
        cell[(c, col)] = (k, kind, row)
    for c in range(n_rows):
        for col in range(n_cols):
            ax = axes[c, col]
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(f"true: {classes[c]}", fontsize=8)
            if (c, col) not in cell:
                ax.text(0.5, 0.5, "none " + ("correct" if col < per_class else "wrong"), ha="center",
                        va="center", fontsize=8, color="0.5", transform=ax.transAxes)
                for s in ax.spines.values():
                    s.set_color("0.85")
                continue
            k, kind, row = cell[(c, col)]
            img = images[k]
            grey = img[0] if img.shape[0] == 1 else img.mean(axis=0)
            ax.imshow(grey, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            m = maps[k]
            peak = float(m.max())
            if peak > 0:
                ax.imshow(m / peak, cmap="jet", alpha=0.42, vmin=0.0, vmax=1.0, interpolation="bilinear")
            ax.set_title(f"{kind}: pred {classes[row['pred']]}\np = {row['probs'][row['pred']]:.2f}"
                         + ("" if peak > 0 else " (map all 0)"), fontsize=7,
                         color="darkgreen" if kind == "correct" else "darkred")
    fig.suptitle(title, fontsize=9)
    _save(fig, path)
