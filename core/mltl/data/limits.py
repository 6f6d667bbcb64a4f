"""How much memory one input file may take once decoded, checked from its header before decoding.

A few kilobytes of compressed data can describe gigabytes of pixels (a 13000 x 13000 PNG of zeros is under
1 MB; a 900^3 NIfTI volume of zeros is 6 MB), so every reader estimates the decoded size from the file's
header (Pillow's size and mode, nibabel's shape, the ``.npy`` headers inside an ``.npz``, DICOM Rows,
Columns and NumberOfFrames) and refuses, in one line, a file over either limit:

* ``MLTL_MAX_IMAGE_PIXELS`` (default 100 million): pixels in one 2D image or DICOM frame. mltl trains on
  images of at most a few hundred pixels a side, so nothing larger is useful, and a larger picture from a
  tiny file is almost always a decompression bomb;
* ``MLTL_MAX_DECODED_BYTES`` (default 2 GiB; ``512M``, ``4G`` and the like are accepted): the decoded
  size of one file: the pixels of an image as stored (bands x bytes per sample), the arrays of a MedMNIST
  ``.npz`` as their headers describe them, a CT volume or DICOM file as float32 Hounsfield units.

The defaults admit every real file the toolkit is meant for (a 512 x 512 x 1024 CT volume is 1 GiB as
float32; MedMNIST up to 128 px); raise them for bigger ones. :func:`short_repr` and :func:`few` keep error
messages to one short line whatever the input holds.
"""

from __future__ import annotations

import math
import os
import re
import reprlib
from collections.abc import Iterable, Sequence

from ..errors import UserError

__all__ = ["ENV_BYTES", "ENV_PIXELS", "max_decoded_bytes", "max_image_pixels", "human_bytes", "check_bytes",
           "check_pixels", "short_repr", "few"]

ENV_BYTES = "MLTL_MAX_DECODED_BYTES"
ENV_PIXELS = "MLTL_MAX_IMAGE_PIXELS"
DEFAULT_MAX_DECODED_BYTES = 2 * 1024**3
DEFAULT_MAX_IMAGE_PIXELS = 100_000_000
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def _env_limit(name: str, default: int, *, sizes: bool) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?" if sizes else r"(\d+)()", raw.replace("_", ""),
                     flags=re.IGNORECASE)
    value = int(float(m.group(1)) * _UNITS[m.group(2).upper()]) if m else 0
    if value < 1:
        example = "2147483648 or 2G" if sizes else "100000000"
        raise UserError(f"{name}={short_repr(raw, 40)}: not a positive {'size in bytes' if sizes else 'number'} "
                        f"(e.g. {example})")
    return value


def max_decoded_bytes() -> int:
    """The limit on one file's decoded size, in bytes (``MLTL_MAX_DECODED_BYTES``, default 2 GiB)."""
    return _env_limit(ENV_BYTES, DEFAULT_MAX_DECODED_BYTES, sizes=True)


def max_image_pixels() -> int:
    """The limit on the pixels of one 2D image (``MLTL_MAX_IMAGE_PIXELS``, default 100 million)."""
    return _env_limit(ENV_PIXELS, DEFAULT_MAX_IMAGE_PIXELS, sizes=False)


def human_bytes(n: float) -> str:
    for unit, size in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} bytes"


def check_bytes(nbytes: int, prefix: str, what: str) -> None:
    """Refuse (one line, starting with ``prefix``) when ``what`` would decode to more than the byte limit."""
    limit = max_decoded_bytes()
    if nbytes > limit:
        raise UserError(f"{prefix}{what} would take about {human_bytes(nbytes)} once decoded, over the limit of "
                        f"{human_bytes(limit)} per file; crop or downsample it, or raise the limit with "
                        f"{ENV_BYTES}={math.ceil(nbytes / 1024**3)}G")


def check_pixels(width: int, height: int, prefix: str, what: str) -> None:
    """Refuse (one line) a 2D image of more pixels than the pixel limit."""
    limit = max_image_pixels()
    if width * height > limit:
        raise UserError(f"{prefix}{what} is {width}x{height} pixels ({width * height / 1e6:.0f} million), over "
                        f"the limit of {limit / 1e6:g} million pixels per image; downscale it, or raise the "
                        f"limit with {ENV_PIXELS}")


_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = 60
_repr.maxlist = _repr.maxtuple = _repr.maxdict = _repr.maxset = 6


def short_repr(value: object, limit: int = 60) -> str:
    """``repr(value)``, cut to about ``limit`` characters (never builds the repr of a huge container)."""
    text = _repr.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def few(items: Iterable[object] | Sequence[object], k: int = 5) -> str:
    """``"a, b, c, d, e and 12 more"``: the first ``k`` items, then a count."""
    items = list(items) if not isinstance(items, Sequence) else items
    head = ", ".join(str(x) if len(str(x)) <= 60 else str(x)[:57] + "..." for x in items[:k])
    return head + (f" and {len(items) - k} more" if len(items) > k else "")


#: the names plugins use (``from mltl import check_decoded_bytes, check_image_pixels``)
check_decoded_bytes = check_bytes
check_image_pixels = check_pixels
