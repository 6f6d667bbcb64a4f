"""CT display windows: Hounsfield units -> 8-bit grey, one window per channel.

A window (level L, width W, both in HU) maps HU linearly onto 0..255: ``L - W/2`` and below is black,
``L + W/2`` and above is white (:func:`mltl_ct.phantom.apply_window`, shared with the phantom).

Presets (level / width, HU):

============  =======  =======  ==================================================================
name          level    width    shows
============  =======  =======  ==================================================================
abdomen         40       400    abdominal soft tissue, the general-purpose window
liver           60       160    narrow: small density differences in the liver parenchyma
soft-tissue     50       350    soft tissue / mediastinum
bone           400      1800    cortical and cancellous bone, calculi
lung          -600      1500    aerated lung, bowel gas
brain           40        80    grey/white matter
============  =======  =======  ==================================================================

Sources: the abdomen, liver, bone and lung values are the standard windows listed in the project's design
guide (``../shared/GUIDE.md``, "Standard windows (level / width)"), which are the common radiology
defaults (e.g. the lung window -600/1500 and bone window 400/1800 used by most PACS viewers); soft tissue
50/350 and brain 40/80 are the usual mediastinal and brain presets. Institutions vary by tens of HU, so any
window can also be given as ``{ level = 50, width = 350 }`` (or ``[50, 350]``). The ``dicom`` domain also
accepts ``"dicom"``: the file's own VOI transform (:class:`FileVOI`), as DICOM PS3.3 C.11.2 and pydicom's
``apply_voi_lut`` define it: the VOI LUT Sequence when the file has one, else WindowCenter/WindowWidth (the
first value of a multi-valued window) with its VOILUTFunction (LINEAR, the default; LINEAR_EXACT; SIGMOID).

MONOCHROME1 images (higher stored value = darker, common in CR, DX and mammography) are inverted after the
window (``invert=True``), so that in every image higher is brighter, as viewers show them.

Several windows make several channels: ``windows = ["abdomen", "liver", "bone"]`` gives 3-channel uint8
images, a common input for ImageNet-shaped backbones (set ``[input] channels = 3``). A domain's images have
1 or 3 channels, so give one window or three.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import attrs
import numpy as np

from mltl import UserError, check_image_pixels, did_you_mean

from .phantom import apply_window

__all__ = ["PRESETS", "Window", "FileVOI", "VOI_FUNCTIONS", "parse_windows", "apply_windows", "resize_hu",
           "resample_hu", "fit_square", "check_spacing", "apply_window", "to_8bit"]

PRESETS: dict[str, tuple[float, float]] = {
    "abdomen": (40.0, 400.0),
    "liver": (60.0, 160.0),
    "soft-tissue": (50.0, 350.0),
    "bone": (400.0, 1800.0),
    "lung": (-600.0, 1500.0),
    "brain": (40.0, 80.0),
}
_ALIASES = {"soft tissue": "soft-tissue", "soft_tissue": "soft-tissue", "softtissue": "soft-tissue",
            "abdominal": "abdomen", "mediastinum": "soft-tissue"}
FROM_FILE = "dicom"
VOI_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")


def to_8bit(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """``low`` .. ``high`` -> 0 .. 255, rounded to the nearest integer, clipped (uint8)."""
    values = np.asarray(values, dtype=np.float64)
    if high == low or not (math.isfinite(low) and math.isfinite(high)):
        return np.zeros(values.shape, dtype=np.uint8)
    return np.clip(np.rint((values - low) / (high - low) * 255.0), 0, 255).astype(np.uint8)


@attrs.frozen(eq=False)
class FileVOI:
    """The VOI transform a DICOM file (or one frame of it) states, applied to modality-LUT output (HU for CT).

    Either a VOI LUT (``lut``: its entries; ``first_mapped``: the input value of entry 0; ``lut_bits``: the
    LUT Descriptor's bits per entry), or a window (``center``, ``width``, ``function``) whose output runs from
    ``out_min`` to ``out_max``: the range pydicom's ``apply_windowing`` gives (the stored value range of
    BitsStored and PixelRepresentation, through the rescale or the modality LUT's bit depth). The result is
    mapped to 8 bit from that output range: a LUT's ``0 .. 2**lut_bits - 1``, a window's ``out_min ..
    out_max``, so ``to_8bit(pydicom.pixels.apply_voi_lut(hu, ds), low, high)`` equals :meth:`apply`.
    """

    center: float | None = None
    width: float | None = None
    function: str = "LINEAR"
    out_min: float = 0.0
    out_max: float = 255.0
    lut: np.ndarray | None = None
    first_mapped: int = 0
    lut_bits: int = 8

    def output_range(self) -> tuple[float, float]:
        if self.lut is not None:
            return 0.0, float(2 ** self.lut_bits - 1)
        return float(self.out_min), float(self.out_max)

    def values(self, x: np.ndarray) -> np.ndarray:
        """The VOI output in its own units (what pydicom's ``apply_voi_lut`` returns), float64."""
        x = np.asarray(x, dtype=np.float64)
        if self.lut is not None:
            # input values index the LUT from first_mapped, clamped to its first and last entries; a value
            # between two entries (after resizing) takes the nearer one
            index = np.clip(np.rint(x) - self.first_mapped, 0, len(self.lut) - 1).astype(np.int64)
            return np.asarray(self.lut, dtype=np.float64)[index]
        low, high = self.output_range()
        span = high - low
        center, width = float(self.center), float(self.width)
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            if self.function == "SIGMOID":  # PS3.3 C.11.2.1.3.1
                return span / (1 + np.exp(-4 * (x - center) / width)) + low
            if self.function == "LINEAR":  # PS3.3 C.11.2.1.2.1: the window's centre and width shifted by half a step
                center, width = center - 0.5, width - 1
            out = ((x - center) / width + 0.5) * span + low
        out[x <= center - width / 2] = low
        out[x > center + width / 2] = high
        return out

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Modality-LUT output -> uint8 (higher = brighter for MONOCHROME2)."""
        return to_8bit(self.values(x), *self.output_range())

    def describe(self) -> str:
        if self.lut is not None:
            return f"the file's VOI LUT ({len(self.lut)} entries)"
        return f"the file's window {self.center:g}/{self.width:g} ({self.function})"


@attrs.frozen
class Window:
    name: str
    level: float | None   # None: from the file (``"dicom"``)
    width: float | None

    def describe(self) -> str:
        if self.level is None:
            return "the file's own window"
        numbers = f"{self.level:g}/{self.width:g}"
        return numbers if self.name == numbers else f"{self.name} {numbers}"


def _one(spec: Any, who: str, allow_file: bool) -> Window:
    if isinstance(spec, str):
        key = _ALIASES.get(spec.strip().lower(), spec.strip().lower())
        if key == FROM_FILE and allow_file:
            return Window("dicom", None, None)
        if key not in PRESETS:
            names = list(PRESETS) + ([FROM_FILE] if allow_file else [])
            raise UserError(f'{who}: unknown window "{spec}"{did_you_mean(key, names)}; or give '
                            f"{{ level = ..., width = ... }} in HU")
        level, width = PRESETS[key]
        return Window(key, level, width)
    if isinstance(spec, dict):
        extra = set(spec) - {"level", "width", "name"}
        if extra or not {"level", "width"} <= set(spec):
            raise UserError(f"{who}: a custom window is {{ level = ..., width = ... }} in HU, got {spec}")
        level, width = spec["level"], spec["width"]
    elif isinstance(spec, (list, tuple)) and len(spec) == 2 and all(isinstance(v, (int, float)) for v in spec):
        level, width = spec
    else:
        raise UserError(f"{who}: a window is a preset name ({', '.join(PRESETS)}), "
                        f"{{ level = ..., width = ... }} or [level, width] in HU; got {spec!r}")
    if isinstance(level, bool) or isinstance(width, bool) or not isinstance(level, (int, float)) \
            or not isinstance(width, (int, float)) or not width > 0:
        raise UserError(f"{who}: window level and width must be numbers in HU with width > 0, got {spec}")
    name = spec.get("name", f"{level:g}/{width:g}") if isinstance(spec, dict) else f"{level:g}/{width:g}"
    return Window(str(name), float(level), float(width))


def parse_windows(spec: Any, *, who: str = "windows", allow_file: bool = False) -> tuple[Window, ...]:
    """One or three windows from a config value: a preset name, ``{level, width}``, ``[level, width]``, or a
    list of those. Raises :class:`UserError` for anything else, or for two windows (or four or more)."""
    is_pair = isinstance(spec, (list, tuple)) and len(spec) == 2 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in spec)
    items = [spec] if isinstance(spec, (str, dict)) or is_pair else list(spec) if isinstance(spec, (list, tuple)) else [spec]
    if not items:
        raise UserError(f"{who}: give at least one window")
    out = tuple(_one(s, who, allow_file) for s in items)
    if len(out) not in (1, 3):
        raise UserError(f"{who}: {len(out)} windows given; images have 1 channel (one window) or 3 "
                        f"(three windows, e.g. [\"abdomen\", \"liver\", \"bone\"])")
    return out


def apply_windows(hu: np.ndarray, windows: Sequence[Window], *,
                  file_window: FileVOI | tuple[float, float] | None = None, invert: bool = False,
                  who: str = "windows") -> np.ndarray:
    """HU ``(H, W)`` -> uint8 ``(H, W)`` for one window, ``(3, H, W)`` for three.

    ``file_window``: what ``"dicom"`` means for this image (a :class:`FileVOI`, or a plain ``(level, width)``
    applied like a preset). ``invert``: a MONOCHROME1 image, inverted after the window (255 - grey)."""
    planes = []
    for w in windows:
        if w.level is not None:
            plane = apply_window(hu, w.level, w.width)
        elif isinstance(file_window, FileVOI):
            plane = file_window.apply(hu)
        elif file_window is not None:
            plane = apply_window(hu, *file_window)
        else:
            raise UserError(f'{who}: window "dicom" asked for but the file has no VOI LUT Sequence and no '
                            f"WindowCenter/WindowWidth; name a preset or give {{ level, width }}")
        planes.append(255 - plane if invert else plane)
    return planes[0] if len(planes) == 1 else np.stack(planes)


def resize_hu(hu: np.ndarray, size: int) -> np.ndarray:
    """A 2D HU array resized to ``size`` x ``size`` (Pillow bilinear on float32, antialiased when shrinking),
    before windowing, so every window sees the same resampled values."""
    from PIL import Image

    hu = np.asarray(hu, dtype=np.float32)
    if hu.shape == (size, size):
        return hu
    return np.asarray(Image.fromarray(np.ascontiguousarray(hu)).resize((size, size), Image.Resampling.BILINEAR),
                      dtype=np.float32)


def resample_hu(hu: np.ndarray, spacing: tuple[float, float], target_mm: float, *, prefix: str = "",
                what: str = "an image resampled") -> np.ndarray:
    """A 2D array with pixel ``spacing`` (row, column) in mm resampled to ``target_mm`` square pixels
    (Pillow bilinear on float32, antialiased when shrinking): ``round(rows * row_mm / target_mm)`` rows,
    ``round(cols * col_mm / target_mm)`` columns (at least 1 each). The result's size is checked against the
    pixel budget first (:func:`mltl.check_image_pixels`; ``prefix`` and ``what`` name it in the message)."""
    from PIL import Image

    hu = np.asarray(hu, dtype=np.float32)
    rows = max(1, int(round(hu.shape[0] * spacing[0] / target_mm)))
    cols = max(1, int(round(hu.shape[1] * spacing[1] / target_mm)))
    check_image_pixels(cols, rows, prefix, f"{what} to {target_mm:g} mm pixels")
    if (rows, cols) == hu.shape:
        return hu
    return np.asarray(Image.fromarray(np.ascontiguousarray(hu)).resize((cols, rows), Image.Resampling.BILINEAR),
                      dtype=np.float32)


def fit_square(hu: np.ndarray, size: int, fill: float) -> np.ndarray:
    """``hu`` centre-cropped or padded with ``fill`` to ``size`` x ``size`` (no scaling: a pixel keeps its mm)."""
    out = np.full((size, size), fill, dtype=np.float32)
    rows, cols = hu.shape
    r0, c0 = max(0, (rows - size) // 2), max(0, (cols - size) // 2)   # crop offsets in the source
    R0, C0 = max(0, (size - rows) // 2), max(0, (size - cols) // 2)   # pad offsets in the output
    h, w = min(rows, size), min(cols, size)
    out[R0:R0 + h, C0:C0 + w] = hu[r0:r0 + h, c0:c0 + w]
    return out


def check_spacing(spacing_mm: object, who: str) -> float | None:
    """The ``spacing_mm`` option: None (no resampling) or a pixel size in mm greater than 0."""
    if spacing_mm is None:
        return None
    if isinstance(spacing_mm, bool) or not isinstance(spacing_mm, (int, float)) or not math.isfinite(spacing_mm) \
            or spacing_mm <= 0:
        raise UserError(f"{who}: spacing_mm must be a pixel size in mm greater than 0 (e.g. 0.7), or left out "
                        f"for no resampling; got {spacing_mm!r}")
    return float(spacing_mm)
