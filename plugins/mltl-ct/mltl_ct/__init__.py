"""CT abdomen and rare-disease domains.

``ct-phantom``: seeded synthetic axial abdominal CT slices in Hounsfield units (see
:mod:`mltl_ct.phantom`), windowed to 8 bit; classes ``normal``, ``cyst``, ``calculi``, ``tumour``,
``caroli-focal``, ``caroli-diffuse``. The main demo runs on it with no download. Give each stage of a
chain its own ``seed``: images of one seed and class are identical across stages, which would leak.

``dicom`` (:mod:`mltl_ct.dicom`) and ``nifti`` (:mod:`mltl_ct.nifti`): real CT in Hounsfield units from DICOM
files and series or NIfTI volumes, windowed with the presets and custom windows of :mod:`mltl_ct.windows`
(several windows stack as channels). pydicom and nibabel are imported only when those domains are used:
``pip install "mltl-ct[dicom,nifti]"``. See docs/data.md.

``covid-ct`` (:mod:`mltl_ct.covid`): the public COVID-CT chest CT set (UCSD-AI4H/COVID-CT), classes ``non-covid``
and ``covid``, grouped by patient from its metadata CSVs, with its official patient-disjoint split
(``split = "official"``) or none (``split = "none"``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from mltl import Domain, UserError, cache_dir, hookimpl

from . import phantom

CACHE_VERSION = 1


def _cache_dir() -> Path:
    """``<mltl's cache folder>/ct-phantom`` (:func:`mltl.cache_dir`: ``$MLTL_CACHE_DIR``, else the platform's
    user cache folder)."""
    return cache_dir() / "ct-phantom"


def _generator_hash() -> str:
    return hashlib.sha256(Path(phantom.__file__).read_bytes()).hexdigest()[:16]


def ct_phantom_domain(classes: list[str] = ["normal", "cyst", "calculi"], images_per_class: int = 100,  # noqa: B006
                      seed: int = 0, window: str | list[float] = "abdomen", size: int | None = None,
                      cache: bool = True, levels: list[float] | None = None, *, image_size: int = 64) -> Domain:
    """Synthetic abdominal CT slices (HU phantom with cysts, calculi, tumours, Caroli disease), windowed.

    ``levels``: the craniocaudal range the slices are drawn from, [low, high] with 0 = T12 (upper abdomen)
    and 1 = L3; default the whole range. [0.03, 0.45] keeps to slices through the liver.
    """
    unknown = [c for c in classes if c not in phantom.CLASSES]
    if unknown:
        raise UserError(f'ct-phantom: unknown class "{unknown[0]}"; available: {", ".join(phantom.CLASSES)}')
    if len(set(classes)) != len(classes) or len(classes) < 2:
        raise UserError("ct-phantom: classes must list at least two different class names")
    if images_per_class < 3:
        raise UserError(f"ct-phantom: images_per_class must be at least 3, got {images_per_class}")
    if isinstance(window, str):
        if window not in phantom.WINDOWS:
            raise UserError(f'ct-phantom: unknown window "{window}"; presets: {", ".join(phantom.WINDOWS)}, '
                            f"or [level, width] in HU")
        level, width = phantom.WINDOWS[window]
    elif len(window) == 2 and window[1] > 0:
        level, width = float(window[0]), float(window[1])
    else:
        raise UserError(f"ct-phantom: window must be a preset name or [level, width] with width > 0, got {window}")
    full = phantom.SLICE_LEVEL_RANGE
    if levels is None:
        levels = list(full)
    elif not (len(levels) == 2 and full[0] <= levels[0] < levels[1] <= full[1]):
        raise UserError(f"ct-phantom: levels must be [low, high] with {full[0]} <= low < high <= {full[1]} "
                        f"(0 = T12, 1 = L3), got {levels}; e.g. levels = [0.03, 0.45] for slices through the liver")
    side = size or image_size
    # the generator's own source is part of the key: a changed phantom never serves stale cached images
    key = json.dumps([CACHE_VERSION, _generator_hash(), list(classes), images_per_class, side, seed, level, width]
                     + ([] if tuple(levels) == full else [list(levels)]))
    path = _cache_dir() / (hashlib.sha256(key.encode()).hexdigest()[:24] + ".npz")
    images = labels = None
    if cache and path.exists():
        try:
            with np.load(path) as z:
                images, labels = z["images"], z["labels"]
        except (OSError, ValueError, KeyError):
            images = None  # a damaged cache file is regenerated
    if images is None:
        images, labels = phantom.generate(classes, images_per_class, size=side, seed=seed, window=(level, width),
                                             levels=(float(levels[0]), float(levels[1])))
        if cache:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
                np.savez(tmp, images=images, labels=labels)
                os.replace(tmp, path)
            except OSError:
                pass  # the cache is an optimisation; a read-only home must not stop a run
    ids = tuple(f"ct-phantom/{seed}/{classes[labels[i]]}/{i - int(labels[i]) * images_per_class}"
                for i in range(len(labels)))
    return Domain(classes=tuple(classes), images=images, labels=labels, ids=ids,
                  description=f"CT phantom, {images_per_class} per class, seed {seed}, window {level}/{width}"
                  + ("" if tuple(levels) == full else f", levels {levels[0]:g}-{levels[1]:g}"))


@hookimpl
def register_domains(register):
    register("ct-phantom", ct_phantom_domain)
    from .covid import covid_ct_domain
    from .dicom import dicom_domain
    from .nifti import nifti_domain

    register("dicom", dicom_domain)
    register("nifti", nifti_domain)
    register("covid-ct", covid_ct_domain)
