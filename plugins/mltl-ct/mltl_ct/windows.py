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
accepts ``"dicom"``: the file's own first WindowCenter/WindowWidth.

Several windows make several channels: ``windows = ["abdomen", "liver", "bone"]`` gives 3-channel uint8
images, a common input for ImageNet-shaped backbones (set ``[input] channels = 3``). A domain's images have
1 or 3 channels, so give one window or three.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
import numpy as np

from mltl import UserError, did_you_mean

from .phantom import apply_window

__all__ = ["PRESETS", "Window", "parse_windows", "apply_windows", "resize_hu", "apply_window"]

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


def apply_windows(hu: np.ndarray, windows: Sequence[Window], *, file_window: tuple[float, float] | None = None,
                  who: str = "windows") -> np.ndarray:
    """HU ``(H, W)`` -> uint8 ``(H, W)`` for one window, ``(3, H, W)`` for three."""
    planes = []
    for w in windows:
        if w.level is None:
            if file_window is None:
                raise UserError(f'{who}: window "dicom" asked for but the file has no WindowCenter/WindowWidth; '
                                f"name a preset or give {{ level, width }}")
            level, width = file_window
        else:
            level, width = w.level, w.width
        planes.append(apply_window(hu, level, width))
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
