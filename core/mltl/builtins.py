"""mltl's own plugins, registered through the same hooks as everyone else's.

Generic pieces only: an image-folder domain, the formula-driven fractal domain for source stages, and
the named freeze policies. Paper-specific networks and data live in the plugins under ``plugins/``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import fractal as _fractal
from .domain import Domain
from .errors import UserError
from .freeze import freeze_all_but_classifier, freeze_inherited, freeze_none
from .hookspecs import hookimpl

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp"}


def fractal_domain(classes: int = 5, images_per_class: int = 200, seed: int = 0, channels: int = 3,
                   size: int | None = None, *, image_size: int = 64) -> Domain:
    """Formula-driven fractal images (random iterated function systems, after Kataoka et al. 2020)."""
    for name, value, low in (("classes", classes, 2), ("images_per_class", images_per_class, 3)):
        if value < low:
            raise UserError(f"fractal: {name} must be at least {low}, got {value}")
    if channels not in (1, 3):
        raise UserError(f"fractal: channels must be 1 or 3, got {channels}")
    images, labels = _fractal.generate(classes, images_per_class, size=size or image_size, seed=seed,
                                       channels=channels)
    names = tuple(f"fractal-{k}" for k in range(classes))
    ids = tuple(f"fractal/{seed}/{labels[i]}/{i - int(labels[i]) * images_per_class}" for i in range(len(labels)))
    return Domain(classes=names, images=images, labels=labels, ids=ids,
                  description=f"{classes} fractal categories x {images_per_class} images (seed {seed})")


def read_image(path: Path, *, channels: int, size: int, who: str = "image") -> np.ndarray:
    """One image file as uint8 ``(size, size)`` (grey) or ``(3, size, size)``: the image-folder domain's
    decoding, shared with ``mltl predict`` so new images get exactly the training preprocessing."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grey: scale to 8 bit by its range
                arr = np.asarray(im, dtype=np.float64)
                lo, hi = float(arr.min()), float(arr.max())
                im = Image.fromarray(((arr - lo) / (hi - lo or 1) * 255).round().astype(np.uint8))
            im = im.convert("L" if channels == 1 else "RGB").resize((size, size), Image.Resampling.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise UserError(f"{who}: cannot read image {path}: {exc}; remove or replace the file") from None
    return arr if channels == 1 else arr.transpose(2, 0, 1)


def image_folder_domain(root: str, classes: list[str] | None = None, channels: int = 1, size: int | None = None,
                        *, image_size: int = 64) -> Domain:
    """A folder with one sub-folder of images per class (PNG, JPEG, BMP, TIFF, ...)."""
    base = Path(root).expanduser()
    if not base.is_dir():
        raise UserError(f'image-folder: root "{root}" is not a folder (resolved to {base.resolve()}); '
                        f"point domain.root at a folder holding one sub-folder per class")
    found = sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    names = list(classes) if classes else found
    missing = [c for c in names if c not in found]
    if missing:
        raise UserError(f'image-folder: no sub-folder "{missing[0]}" in {base}; sub-folders: {", ".join(found) or "none"}')
    if len(names) < 2:
        raise UserError(f"image-folder: {base} has {len(names)} class sub-folder(s); a classifier needs at least 2")
    side = size or image_size
    images, labels, ids = [], [], []
    for c, name in enumerate(names):
        files = sorted(p for p in (base / name).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise UserError(f"image-folder: class folder {base / name} holds no images "
                            f"({', '.join(sorted(IMAGE_SUFFIXES))})")
        for f in files:
            images.append(read_image(f, channels=channels, size=side, who="image-folder"))
            labels.append(c)
            ids.append(f.relative_to(base).as_posix())
    return Domain(classes=tuple(names), images=np.stack(images), labels=np.array(labels), ids=tuple(ids),
                  description=f"image folder {base}")


@hookimpl
def register_domains(register):
    register("fractal", fractal_domain)
    register("image-folder", image_folder_domain)


@hookimpl
def register_freeze_policies(register):
    register("none", freeze_none)
    register("inherited", freeze_inherited)
    register("all-but-classifier", freeze_all_but_classifier)
