"""Decoding one image file into mltl's uint8 pixels, whatever the file really is.

Used by the ``image-folder`` and ``csv-manifest`` domains and by ``mltl predict`` (so new images get exactly
the training preprocessing). The rules, in order:

* **Decoded by content, not by name.** Pillow identifies the format from the file's first bytes, so a PNG
  saved as ``x.jpg`` or a BMP saved as ``x.png`` loads correctly. A DICOM file (``DICM`` at byte 128) is
  named as such, with the domain to use instead.
* **First frame** of a multi-frame file (animated GIF/PNG, multi-page TIFF).
* **EXIF orientation** is applied (a phone photo stored sideways is turned upright).
* **16-bit and 32-bit grey, and float images** (``I;16``, ``I``, ``F``: 16-bit PNG/TIFF from scanners)
  are scaled to 8 bit linearly from each image's own minimum to its maximum; a constant image becomes 0.
  Use a CT domain (``dicom``, ``nifti``) with a HU window when the absolute values matter.
* **Transparency** (RGBA, LA, and palette or grey images with a transparent colour) is composited onto
  black: a fully transparent pixel becomes black, a half-transparent one half its brightness. Stored
  colours under a transparent pixel are arbitrary (often white), so dropping the alpha channel would let
  them in.
* **Palette, 1-bit, CMYK, YCbCr** images are converted to RGB, then to grey with ITU-R BT.601 luma
  (Pillow's ``L`` conversion, the same weights ``mltl.data.domain.prepare_images`` uses) when one channel is
  wanted.
* Resized to ``size`` x ``size`` with Pillow's bilinear filter (antialiased when shrinking), without
  keeping the aspect ratio.

A file that is empty, truncated, not an image, or too large to decode safely raises :class:`UserError`
naming the file and the reason. "Too large" is judged from the header before any pixel is decoded
(:mod:`mltl.data.limits`: ``MLTL_MAX_IMAGE_PIXELS``, ``MLTL_MAX_DECODED_BYTES``), so a tiny file that
decompresses to gigabytes is refused at once; 16-bit and float images are converted a block of rows at a
time, and a float image with NaN pixels is refused, naming the first one.
"""

from __future__ import annotations

import struct
import warnings
from pathlib import Path

import numpy as np

from ..errors import UserError
from .limits import check_bytes, check_pixels

__all__ = ["IMAGE_SUFFIXES", "read_image", "decode_image", "is_dicom_file"]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp"}
"""Suffixes an image folder is searched for (case-insensitive). The content decides the format."""

_HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def is_dicom_file(path: Path) -> bool:
    """True when the file carries the DICOM Part 10 preamble (``DICM`` at byte 128)."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _why_unreadable(path: Path, exc: BaseException) -> str:
    try:
        size = path.stat().st_size
    except OSError as err:
        return f"cannot open the file ({err.strerror or err})"
    if size == 0:
        return "the file is empty (0 bytes)"
    if is_dicom_file(path):
        return 'it is a DICOM file; read DICOM with the "dicom" domain (plugin mltl-ct)'
    text = str(exc)
    if "truncat" in text.lower() or isinstance(exc, EOFError):
        return f"the image file is truncated ({size} bytes; an interrupted copy or download?)"
    if "cannot identify image file" in text:
        with open(path, "rb") as f:
            head = f.read(8)
        return f"not an image format Pillow can decode (the file starts with {head!r})"
    return text.replace(str(path), "").strip(" :'\"") or type(exc).__name__


_ROWS = 512  # rows converted at a time, so a large image never has a float copy of all its pixels


def _to_8bit(im, path: Path, who: str):
    """16/32-bit and float grey -> 8 bit, from the image's own minimum to its maximum; NaN is refused."""
    from PIL import Image

    raw = np.asarray(im)
    if raw.ndim != 2:
        raw = np.asarray(im, dtype=np.float64)
    lo = hi = None
    floating = np.issubdtype(raw.dtype, np.floating)
    for r in range(0, raw.shape[0], _ROWS):
        arr = raw[r:r + _ROWS].astype(np.float64)
        if floating:
            nan = np.isnan(arr)
            if nan.any():
                row, col = (int(v[0]) for v in np.nonzero(nan))
                count = int(np.count_nonzero(np.isnan(raw)))
                raise UserError(f"{who}: cannot read image {path}: {count} pixel(s) are NaN (not a number; the "
                                f"first at row {r + row}, column {col}); replace them with a value before "
                                f"saving, or remove the file")
            arr = arr[np.isfinite(arr)]
        if arr.size:
            a, b = float(arr.min()), float(arr.max())
            lo, hi = (a, b) if lo is None else (min(lo, a), max(hi, b))
    lo, hi = (lo, hi) if lo is not None else (0.0, 0.0)
    out = np.empty(raw.shape, dtype=np.uint8)
    for r in range(0, raw.shape[0], _ROWS):  # the same arithmetic as on the whole array, a block at a time
        arr = np.nan_to_num(raw[r:r + _ROWS].astype(np.float64), nan=lo, posinf=hi, neginf=lo)
        scaled = (arr - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(arr)
        out[r:r + _ROWS] = np.clip(scaled, 0, 255).round().astype(np.uint8)
    return Image.fromarray(out)


def _flatten_alpha(im):
    """RGBA/LA/transparent palette or grey -> RGB or L, composited on black."""
    from PIL import Image

    if im.mode == "P" or (im.mode in ("L", "RGB") and "transparency" in im.info):
        im = im.convert("RGBA")
    if im.mode in ("RGBa", "La"):  # premultiplied: already composited on black
        return im.convert(im.mode[0] if im.mode == "La" else "RGB")
    if im.mode not in ("RGBA", "LA"):
        return im
    raw = np.asarray(im)
    out = np.empty(raw.shape[:2] + (raw.shape[2] - 1,), dtype=np.uint8)
    for r in range(0, raw.shape[0], _ROWS):  # a block at a time: no float copy of the whole image
        arr = raw[r:r + _ROWS].astype(np.float32)
        alpha = arr[..., -1:] / 255.0
        out[r:r + _ROWS] = np.rint(arr[..., :-1] * alpha).astype(np.uint8)
    return Image.fromarray(out[..., 0] if im.mode == "LA" else out, "L" if im.mode == "LA" else "RGB")


def _bytes_per_pixel(mode: str) -> int:
    from PIL import Image

    if mode.startswith("I;16"):
        return 2
    try:
        bands = Image.getmodebands(mode)
    except (KeyError, ValueError):
        bands = 4
    return bands * (4 if mode in ("I", "F") else 1)


def check_image_header(im, path: Path, who: str) -> None:
    """Refuse, from the header alone (before any pixel is decoded), an image over the memory limits."""
    width, height = im.size
    prefix = f"{who}: cannot read image {path}: "
    check_pixels(width, height, prefix, "the image")
    check_bytes(width * height * _bytes_per_pixel(im.mode), prefix, f"the {width}x{height} {im.mode} image")


def decode_image(path: Path, *, channels: int, who: str = "image") -> np.ndarray:
    """The file at its own size: uint8 ``(H, W)`` for ``channels=1``, ``(H, W, 3)`` for 3."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    try:
        with warnings.catch_warnings():  # the size is checked below, against mltl's own limits
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(path)
        with opened as im:
            im.seek(0)
            check_image_header(im, path, who)
            im.load()
            im = ImageOps.exif_transpose(im) or im
            if im.mode in _HIGH_DEPTH_MODES:
                im = _to_8bit(im, path, who)
            im = _flatten_alpha(im)
            arr = np.asarray(im.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, struct.error, IndexError,
            Image.DecompressionBombError) as exc:
        raise UserError(f"{who}: cannot read image {path}: {_why_unreadable(path, exc)}; "
                        f"remove or replace the file") from None
    except MemoryError:
        raise UserError(f"{who}: cannot read image {path}: not enough memory to decode it; downscale it, or "
                        f"remove the file") from None
    return arr


def read_image(path: Path, *, channels: int, size: int, who: str = "image") -> np.ndarray:
    """One image file as uint8 ``(size, size)`` (grey, ``channels=1``) or ``(3, size, size)``.

    See the module docstring for how formats, bit depths and transparency are handled.
    """
    from PIL import Image

    if channels not in (1, 3):
        raise UserError(f"{who}: channels must be 1 or 3, got {channels}")
    arr = decode_image(path, channels=channels, who=who)
    if arr.shape[:2] != (size, size):
        im = Image.fromarray(arr, "L" if channels == 1 else "RGB")
        arr = np.asarray(im.resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)
    return arr if channels == 1 else np.ascontiguousarray(arr.transpose(2, 0, 1))
