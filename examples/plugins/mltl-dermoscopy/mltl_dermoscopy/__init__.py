"""mltl plugin: dermoscopy photographs listed in a HAM10000-style metadata CSV.

Provides, through mltl's hooks:

* the domain ``skin-lesions``: a folder with a metadata CSV (one row per image: ``image_id``, ``lesion_id``,
  ``dx``, as in the HAM10000 release) and the photographs. Images of one lesion are kept in one split
  (``lesion_id`` is the group), since HAM10000 holds several photographs of many lesions and splitting
  them apart leaks. Each photograph is centre-cropped, colour-corrected (shades of grey) and resized.
* the reporter ``lesion-level``: after each skin-lesion stage, averages the test probabilities over each
  lesion's photographs and writes ``lesion_metrics.json`` (lesion-level AUC and accuracy), the unit a
  clinician cares about.

Config::

    domain = { plugin = "skin-lesions", root = "data/ham10000", classes = ["nv", "mel", "bkl"] }
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

import mltl

from .preprocess import SUFFIXES, read_dermoscopy
from .report import LesionLevelReporter

__version__ = "0.1.0"
DOMAIN = "skin-lesions"


def _read_metadata(path: Path, columns: tuple[str, str, str]) -> list[dict[str, str]]:
    if not path.is_file():
        raise mltl.UserError(f'skin-lesions: metadata CSV "{path}" not found; set domain.metadata to the CSV '
                             f"(relative to domain.root)")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise mltl.UserError(f'skin-lesions: {path} has no column "{missing[0]}" (columns: '
                                 f'{", ".join(reader.fieldnames or [])}); name it with domain.'
                                 f'{["image_column", "group_column", "label_column"][columns.index(missing[0])]}')
        rows = list(reader)
    if not rows:
        raise mltl.UserError(f"skin-lesions: {path} lists no images")
    return rows


def skin_lesions(root: str, metadata: str = "metadata.csv", images: str = "images",
                 classes: list[str] | None = None, image_column: str = "image_id", group_column: str = "lesion_id",
                 label_column: str = "dx", colour_constancy: bool = True, size: int | None = None, *,
                 image_size: int = 64) -> mltl.Domain:
    """Dermoscopy photographs from a HAM10000-style metadata CSV, grouped by lesion."""
    base = Path(root).expanduser()
    if not base.is_dir():
        raise mltl.UserError(f'skin-lesions: root "{root}" is not a folder; set domain.root to the folder holding '
                             f"{metadata} and {images}/")
    rows = _read_metadata(base / metadata, (image_column, group_column, label_column))
    found = sorted({r[label_column] for r in rows})
    names = list(classes) if classes else found
    unknown = [c for c in names if c not in found]
    if unknown:
        raise mltl.UserError(f'skin-lesions: class "{unknown[0]}" (domain.classes) does not occur in column '
                             f'"{label_column}" of {base / metadata}; it has: {", ".join(found)}')
    if len(names) < 2:
        raise mltl.UserError(f"skin-lesions: {len(names)} class(es); a classifier needs at least 2")
    folder = base / images
    pixels, labels, ids, groups = [], [], [], []
    for line, row in enumerate(rows, start=2):
        if row[label_column] not in names:
            continue  # a class left out with domain.classes
        image_id = row[image_column]
        candidates = [folder / f"{image_id}{s}" for s in SUFFIXES] + [folder / image_id]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise mltl.UserError(f"skin-lesions: {base / metadata} line {line}: no image {image_id}.jpg "
                                 f"(or .png) in {folder}")
        pixels.append(read_dermoscopy(path, colour_constancy=colour_constancy, size=size, image_size=image_size))
        labels.append(names.index(row[label_column]))
        ids.append(f"{row[group_column]}/{image_id}")
        groups.append(row[group_column])
    return mltl.Domain(classes=names, images=np.stack(pixels), labels=labels, ids=ids, groups=groups,
                       description=f"dermoscopy, {len(ids)} images of {len(set(groups))} lesions from {base}")


@mltl.hookimpl
def register_domains(register):
    # `mltl predict` reads new photographs with the training preprocessing
    register(DOMAIN, skin_lesions, read_file=read_dermoscopy, suffixes=SUFFIXES)


@mltl.hookimpl
def register_reporters(register):
    register("lesion-level", LesionLevelReporter,
             "lesion-level AUC and accuracy (lesion_metrics.json) for skin-lesions stages")
