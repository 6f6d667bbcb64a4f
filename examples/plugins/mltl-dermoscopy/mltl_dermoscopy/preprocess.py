"""How a dermoscopy photograph becomes a training image: centre crop, colour constancy, resize.

Dermoscopy photographs differ in illumination between devices and clinics; a classifier trained on one
clinic's colour cast can learn the cast instead of the lesion. The shades-of-grey method (Finlayson and
Trezzi, 2004; the Minkowski p-norm of each channel, p = 6) estimates the illuminant per image and scales
each channel so that it becomes neutral grey. It is the usual preprocessing in skin-lesion challenges.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

import mltl

SUFFIXES = (".jpg", ".jpeg", ".png")  # photograph file endings: in the metadata's folder and for `mltl predict`


def shades_of_grey(rgb: np.ndarray, p: int = 6) -> np.ndarray:
    """uint8 ``(H, W, 3)`` with the illuminant estimated by the channel-wise p-norm removed."""
    x = rgb.astype(np.float64)
    illuminant = np.power(np.mean(np.power(x, p), axis=(0, 1)), 1.0 / p)
    illuminant = illuminant / (np.linalg.norm(illuminant) or 1.0)
    gain = 1.0 / (illuminant * np.sqrt(3.0) + 1e-12)
    return np.clip(x * gain, 0, 255).round().astype(np.uint8)


def centre_square(im: Image.Image) -> Image.Image:
    """The largest centred square (dermoscopy photographs are 4:3; the lesion is centred)."""
    w, h = im.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return im.crop((left, top, left + side, top + side))


def read_dermoscopy(path: str | Path, *, colour_constancy: bool = True, size: int | None = None,
                    image_size: int = 64) -> np.ndarray:
    """One photograph as uint8 ``(3, side, side)``: the training preprocessing, also used by ``mltl predict``."""
    side = size or image_size
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im).convert("RGB")
            im = centre_square(im).resize((side, side), Image.Resampling.BILINEAR)
            rgb = np.asarray(im, dtype=np.uint8)
    except OSError as exc:
        raise mltl.UserError(f"skin-lesions: cannot read image {path} ({exc}); remove it from the metadata CSV "
                             f"or replace the file") from None
    if colour_constancy:
        rgb = shades_of_grey(rgb)
    return np.ascontiguousarray(rgb.transpose(2, 0, 1))
