"""mltl's own plugins, registered through the same hooks as everyone else's.

Generic pieces only: an image-folder domain, the formula-driven fractal domain for source stages, and
the named freeze policies. Paper-specific networks and data live in the plugins under ``plugins/``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .data import fractal as _fractal
from .data.limits import check_decoded_bytes
from .data.domain import Domain

# image decoding (formats, bit depths, transparency, bad files) lives in images.py; re-exported here
from .data.images import IMAGE_SUFFIXES, read_image  # noqa: E402,F401
from .errors import UserError
from .hookspecs import hookimpl
from .networks.freeze import freeze_all_but_classifier, freeze_inherited, freeze_none


def fractal_domain(classes: int = 5, images_per_class: int = 200, seed: int = 0, channels: int = 3,
                   size: int | None = None, *, image_size: int = 64) -> Domain:
    """Formula-driven fractal images (random iterated function systems, after Kataoka et al. 2020)."""
    for name, value, low in (("classes", classes, 2), ("images_per_class", images_per_class, 3)):
        if value < low:
            raise UserError(f"fractal: {name} must be at least {low}, got {value}")
    if channels not in (1, 3):
        raise UserError(f"fractal: channels must be 1 or 3, got {channels}")
    if classes > 1000:
        raise UserError(f"fractal: classes must be at most 1000, got {classes}")
    side = size or image_size
    if size is not None and not 8 <= size <= 4096:
        raise UserError(f"fractal: size must be from 8 to 4096 pixels, got {size}")
    # the images are generated in memory: the same budget as a decoded file (MLTL_MAX_DECODED_BYTES)
    check_decoded_bytes(classes * images_per_class * side * side * channels, "fractal: ",
                        f"{classes} classes x {images_per_class} images of {side}x{side}x{channels}")
    images, labels = _fractal.generate(classes, images_per_class, size=size or image_size, seed=seed,
                                       channels=channels)
    names = tuple(f"fractal-{k}" for k in range(classes))
    ids = tuple(f"fractal/{seed}/{labels[i]}/{i - int(labels[i]) * images_per_class}" for i in range(len(labels)))
    return Domain(classes=names, images=images, labels=labels, ids=ids,
                  description=f"{classes} fractal categories x {images_per_class} images (seed {seed})")


def class_folders(who: str, root: str, classes: list[str] | None, *, hint: str) -> tuple[Path, list[str]]:
    """The folder ``root`` and its class sub-folders (``classes``, or every visible sub-folder, sorted),
    checked: the folder exists, each named class has a sub-folder, and there are at least two classes."""
    base = Path(root).expanduser()
    if not base.is_dir():
        raise UserError(f'{who}: root "{root}" is not a folder (resolved to {base.resolve()}); {hint}')
    found = sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    names = list(classes) if classes else found
    missing = [c for c in names if c not in found]
    if missing:
        raise UserError(f'{who}: no sub-folder "{missing[0]}" in {base}; sub-folders: {", ".join(found) or "none"}')
    if len(names) < 2:
        raise UserError(f"{who}: {base} has {len(names)} class sub-folder(s); a classifier needs at least 2 "
                        f"(one sub-folder per class)")
    return base, names


def image_folder_domain(root: str, classes: list[str] | None = None, channels: int = 1, size: int | None = None,
                        *, image_size: int = 64) -> Domain:
    """A folder with one sub-folder of images per class (PNG, JPEG, BMP, TIFF, ...)."""
    base, names = class_folders("image-folder", root, classes, hint="point domain.root at a folder holding one "
                                                                  "sub-folder per class")
    side = size or image_size
    paths, labels, ids = [], [], []
    for c, name in enumerate(names):
        files = sorted(p for p in (base / name).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                       and not p.name.startswith("."))  # hidden: macOS "._x.jpg" resource forks
        if not files:
            raise UserError(f"image-folder: class folder {base / name} holds no images "
                            f"({', '.join(sorted(IMAGE_SUFFIXES))})")
        for f in files:
            paths.append(f)
            labels.append(c)
            ids.append(f.relative_to(base).as_posix())
    # decoded once: later loads come from the decode cache (mltl.data.cache), keyed by file content and settings
    from functools import partial

    from .data.cache import cached_decode

    images = cached_decode(paths, {"reader": "image-folder", "size": side, "channels": channels},
                           partial(read_image, channels=channels, size=side, who="image-folder"),
                           source=f"image-folder:{base.resolve()}",
                           hash_error=lambda p, exc: UserError(f"image-folder: cannot read image {p}: "
                                                               f"{exc.strerror or exc}; remove or replace the file"))
    return Domain(classes=tuple(names), images=images, labels=np.array(labels), ids=tuple(ids),
                  description=f"image folder {base}")


@hookimpl
def register_domains(register):
    register("fractal", fractal_domain)
    register("image-folder", image_folder_domain)
    from .data.manifest import csv_manifest_domain
    from .data.medmnist import medmnist_domain

    register("csv-manifest", csv_manifest_domain)
    register("medmnist", medmnist_domain)


@hookimpl
def register_freeze_policies(register):
    register("none", freeze_none)
    register("inherited", freeze_inherited)
    register("all-but-classifier", freeze_all_but_classifier)
