"""Seeded synthetic axial abdominal CT slices in Hounsfield units, with renal and biliary lesions.

Built-in demo data: every call is deterministic given its seed, needs no download, and is cheap enough to
make thousands of slices in seconds.

Geometry. A slice covers a square field of view of :data:`FOV_MM` millimetres whatever its pixel size, so
every length below is in millimetres and maps to ``size / FOV_MM`` pixels. Image x grows to the image's
right, which is the *patient's left* (radiological convention: the liver is on the image's left); image y
grows downwards, from anterior (top) to posterior (bottom, where the spine and the table are).

Each slice is drawn at a random craniocaudal level (0 = upper abdomen at T12, big liver, spleen and
stomach; 1 = lower abdomen at L3, liver tip, more bowel), in one of two contrast phases (unenhanced or
portal venous) that is applied consistently to every enhancing organ. Structures are painted as
anti-aliased, partial-volume-conserving shapes over one another (later ones cover earlier ones), then
correlated quantum noise and a small Gaussian point-spread function are applied.

Classes (:data:`CLASSES`): ``normal`` (no lesion, but with lesion mimics: gallbladder, vessels, bowel
fluid and gas, ribs, aortic calcification, renal sinus fat), ``cyst`` (simple cysts of the liver or the
kidney), ``calculi`` (renal stones or calcified gallstones), ``tumour`` (renal cell carcinoma),
``caroli-focal`` (Caroli disease: a few large saccular bile-duct dilatations in one segment, joined by
fusiform ducts, often holding stones, with the central dot sign) and ``caroli-diffuse`` (Caroli syndrome:
many smaller saccules throughout the liver, hepatic fibrosis, polycystic-looking kidneys, splenomegaly).
The rare Caroli classes are built from the common findings' primitives (water-density cysts, dense
calculi) in another arrangement, so a network that learnt ``cyst`` and ``calculi`` has features for them.
``level-upper``, ``level-mid`` and ``level-lower`` are lesion-free slices from one third of the
craniocaudal range each: a CT task that shares none of those primitives (a negative control).

Quantum noise is set per pixel of :data:`NOISE_REFERENCE_MM`; larger pixels average it down (SD in
proportion to 1 / pixel size), as a coarse reconstruction of the same scan would.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

__all__ = ["CLASSES", "FOV_MM", "LEVEL_CLASSES", "WINDOWS", "apply_window", "generate", "slice_hu"]

CLASSES: tuple[str, ...] = ("normal", "cyst", "calculi", "tumour", "caroli-focal", "caroli-diffuse",
                             "level-upper", "level-mid", "level-lower")
"""Class names, in label order."""

LEVEL_CLASSES: tuple[str, ...] = ("level-upper", "level-mid", "level-lower")
"""Lesion-free slices from one third of the craniocaudal range each (T12-L1, L1-L2, L2-L3): a CT task that
shares no lesion primitive with the others (the demo's negative-control intermediate stage)."""

WINDOWS: dict[str, tuple[float, float]] = {
    "abdomen": (40.0, 400.0),
    "liver": (60.0, 160.0),
    "soft-tissue": (50.0, 350.0),
    "bone": (400.0, 1800.0),
    "lung": (-600.0, 1500.0),
}
"""Display windows, name -> (level, width) in HU."""

FOV_MM = 350.0
"""Field of view across the image, in millimetres, whatever the pixel size."""

MIN_SIZE_PX = 16
HU_AIR = -1000.0
HU_FLOOR, HU_CEILING = -1024.0, 3071.0  # the range a 12-bit CT scanner stores

UNENHANCED, PORTAL = "unenhanced", "portal"
PORTAL_PHASE_PROBABILITY = 0.5
SLICE_LEVEL_RANGE = (0.03, 0.97)  # 0 = T12 (upper abdomen) .. 1 = L3

# Tissue attenuation in HU, (low, high); one value is drawn per slice in this range. Entries keyed by
# phase enhance with intravenous contrast.
TISSUE_HU: dict[str, tuple[float, float] | dict[str, tuple[float, float]]] = {
    "skin": (20.0, 50.0),
    "subcutaneous_fat": (-120.0, -60.0),
    "visceral_fat": (-115.0, -75.0),
    "muscle": (35.0, 55.0),
    "bone_cortex": (700.0, 1900.0),
    "bone_cancellous": (200.0, 400.0),
    "rib_marrow": (120.0, 300.0),
    "costal_cartilage": (80.0, 250.0),
    "csf": (5.0, 30.0),
    "bile": (0.0, 20.0),
    "urine": (0.0, 15.0),
    "bowel_fluid": (0.0, 30.0),
    "table": (-250.0, 50.0),
    "liver": {UNENHANCED: (50.0, 65.0), PORTAL: (100.0, 130.0)},
    "spleen": {UNENHANCED: (40.0, 50.0), PORTAL: (110.0, 120.0)},
    "kidney": {UNENHANCED: (30.0, 45.0), PORTAL: (150.0, 200.0)},
    "aorta": {UNENHANCED: (35.0, 50.0), PORTAL: (130.0, 190.0)},
    "vein": {UNENHANCED: (35.0, 50.0), PORTAL: (130.0, 180.0)},
    "bowel_wall": {UNENHANCED: (30.0, 45.0), PORTAL: (70.0, 110.0)},
    "pancreas": {UNENHANCED: (35.0, 50.0), PORTAL: (80.0, 110.0)},
}
# Intrahepatic vessels without contrast are this much darker than the liver (blood is ~40 HU).
UNENHANCED_LIVER_VESSEL_DROP_HU = (8.0, 22.0)

# Anatomy that varies in count or partial volume.
RIBS_PER_SIDE = (0, 2)
RIB_OBLIQUITY = (0.3, 0.6)  # ribs are cut obliquely: partial volume lowers their cortex
KIDNEY_HALF_EXTENT = 0.48  # half the craniocaudal length of a kidney, in slice-level units

# Lesions. Sizes lean to the upper end of what is clinically common, so that at 64 pixels (5.5 mm per
# pixel) most lesions stay visible; the smallest remain sub-pixel and partial-volumed.
CYST_DIAMETER_MM = (12.0, 50.0)
CYST_HU = (0.0, 20.0)
CYST_COUNT = (1, 4)
POLYCYSTIC_CYST_DIAMETER_MM = (4.0, 16.0)
CALCULUS_DIAMETER_MM = (5.0, 16.0)
URIC_ACID_STONE_HU = (200.0, 500.0)
CALCIUM_STONE_HU = (600.0, 1500.0)
CALCIUM_STONE_PROBABILITY = 0.8  # the others are uric acid
CALCULUS_COUNT = (1, 4)
HYDRONEPHROSIS_PROBABILITY = 0.3
STAGHORN_PROBABILITY = 0.25
TUMOUR_DIAMETER_MM = (15.0, 60.0)
TUMOUR_HU = {UNENHANCED: (20.0, 40.0), PORTAL: (80.0, 150.0)}
NECROSIS_HU = (5.0, 25.0)
HEPATIC_CYST_PROBABILITY = 0.5  # a ``cyst`` slice's cysts are in the liver, else in the kidneys
GALLSTONE_PROBABILITY = 0.5  # a ``calculi`` slice's stones are in the gallbladder, else in the kidneys
GALLSTONE_COUNT = (1, 5)
GALLSTONE_HU = (150.0, 1000.0)  # calcified (pigment or mixed) stones; pure cholesterol ones are not drawn
# Caroli disease: saccular (cyst-like) dilatations of the intrahepatic bile ducts joined by fusiform ducts,
# often with the central dot sign and with intraductal stones (hepatolithiasis): the same primitives as
# the common findings above, round water-density cysts and dense calculi, in a rarer arrangement.
DUCT_RADIUS_MM = (1.5, 3.5)
FOCAL_SACCULES = (3, 6)  # in one segment
FOCAL_SACCULE_DIAMETER_MM = (15.0, 35.0)
FOCAL_SEGMENT_RADIUS_MM = (15.0, 30.0)
DIFFUSE_SACCULES = (8, 16)  # throughout both lobes
DIFFUSE_SACCULE_DIAMETER_MM = (8.0, 18.0)
FOCAL_STONE_PROBABILITY = 0.6  # per saccule: hepatolithiasis is common in Caroli disease proper (focal)
DIFFUSE_STONE_PROBABILITY = 0.1  # per saccule: Caroli syndrome shows fibrosis and renal cysts instead
INTRADUCTAL_STONE_DIAMETER_MM = (5.0, 10.0)
INTRADUCTAL_STONE_HU = (250.0, 1000.0)
POLYCYSTIC_KIDNEY_PROBABILITY = 0.85  # caroli-diffuse: Caroli syndrome with renal cystic disease
CENTRAL_DOT_RADIUS_MM = (0.8, 1.8)
SOFT_TISSUE_DOT_HU = (40.0, 55.0)  # the portal radicle of the central dot sign without contrast

# Image formation.
NOISE_SD_HU = (10.0, 20.0)  # per pixel of NOISE_REFERENCE_MM; larger pixels average it down
NOISE_REFERENCE_MM = 1.4
PSF_SIGMA_MM = (0.7, 1.5)
PIXEL_SIGMA_PX = 0.45  # extra blur standing for the pixel footprint, so small images do not alias
TEXTURE_COARSE_MM = 7.0
TEXTURE_FINE_MM = 2.5


# --------------------------------------------------------------------------------------------------------
# Public API


def slice_hu(label: str, size: int, rng: np.random.Generator,
             levels: tuple[float, float] = SLICE_LEVEL_RANGE) -> np.ndarray:
    """One ``size`` x ``size`` float32 slice in HU for class ``label``, at a craniocaudal level drawn uniformly
    from ``levels`` (0 = T12, upper abdomen, .. 1 = L3; see :data:`SLICE_LEVEL_RANGE`).

    ``rng`` is the only source of randomness: the same generator state gives the same slice.
    """
    return _render(label, size, rng, levels).hu


def apply_window(hu: np.ndarray, level: float, width: float) -> np.ndarray:
    """HU -> uint8 with the standard linear window (values below level-width/2 -> 0, above level+width/2 -> 255).

    In between, grey = (hu - (level - width/2)) / width * 255, rounded to the nearest integer.
    """
    if not width > 0:
        raise ValueError(f"window width must be positive, got {width}")
    low = level - width / 2.0
    grey = (np.asarray(hu, dtype=np.float64) - low) * (255.0 / width)
    return np.rint(np.clip(grey, 0.0, 255.0)).astype(np.uint8)


def generate(
    classes: Sequence[str],
    images_per_class: int,
    size: int = 64,
    seed: int = 0,
    window: tuple[float, float] = WINDOWS["abdomen"],
    levels: tuple[float, float] = SLICE_LEVEL_RANGE,
) -> tuple[np.ndarray, np.ndarray]:
    """Returns (images uint8 of shape (N, size, size), labels int64 of shape (N,)), N = len(classes)*images_per_class,
    labels index into `classes` in the order given. Image i of class c is drawn from its own Generator seeded from
    numpy.random.SeedSequence([seed, CLASSES.index(name), i]) so asking for more images per class keeps the first
    ones identical, and the same seed always gives byte-identical output. Unknown class names raise ValueError naming
    the bad name and listing CLASSES.

    Images are grouped by class, in the order of ``classes``. ``window`` is (level, width) in HU, see
    :data:`WINDOWS` and :func:`apply_window`. ``levels`` is the craniocaudal range the slices are drawn from
    (0 = T12 .. 1 = L3), within :data:`SLICE_LEVEL_RANGE`: e.g. (0.03, 0.45) for slices through the liver.
    """
    names = list(classes)
    for name in names:
        _check_label(name)
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate class names in {names}")
    if images_per_class < 0:
        raise ValueError(f"images_per_class must be >= 0, got {images_per_class}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    _check_size(size)
    _check_levels(levels)
    level, width = window
    images = np.empty((len(names) * images_per_class, size, size), dtype=np.uint8)
    labels = np.repeat(np.arange(len(names), dtype=np.int64), images_per_class)
    for c, name in enumerate(names):
        class_index = CLASSES.index(name)
        for i in range(images_per_class):
            rng = np.random.default_rng(np.random.SeedSequence([seed, class_index, i]))
            images[c * images_per_class + i] = apply_window(slice_hu(name, size, rng, levels), level, width)
    return images, labels


def _check_levels(levels: tuple[float, float]) -> None:
    low, high = SLICE_LEVEL_RANGE
    if not (len(levels) == 2 and low <= levels[0] < levels[1] <= high):
        raise ValueError(f"levels must be (low, high) with {low} <= low < high <= {high}, got {tuple(levels)}")


def _check_label(label: str) -> None:
    if label not in CLASSES:
        raise ValueError(f"unknown phantom class {label!r}; expected one of {', '.join(CLASSES)}")


def _check_size(size: int) -> None:
    if int(size) != size or size < MIN_SIZE_PX:
        raise ValueError(f"size must be an integer >= {MIN_SIZE_PX}, got {size}")


# --------------------------------------------------------------------------------------------------------
# Drawing primitives


_Box = tuple[slice, slice]  # (rows, columns) of the image


@dataclass
class _Mask:
    """Fractional coverage (0..1) of one shape over the pixels of ``box``."""

    box: _Box
    weight: np.ndarray

    def times(self, layer: np.ndarray) -> _Mask:
        """This shape restricted to a full-image coverage layer (e.g. "inside the liver")."""
        return _Mask(self.box, self.weight * layer[self.box])


class _Canvas:
    """An image in HU plus the pixel grid in millimetres, with anti-aliased shape painting."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.px = FOV_MM / size  # mm per pixel
        self.axis = (np.arange(size) + 0.5 - size / 2.0) * self.px  # pixel centres, mm
        self.hu = np.full((size, size), HU_AIR)

    def _box(self, x0: float, x1: float, y0: float, y1: float) -> _Box | None:
        half, px, n = FOV_MM / 2.0, self.px, self.size
        j0, j1 = max(int((x0 + half) / px) - 1, 0), min(int((x1 + half) / px) + 2, n)
        i0, i1 = max(int((y0 + half) / px) - 1, 0), min(int((y1 + half) / px) + 2, n)
        if j0 >= j1 or i0 >= i1:
            return None
        return slice(i0, i1), slice(j0, j1)

    def _grid(self, box: _Box) -> tuple[np.ndarray, np.ndarray]:
        return self.axis[box[1]][None, :], self.axis[box[0]][:, None]

    def _coverage(self, box: _Box, outside_mm: np.ndarray, area_mm2: float, small: bool) -> _Mask:
        """Coverage from a signed distance to the edge; tiny shapes keep their true area (partial volume)."""
        weight = outside_mm * (-1.0 / self.px)
        weight += 0.5
        np.maximum(weight, 0.0, out=weight)
        np.minimum(weight, 1.0, out=weight)
        if small:
            total = float(weight.sum())
            area_px = area_mm2 / self.px**2
            if total > area_px > 0:
                weight *= area_px / total
        return _Mask(box, weight)

    def ellipse(
        self,
        cx: float,
        cy: float,
        a: float,
        b: float,
        angle: float = 0.0,
        wobble: Sequence[tuple[int, float, float]] = (),
    ) -> _Mask | None:
        """Ellipse centred at (cx, cy) mm with semi-axes a (along ``angle``, radians) and b, mm.

        ``wobble``: (harmonic k, relative amplitude, phase) terms that modulate the radius with the polar
        angle, for irregular, lobulated outlines.
        """
        return self.nested_ellipses(cx, cy, a, b, angle, wobble, (0.0,))[0]

    def nested_ellipses(
        self,
        cx: float,
        cy: float,
        a: float,
        b: float,
        angle: float,
        wobble: Sequence[tuple[int, float, float]],
        insets_mm: Sequence[float],
    ) -> list[_Mask | None]:
        """The :meth:`ellipse` and copies of it shrunk by each inset (mm): a wall and its lumen, a
        cortex and its marrow. Cheaper than separate ellipses: the distance field is computed once.
        """
        a, b = max(a, 1e-3), max(b, 1e-3)
        reach = max(a, b)
        for _, amp, _ in wobble:
            reach += abs(amp) * max(a, b)
        reach += self.px
        box = self._box(cx - reach, cx + reach, cy - reach, cy + reach)
        if box is None:
            return [None] * len(insets_mm)
        x, y = self._grid(box)
        dx, dy = x - cx, y - cy
        if angle:
            c, s = math.cos(angle), math.sin(angle)
            u, v = c * dx + s * dy, c * dy - s * dx
        else:
            u, v = dx, dy
        u2, v2 = u * u, v * v
        q = u2 * (1.0 / (a * a)) + v2 * (1.0 / (b * b))
        np.sqrt(q, out=q)  # 1 on the ellipse
        if wobble or max(a, b) > 1.25 * min(a, b):
            # Signed distance along the ray from the centre: rho - rho / q, with rho / q the centre-to-edge
            # distance. The tiny epsilon makes that min(a, b) at the very centre instead of 0 / 0.
            eps = 1e-6 * min(a, b)
            rho = np.sqrt(u2 + v2 + eps * eps)
            edge = rho / (q + 1e-6)
            if wobble:
                theta = np.arctan2(v, u)
                edge *= 1.0 + sum(amp * np.cos(k * theta + phase) for k, amp, phase in wobble)
            outside = rho - edge
        else:  # near-circular: the same distance to first order, cheaper
            outside = (q - 1.0) * math.sqrt(a * b)
        masks: list[_Mask | None] = []
        for inset in insets_mm:
            ai, bi = a - inset, b - inset
            if ai <= 0 or bi <= 0:
                masks.append(None)
                continue
            masks.append(self._coverage(box, outside + inset if inset else outside, math.pi * ai * bi,
                                        min(ai, bi) < 1.5 * self.px))
        return masks

    def tube(self, xs: Sequence[float], ys: Sequence[float], radii: Sequence[float]) -> _Mask | None:
        """A polyline through (xs, ys) mm with a radius (mm) at each vertex, linearly varying between them."""
        reach = max(radii) + self.px
        box = self._box(min(xs) - reach, max(xs) + reach, min(ys) - reach, max(ys) + reach)
        if box is None:
            return None
        x, y = self._grid(box)
        outside = None
        area = 0.0
        for k in range(len(xs) - 1):
            x0, y0, r0 = xs[k], ys[k], radii[k]
            ex, ey, dr = xs[k + 1] - x0, ys[k + 1] - y0, radii[k + 1] - r0
            length2 = ex * ex + ey * ey
            if length2 < 1e-12:
                t = np.zeros(1)
            else:
                t = (x - x0) * (ex / length2) + (y - y0) * (ey / length2)
                np.maximum(t, 0.0, out=t)
                np.minimum(t, 1.0, out=t)
            d = np.hypot(x - (x0 + t * ex), y - (y0 + t * ey)) - (r0 + t * dr)
            outside = d if outside is None else np.minimum(outside, d)
            area += math.sqrt(length2) * (r0 + r0 + dr)
        area += math.pi * radii[-1] ** 2
        return self._coverage(box, outside, area, max(radii) < 1.5 * self.px)

    def paint(self, mask: _Mask | None, value: float | np.ndarray) -> None:
        """Fill the shape with ``value`` HU (a scalar, or an array over ``mask.box``)."""
        if mask is None:
            return
        region = self.hu[mask.box]
        region += mask.weight * (value - region)

    def part_anterior_to(self, mask: _Mask | None, y_level: float) -> _Mask | None:
        """The part of ``mask`` anterior to (above, in the image) the line y = y_level mm."""
        if mask is None:
            return None
        y = self.axis[mask.box[0]][:, None]
        return _Mask(mask.box, mask.weight * np.clip(0.5 - (y - y_level) / self.px, 0.0, 1.0))

    def layer(self) -> np.ndarray:
        """A full-image coverage layer, initially empty."""
        return np.zeros((self.size, self.size))

    @staticmethod
    def add_to(layer: np.ndarray, mask: _Mask | None) -> None:
        if mask is not None:
            np.maximum(layer[mask.box], mask.weight, out=layer[mask.box])

    @staticmethod
    def cut_from(layer: np.ndarray, mask: _Mask | None) -> None:
        if mask is not None:
            layer[mask.box] *= 1.0 - mask.weight


def _gaussian_matrix(size: int, sigma_px: float) -> np.ndarray:
    """Rows sum to 1: ``K @ img @ K.T`` is a separable Gaussian blur (renormalised at the border).

    ``sigma_px`` is rounded to 1/50 pixel so that the matrices can be cached.
    """
    return _gaussian_matrix_cached(size, round(max(sigma_px, 0.02) * 50))


@lru_cache(maxsize=512)
def _gaussian_matrix_cached(size: int, sigma_fiftieths: int) -> np.ndarray:
    sigma_px = sigma_fiftieths / 50.0
    offsets = np.arange(size, dtype=np.float64)
    k = np.exp(-0.5 * (np.subtract.outer(offsets, offsets) / sigma_px) ** 2)
    k[k < 1e-6] = 0.0
    k /= k.sum(axis=1, keepdims=True)
    k.flags.writeable = False
    return k


def _smooth_field(rng: np.random.Generator, size: int, sigma_px: float) -> np.ndarray:
    """Zero-mean, unit-SD spatially correlated noise (white noise blurred by a Gaussian)."""
    k = _gaussian_matrix(size, sigma_px)
    field_ = k @ rng.standard_normal((size, size)) @ k.T
    return (field_ - field_.mean()) / (field_.std() + 1e-12)


# --------------------------------------------------------------------------------------------------------
# One slice: state shared by the drawing functions


@dataclass
class _Kidney:
    cx: float
    cy: float
    a: float  # semi-axis along the long axis, mm
    b: float  # semi-axis across, mm
    angle: float  # of the long axis, radians
    hilum: tuple[float, float]  # unit vector pointing anteromedially, towards the renal hilum
    long_axis: tuple[float, float]  # unit vector along the long axis, pointing posteromedially
    has_sinus: bool  # the slice passes through the renal sinus (not a pole)
    medial_sign: float  # +1 for the kidney on the image's left (patient's right), -1 for the other


@dataclass
class _Slice:
    """Everything one slice's drawing functions share: canvas, random state, sampled anatomy."""

    rng: np.random.Generator
    canvas: _Canvas
    phase: str
    level: float  # 0 = upper abdomen (T12) .. 1 = lower abdomen (L3)
    hu: dict[str, float]
    texture_coarse: np.ndarray
    texture_fine: np.ndarray
    # Filled in as structures are drawn (mm).
    cx: float = 0.0
    cy: float = 0.0
    cavity_ax: float = 0.0
    cavity_ay: float = 0.0
    wall_ax: float = 0.0
    wall_ay: float = 0.0
    posterior_wall_y: float = 0.0
    spine_x: float = 0.0
    vertebra_y: float = 0.0
    vertebra_a: float = 0.0
    vertebra_b: float = 0.0
    canal_y: float = 0.0
    ivc: tuple[float, float] = (0.0, 0.0)
    liver_right: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)  # cx, cy, a, b
    liver_left: tuple[float, float, float, float, float] | None = None  # cx, cy, a, b, angle
    liver_hilum: tuple[float, float] = (0.0, 0.0)
    gallbladder: tuple[float, float, float, float, float] | None = None  # cx, cy, a, b, angle of the lumen
    kidneys: list[_Kidney] = field(default_factory=list)
    layers: dict[str, np.ndarray] = field(default_factory=dict)  # "cavity", "liver", "kidney", "gallbladder"
    # Class-driven modifications of the anatomy (Caroli syndrome).
    spleen_scale: float = 1.0
    liver_nodularity_hu: float = 0.0
    liver_fibrosis_hu: float = 0.0
    liver_contour_irregularity: float = 0.0
    liver_hu: np.ndarray | None = None  # the image as it was when the liver had been drawn

    _uniforms: list[float] = field(default_factory=list)
    _next_uniform: int = 0

    # Scalar random draws come from a buffer of uniforms: far cheaper than one Generator call each.
    def fraction(self) -> float:
        """Uniform in [0, 1)."""
        if self._next_uniform >= len(self._uniforms):
            self._uniforms = self.rng.random(256).tolist()
            self._next_uniform = 0
        self._next_uniform += 1
        return self._uniforms[self._next_uniform - 1]

    def u(self, low: float, high: float) -> float:
        """Uniform in [low, high)."""
        return low + (high - low) * self.fraction()

    def within(self, bounds: tuple[float, float]) -> float:
        return self.u(bounds[0], bounds[1])

    def integer(self, low: int, high: int) -> int:
        """Uniform integer in [low, high)."""
        return min(low + int(self.fraction() * (high - low)), high - 1)

    def chance(self, p: float) -> bool:
        return self.fraction() < p

    def pick(self, options: Sequence[str], probabilities: Sequence[float]) -> str:
        x, total = self.fraction(), 0.0
        for option, p in zip(options, probabilities):
            total += p
            if x < total:
                return option
        return options[-1]


def _sample_tissues(rng: np.random.Generator, phase: str) -> dict[str, float]:
    fractions = rng.random(len(TISSUE_HU) + 1).tolist()
    values = {}
    for (name, bounds), f in zip(TISSUE_HU.items(), fractions):
        low, high = bounds[phase] if isinstance(bounds, dict) else bounds
        values[name] = low + (high - low) * f
    if phase == PORTAL:
        values["liver_vessel"] = values["vein"] - 15.0 + 25.0 * fractions[-1]
    else:
        low, high = UNENHANCED_LIVER_VESSEL_DROP_HU
        values["liver_vessel"] = values["liver"] - (low + (high - low) * fractions[-1])
    return values


@dataclass
class _Rendered:
    hu: np.ndarray  # float32 (size, size), final image
    layers: dict[str, np.ndarray]  # coverage of "cavity", "liver", "kidney" (and "gallbladder") before noise


def _slice_level(label: str, level: float, levels: tuple[float, float] = SLICE_LEVEL_RANGE) -> float:
    """The level drawn in ``levels``, mapped into its third of that range for the ``level-*`` classes."""
    if label not in LEVEL_CLASSES:
        return level
    low, high = levels
    third = LEVEL_CLASSES.index(label)
    return low + (high - low) * (third + (level - low) / (high - low)) / 3.0


def _render(label: str, size: int, rng: np.random.Generator,
            levels: tuple[float, float] = SLICE_LEVEL_RANGE) -> _Rendered:
    """Draw one slice; also return organ coverage layers (used by the tests)."""
    _check_label(label)
    _check_size(size)
    size = int(size)
    canvas = _Canvas(size)
    phase = PORTAL if rng.random() < PORTAL_PHASE_PROBABILITY else UNENHANCED
    st = _Slice(
        rng=rng,
        canvas=canvas,
        phase=phase,
        level=_slice_level(label, float(rng.uniform(*levels)), levels),
        hu=_sample_tissues(rng, phase),
        texture_coarse=_smooth_field(rng, size, max(TEXTURE_COARSE_MM / canvas.px, 0.7)),
        texture_fine=_smooth_field(rng, size, max(TEXTURE_FINE_MM / canvas.px, 0.5)),
    )
    if label == "caroli-diffuse":
        _caroli_syndrome_anatomy(st)

    _draw_body_wall(st)
    _draw_table(st)
    _draw_bowel(st)
    _draw_mesenteric_vessels(st)
    _draw_stomach(st)
    _draw_pancreas(st)
    _draw_back_muscles(st)
    _choose_kidneys(st)
    _draw_liver(st)
    _draw_gallbladder(st)
    _draw_spleen(st)
    _draw_perirenal_fat(st)
    _draw_great_vessels(st)
    _draw_kidneys(st)
    _draw_psoas(st)
    _draw_vertebra(st)
    _draw_ribs(st)
    _keep_visible_liver(st)
    _LESIONS[label](st)

    hu = _image_formation(st)
    return _Rendered(hu=hu, layers=st.layers)


def _keep_visible_liver(st: _Slice) -> None:
    """Narrow the "liver" layer to where the liver is still seen: organs drawn after it (gallbladder,
    kidneys and their fat, spleen, vessels, spine) cover parts of its outline, and lesions of the liver
    must not land on them."""
    changed = np.abs(st.canvas.hu - st.liver_hu) * (1.0 / 20.0)  # HU; partial-volume edges fade out
    st.layers["liver"] *= np.clip(1.0 - changed, 0.0, 1.0)


def _image_formation(st: _Slice) -> np.ndarray:
    """Correlated quantum noise and the scanner's point-spread function, then the 12-bit HU range."""
    cv, rng = st.canvas, st.rng
    sigma_px = math.hypot(st.within(PSF_SIGMA_MM) / cv.px, PIXEL_SIGMA_PX)
    kernel = _gaussian_matrix(cv.size, sigma_px)
    centre_row = kernel[cv.size // 2]
    noise_gain = float(np.sum(centre_row**2))  # SD of blurred white noise of unit SD (separable kernel)
    noise_sd = st.within(NOISE_SD_HU) * min(1.0, NOISE_REFERENCE_MM / cv.px)
    noisy = cv.hu + rng.standard_normal(cv.hu.shape) * (noise_sd / noise_gain)
    blurred = kernel @ noisy @ kernel.T
    return np.clip(blurred, HU_FLOOR, HU_CEILING).astype(np.float32)


# --------------------------------------------------------------------------------------------------------
# Normal anatomy, one function per structure (painted back to front: later covers earlier)


def _draw_body_wall(st: _Slice) -> None:
    """Skin, subcutaneous fat, the abdominal wall muscles and the peritoneal cavity (visceral fat)."""
    cv, hu = st.canvas, st.hu
    st.cx, st.cy = st.u(-10.0, 10.0), st.u(-12.0, 6.0)
    st.wall_ax, st.wall_ay = st.u(120.0, 142.0), st.u(88.0, 106.0)  # outer surface of the muscle wall
    fat_lateral = st.u(4.0, 30.0)
    fat_anterior = fat_lateral * st.u(0.6, 1.3)
    fat_posterior = st.u(4.0, 22.0)
    body_ay = st.wall_ay + (fat_anterior + fat_posterior) / 2.0
    body_cy = st.cy + (fat_posterior - fat_anterior) / 2.0
    body_ax = st.wall_ax + fat_lateral
    angle = st.u(-0.05, 0.05)
    wobble = ((2, st.u(-0.03, 0.03), st.u(0, math.tau)), (3, st.u(-0.02, 0.02), st.u(0, math.tau)))
    skin_mm = st.u(1.5, 3.0)
    skin, fat = cv.nested_ellipses(st.cx, body_cy, body_ax, body_ay, angle, wobble, (0.0, skin_mm))
    cv.paint(skin, hu["skin"])
    cv.paint(fat, hu["subcutaneous_fat"])
    cv.paint(cv.ellipse(st.cx, st.cy, st.wall_ax, st.wall_ay, angle), hu["muscle"])
    wall_mm = st.u(6.0, 14.0)
    st.cavity_ax, st.cavity_ay = st.wall_ax - wall_mm, st.wall_ay - 0.8 * wall_mm
    cavity = cv.ellipse(st.cx, st.cy, st.cavity_ax, st.cavity_ay, angle)
    cv.paint(cavity, hu["visceral_fat"])
    st.layers["cavity"] = cv.layer()
    cv.add_to(st.layers["cavity"], cavity)
    st.posterior_wall_y = st.cy + st.wall_ay


def _draw_table(st: _Slice) -> None:
    """The curved carbon-fibre table top a few millimetres behind the patient's back."""
    cv = st.canvas
    y0 = st.posterior_wall_y + st.u(8.0, 30.0)
    rise = st.u(8.0, 20.0)  # the edges curve up around the patient
    xs, ys = [-145.0, -70.0, 0.0, 70.0, 145.0], [y0 - rise, y0 - rise / 4, y0, y0 - rise / 4, y0 - rise]
    cv.paint(cv.tube(xs, ys, [st.u(2.0, 4.0)] * len(xs)), st.hu["table"])


def _bowel_contents(st: _Slice, mask: _Mask | None, kind: str, cy: float, r: float) -> None:
    """Fill a bowel lumen: fluid, gas, a gas-fluid level, or mottled faeces with gas bubbles."""
    cv, hu = st.canvas, st.hu
    if mask is None:
        return
    if kind == "gas":
        cv.paint(mask, HU_AIR)
    elif kind == "fluid":
        cv.paint(mask, hu["bowel_fluid"])
    elif kind == "gas-fluid":
        cv.paint(mask, hu["bowel_fluid"])
        cv.paint(cv.part_anterior_to(mask, cy - r * st.u(-0.2, 0.6)), HU_AIR)
    else:  # faeces: mottled, with bubbles
        base = st.u(-120.0, 30.0) + st.u(40.0, 120.0) * st.texture_fine[mask.box]
        cv.paint(mask, base)


def _draw_bubbles(st: _Slice, cx: float, cy: float, r: float, count: int) -> None:
    cv = st.canvas
    for _ in range(count):
        ang, dist = st.u(0, math.tau), r * math.sqrt(st.fraction()) * 0.7
        rb = st.u(1.5, 0.35 * r + 1.5)
        cv.paint(cv.ellipse(cx + dist * math.cos(ang), cy + dist * math.sin(ang), rb, rb * st.u(0.6, 1.0)),
                 HU_AIR)


def _draw_bowel(st: _Slice) -> None:
    """Small-bowel loops in the anterior abdomen and colon segments (faeces, gas), inside the cavity."""
    cv, hu, z = st.canvas, st.hu, st.level
    cavity = st.layers["cavity"]
    n_small = st.integer(3, 7) + int(round(7 * z))
    for _ in range(n_small):
        x = st.cx + st.cavity_ax * st.u(-0.75, 0.75)
        y = st.cy + st.cavity_ay * st.u(-0.85, 0.25)
        r = st.u(7.0, 16.0)
        ang = st.u(0, math.tau)
        elong = st.u(1.0, 1.6)
        kind = st.pick(("fluid", "collapsed", "gas", "gas-fluid", "faeces"), (0.32, 0.3, 0.13, 0.12, 0.13))
        wall, lumen = cv.nested_ellipses(x, y, r * elong, r, ang, (), (0.0, 50.0 if kind == "collapsed" else
                                                                       st.u(1.5, 3.0)))
        cv.paint(wall.times(cavity) if wall else None, hu["bowel_wall"])
        _bowel_contents(st, lumen.times(cavity) if lumen else None, kind, y, r)
        if kind == "faeces":
            _draw_bubbles(st, x, y, r, st.integer(0, 3))
    colon = []
    if z > 0.3:  # ascending colon, image left (patient right), lateral
        colon.append((st.cx - st.cavity_ax * st.u(0.66, 0.8), st.cy + st.cavity_ay * st.u(-0.3, 0.2),
                      st.u(13.0, 24.0), 1.0))
    if z > 0.15:  # descending colon, image right
        colon.append((st.cx + st.cavity_ax * st.u(0.7, 0.82), st.cy + st.cavity_ay * st.u(-0.1, 0.3),
                      st.u(10.0, 18.0), 1.0))
    if 0.1 < z < 0.65 and st.chance(0.7):  # transverse colon, anterior, cut lengthwise
        colon.append((st.cx + st.cavity_ax * st.u(-0.4, 0.4), st.cy - st.cavity_ay * st.u(0.55, 0.75),
                      st.u(12.0, 20.0), st.u(1.3, 2.2)))
    for x, y, r, elong in colon:
        wall, lumen = cv.nested_ellipses(x, y, r * elong, r, st.u(-0.2, 0.2),
                                         ((3, st.u(0, 0.06), st.u(0, math.tau)),), (0.0, 2.0))
        cv.paint(wall.times(cavity) if wall else None, hu["bowel_wall"])
        kind = "gas-fluid" if st.chance(0.35) else "faeces"
        _bowel_contents(st, lumen.times(cavity) if lumen else None, kind, y, r)
        if kind == "faeces":
            _draw_bubbles(st, x, y, r, st.integer(1, 6))


def _draw_mesenteric_vessels(st: _Slice) -> None:
    """Small mesenteric vessels as dots in the fat between loops (bright with contrast)."""
    cv = st.canvas
    cavity = st.layers["cavity"]
    for _ in range(st.integer(1, 6)):
        x = st.cx + st.cavity_ax * st.u(-0.55, 0.55)
        y = st.cy + st.cavity_ay * st.u(-0.7, 0.15)
        r = st.u(1.2, 3.0)
        m = cv.ellipse(x, y, r, r)
        cv.paint(m.times(cavity) if m else None, st.hu["vein"])


def _draw_stomach(st: _Slice) -> None:
    """At upper levels: the stomach under the left hemidiaphragm, with an air-fluid level."""
    z = st.level
    if z > 0.45:
        return
    cv, hu = st.canvas, st.hu
    s = math.sqrt(1.0 - z / 0.45)
    x = st.cx + st.cavity_ax * st.u(0.15, 0.4)
    y = st.cy - st.cavity_ay * st.u(0.25, 0.5)
    a, b = st.u(25.0, 40.0) * s + 8.0, st.u(18.0, 30.0) * s + 6.0
    ang = st.u(-0.5, 0.3)
    cavity = st.layers["cavity"]
    wall, lumen = cv.nested_ellipses(x, y, a, b, ang, (), (0.0, st.u(3.0, 6.0)))
    cv.paint(wall.times(cavity) if wall else None, hu["bowel_wall"])
    kind = st.pick(("gas-fluid", "fluid", "faeces"), (0.6, 0.25, 0.15))
    _bowel_contents(st, lumen.times(cavity) if lumen else None, kind, y, b)


def _draw_pancreas(st: _Slice) -> None:
    """Mid levels: head, neck and body-tail of the pancreas arching in front of the spine."""
    z = st.level
    if not 0.15 < z < 0.65 or st.chance(0.2):
        return
    cv = st.canvas
    front = st.cy + st.cavity_ay * 0.1 - st.u(20.0, 35.0)  # roughly in front of the aorta
    xs = [st.cx - st.u(15.0, 35.0), st.cx + st.u(-5.0, 10.0), st.cx + st.u(25.0, 45.0),
          st.cx + st.u(55.0, 75.0)]
    ys = [front + st.u(5.0, 20.0), front - st.u(0.0, 10.0), front + st.u(-5.0, 5.0), front + st.u(5.0, 25.0)]
    r = st.u(6.0, 11.0)
    radii = [r * 1.4, r * 0.8, r, r * 0.8]
    m = cv.tube(xs, ys, radii)
    if m is None:
        return
    lobulation = st.u(5.0, 25.0) * np.minimum(st.texture_fine[m.box], 0.0)  # fatty clefts
    cv.paint(m.times(st.layers["cavity"]), st.hu["pancreas"] + lobulation)


def _draw_back_muscles(st: _Slice) -> None:
    """Erector spinae either side of the spinous process and quadratus lumborum lateral to them.

    Also fixes the position of the spine, which the kidneys, psoas and vertebra are placed from.
    """
    cv, hu = st.canvas, st.hu
    st.spine_x = st.cx + st.u(-3.0, 3.0)
    canal_r = 8.0
    st.canal_y = st.posterior_wall_y - st.u(32.0, 42.0)
    st.vertebra_a, st.vertebra_b = st.u(19.0, 24.0), st.u(14.0, 18.0)
    st.vertebra_y = st.canal_y - canal_r - st.vertebra_b - st.u(0.5, 2.0)
    for side in (-1.0, 1.0):
        cv.paint(cv.ellipse(st.spine_x + side * st.u(22.0, 30.0), st.canal_y + st.u(8.0, 16.0),
                            st.u(19.0, 26.0), st.u(17.0, 24.0), side * st.u(0.0, 0.3)), hu["muscle"])
        cv.paint(cv.ellipse(st.spine_x + side * st.u(50.0, 62.0), st.canal_y - st.u(0.0, 10.0),
                            st.u(12.0, 18.0), st.u(6.0, 10.0), -side * st.u(0.2, 0.6)), hu["muscle"])


def _kidney_geometry(st: _Slice, medial_sign: float, h: float) -> _Kidney:
    """Where one kidney is cut at relative height ``h`` from its middle (0) towards a pole (1)."""
    scale = max(math.sqrt(1.0 - h * h), 0.3)
    a, b = st.u(25.0, 31.0) * scale**0.7, st.u(18.0, 24.0) * scale**0.7
    tilt = st.u(0.5, 0.95)  # long axis to the coronal plane, radians
    long_axis = (medial_sign * math.cos(tilt), math.sin(tilt))  # posteromedial
    hilum = (medial_sign * math.sin(tilt), -math.cos(tilt))  # anteromedial
    angle = math.atan2(long_axis[1], long_axis[0])
    half_width = math.hypot(a * long_axis[0], b * hilum[0])
    psoas_a = 6.0 + 10.0 * st.level  # as in _draw_psoas: the kidney sits lateral to the psoas
    cx = st.spine_x - medial_sign * (st.vertebra_a + 1.6 * psoas_a + half_width + st.u(0.0, 8.0))
    cy = st.vertebra_y + st.u(-6.0, 12.0)
    return _Kidney(cx, cy, a, b, angle, hilum, long_axis, h < 0.6, medial_sign)


def _choose_kidneys(st: _Slice) -> None:
    """Which kidneys this level cuts (the right one sits lower), and where."""
    h_right = abs(st.level - 0.58 - st.u(-0.06, 0.06)) / KIDNEY_HALF_EXTENT  # patient right = image left
    h_left = abs(st.level - 0.46 - st.u(-0.06, 0.06)) / KIDNEY_HALF_EXTENT
    if min(h_right, h_left) >= 1.0:  # always cut at least one kidney, if only a pole
        h_right, h_left = min(h_right, 0.97), min(h_left, 0.97)
    st.kidneys = [_kidney_geometry(st, sign, h) for sign, h in ((+1.0, h_right), (-1.0, h_left)) if h < 1.0]


def _draw_perirenal_fat(st: _Slice) -> None:
    """The fat capsule around each kidney (separating it from the liver and spleen)."""
    cv = st.canvas
    for k in st.kidneys:
        pad = st.u(3.0, 12.0)
        cv.paint(cv.ellipse(k.cx - k.medial_sign * st.u(0.0, 5.0), k.cy + st.u(0.0, 4.0), k.a + pad,
                            k.b + pad * st.u(0.6, 1.0), k.angle), st.hu["visceral_fat"])


def _draw_liver_vessels(st: _Slice, liver: np.ndarray) -> None:
    """Portal and hepatic vein branches fanning out from the porta hepatis."""
    cv = st.canvas
    hx, hy = st.liver_hilum
    for _ in range(st.integer(3, 8)):
        tx, ty = _point_in_liver(st)
        mx, my = (hx + tx) / 2 + st.u(-8.0, 8.0), (hy + ty) / 2 + st.u(-8.0, 8.0)
        r0 = st.u(2.0, 5.0)
        m = cv.tube([hx, mx, tx], [hy, my, ty], [r0, r0 * 0.7, r0 * 0.35])
        if m is not None:
            cv.paint(m.times(liver), st.hu["liver_vessel"])
    if st.level < 0.35:  # hepatic veins draining into the IVC
        ix, iy = st.ivc
        for _ in range(st.integer(1, 4)):
            tx, ty = _point_in_liver(st)
            m = cv.tube([ix, tx], [iy, ty], [st.u(3.0, 5.0), st.u(1.0, 2.0)])
            if m is not None:
                cv.paint(m.times(liver), st.hu["liver_vessel"])


def _point_in_liver(st: _Slice, lobe: str = "any") -> tuple[float, float]:
    """A random point inside the right lobe ellipse or, when present, the left lobe."""
    use_left = st.liver_left is not None and (lobe == "left" or (lobe == "any" and st.chance(0.3)))
    if use_left:
        cx, cy, a, b, ang = st.liver_left
    else:
        cx, cy, a, b = st.liver_right
        ang = 0.0
    t, r = st.u(0, math.tau), math.sqrt(st.fraction()) * 0.85
    u, v = a * r * math.cos(t), b * r * math.sin(t)
    return cx + u * math.cos(ang) - v * math.sin(ang), cy + u * math.sin(ang) + v * math.cos(ang)


def _draw_liver(st: _Slice) -> None:
    """The liver: a big right lobe on the image's left, a left lobe across the midline at upper levels.

    Its size follows the slice level; it is moulded by the abdominal wall. Caroli syndrome adds a
    nodular, fibrotic texture and an irregular contour.
    """
    cv, z = st.canvas, st.level
    irregular = st.liver_contour_irregularity
    a = st.cavity_ax * (0.62 - 0.33 * z) * st.u(0.88, 1.1)
    b = st.cavity_ay * (0.85 - 0.42 * z) * st.u(0.88, 1.1)
    cx = st.cx - st.cavity_ax * (0.42 + 0.2 * z) + st.u(-6.0, 6.0)
    cy = st.cy - st.cavity_ay * (0.12 - 0.32 * z) + st.u(-6.0, 6.0)
    st.liver_right = (cx, cy, a, b)
    wobble = [(2, st.u(-0.06, 0.06), st.u(0, math.tau)), (3, st.u(-0.04, 0.04), st.u(0, math.tau))]
    if irregular:
        wobble += [(k, st.u(0.3, 1.0) * irregular, st.u(0, math.tau)) for k in (7, 11, 16)]
    liver = cv.layer()
    cv.add_to(liver, cv.ellipse(cx, cy, a, b, st.u(-0.2, 0.2), wobble))
    left_extent = 0.62 + st.u(-0.08, 0.08)
    if z < left_extent:
        s = math.sqrt(1.0 - z / left_extent)
        lx = st.cx + st.cavity_ax * st.u(-0.08, 0.15)
        ly = st.cy - st.cavity_ay * st.u(0.45, 0.6)
        la, lb, lang = st.cavity_ax * st.u(0.42, 0.55) * s + 10.0, st.cavity_ay * st.u(0.2, 0.3) * s + 6.0, \
            st.u(0.05, 0.4)
        st.liver_left = (lx, ly, la, lb, lang)
        lobe_wobble = [(3, st.u(-0.05, 0.05), st.u(0, math.tau))]
        if irregular:
            lobe_wobble += [(k, st.u(0.3, 1.0) * irregular, st.u(0, math.tau)) for k in (9, 13)]
        cv.add_to(liver, cv.ellipse(lx, ly, la, lb, lang, lobe_wobble))
    liver *= st.layers["cavity"]
    st.layers["liver"] = liver
    st.liver_hilum = (cx + 0.55 * a + st.u(-5.0, 5.0), cy + 0.1 * b + st.u(-5.0, 5.0))
    value = st.hu["liver"] + st.u(1.5, 4.0) * st.texture_coarse
    if st.liver_nodularity_hu:
        value = value + st.liver_nodularity_hu * st.texture_coarse
    if st.liver_fibrosis_hu:  # a reticular network of fibrous septa where the fine field crosses zero
        septa = np.exp(-((st.texture_fine / 0.25) ** 2))
        value = value - st.liver_fibrosis_hu * septa
    box = (slice(None), slice(None))
    cv.paint(_Mask(box, liver), value)
    st.ivc = (st.spine_x - st.u(18.0, 30.0), st.vertebra_y - st.vertebra_b - st.u(5.0, 16.0))
    _draw_liver_vessels(st, liver)
    st.liver_hu = cv.hu.copy()


def _draw_gallbladder(st: _Slice, always: bool = False) -> None:
    """Sometimes: the gallbladder, a bile-filled oval in the fossa under the liver (mimics ducts, cysts).

    ``always``: draw it whatever the level (for gallstones).
    """
    if not always and (not 0.2 < st.level < 0.85 or not st.chance(0.4)):
        return
    cv = st.canvas
    cx, cy, a, b = st.liver_right
    x, y = cx + a * st.u(0.25, 0.6), cy - b * st.u(0.35, 0.7)
    ga, gb = st.u(10.0, 22.0), st.u(7.0, 15.0)
    ang = st.u(0, math.pi)
    wall, gallbladder = cv.nested_ellipses(x, y, ga + 1.5, gb + 1.5, ang, (), (0.0, 1.5))
    cv.paint(wall, st.hu["bowel_wall"])
    cv.paint(gallbladder, st.hu["bile"])
    cv.cut_from(st.layers["liver"], gallbladder)
    st.gallbladder = (x, y, ga, gb, ang)
    st.layers["gallbladder"] = cv.layer()
    cv.add_to(st.layers["gallbladder"], gallbladder)


def _draw_spleen(st: _Slice) -> None:
    """The spleen, posterolateral on the image's right; bigger and lower-reaching in splenomegaly."""
    z = st.level
    reach = 0.55 + st.u(-0.1, 0.1) + 0.3 * (st.spleen_scale - 1.0)
    if z >= reach:
        return
    cv = st.canvas
    s = math.sqrt(1.0 - z / reach) * st.spleen_scale
    x = st.cx + st.cavity_ax * st.u(0.55, 0.72)
    y = st.cy + st.cavity_ay * st.u(-0.05, 0.3)
    wobble = ((2, st.u(-0.08, 0.08), st.u(0, math.tau)), (4, st.u(0.0, 0.05), st.u(0, math.tau)))
    m = cv.ellipse(x, y, st.u(38.0, 55.0) * s + 5.0, st.u(16.0, 25.0) * s + 4.0, -st.u(0.8, 1.3), wobble)
    if m is not None:
        cv.paint(m.times(st.layers["cavity"]), st.hu["spleen"] + st.u(1.0, 3.0) * st.texture_coarse[m.box])


def _draw_great_vessels(st: _Slice) -> None:
    """Aorta left-anterior of the vertebra (sometimes with a calcified plaque) and the IVC on the right."""
    cv, hu = st.canvas, st.hu
    r = st.u(8.0, 13.0)
    ax = st.spine_x + st.u(3.0, 16.0)
    ay = st.vertebra_y - st.vertebra_b - r - st.u(1.0, 6.0)
    cv.paint(cv.ellipse(ax, ay, r, r * st.u(0.9, 1.0)), hu["aorta"])
    if st.chance(0.3):  # atherosclerotic calcification in the wall: mimics a small calculus
        t = st.u(0, math.tau)
        rc = st.u(0.8, 2.2)
        cv.paint(cv.ellipse(ax + r * math.cos(t), ay + r * math.sin(t), rc * 1.6, rc, t + math.pi / 2),
                 st.u(250.0, 900.0))
    ix, iy = st.ivc
    cv.paint(cv.ellipse(ix, iy, st.u(10.0, 15.0), st.u(6.0, 11.0), st.u(-0.4, 0.2)), hu["vein"])
    if 0.3 < st.level < 0.9:  # superior mesenteric artery and vein in front of the aorta
        sy = ay - r - st.u(8.0, 20.0)
        cv.paint(cv.ellipse(ax + st.u(-4.0, 4.0), sy, st.u(2.5, 4.0), st.u(2.5, 4.0)), hu["aorta"])
        cv.paint(cv.ellipse(ax - st.u(8.0, 14.0), sy + st.u(-3.0, 3.0), st.u(4.0, 6.5), st.u(4.0, 6.0)),
                 hu["vein"])


def _draw_kidneys(st: _Slice) -> None:
    """Bean-shaped kidneys: parenchyma, renal sinus fat opening at the hilum, pelvis and calyces, vein."""
    cv, hu = st.canvas, st.hu
    layer = cv.layer()
    for k in st.kidneys:
        wobble = ((3, st.u(-0.03, 0.03), st.u(0, math.tau)),)
        body = cv.ellipse(k.cx, k.cy, k.a, k.b, k.angle, wobble)
        if body is None:
            continue
        cv.paint(body, hu["kidney"] + st.u(1.5, 4.0) * st.texture_fine[body.box])
        cv.add_to(layer, body)
        if not k.has_sinus:
            continue
        ex, ey = k.hilum
        ux, uy = k.long_axis
        depth = st.u(0.5, 0.75)
        sx, sy = k.cx + ex * k.b * depth, k.cy + ey * k.b * depth
        sinus = cv.ellipse(sx, sy, k.a * st.u(0.25, 0.4), k.b * st.u(0.3, 0.45), k.angle)
        cv.paint(sinus, st.u(-80.0, -20.0))  # fat averaged with vessels and lymphatics
        cv.add_to(layer, sinus)
        # renal pelvis and two calyceal infundibula, unopacified urine in this phase
        px, py = sx + ex * k.b * 0.25, sy + ey * k.b * 0.25
        pelvis_r = st.u(2.0, 5.0)
        cv.paint(cv.ellipse(px, py, pelvis_r * 1.3, pelvis_r, k.angle), hu["urine"])
        for sign in (-1.0, 1.0):
            tx, ty = sx + sign * ux * k.a * 0.45 - ex * k.b * 0.1, sy + sign * uy * k.a * 0.45 - ey * k.b * 0.1
            cv.paint(cv.tube([px, tx], [py, ty], [pelvis_r * 0.5, st.u(1.0, 2.2)]), hu["urine"])
        if st.chance(0.5):  # renal vein heading medially to the IVC
            vx, vy = k.cx + ex * k.b * 1.3, k.cy + ey * k.b * 1.3
            end_x = st.ivc[0] if k.medial_sign > 0 else st.spine_x + st.u(-5.0, 10.0)
            end_y = st.ivc[1] if k.medial_sign > 0 else st.vertebra_y - st.vertebra_b - st.u(20.0, 30.0)
            cv.paint(cv.tube([sx, vx, end_x], [sy, vy, end_y], [st.u(2.0, 3.5), st.u(3.0, 5.0), 4.0]),
                     hu["vein"])
    st.layers["kidney"] = layer


def _draw_psoas(st: _Slice) -> None:
    """Psoas muscles either side of the vertebral body, growing towards the pelvis."""
    cv = st.canvas
    a, b = 6.0 + 10.0 * st.level, 7.0 + 8.0 * st.level
    for side in (-1.0, 1.0):
        cv.paint(cv.ellipse(st.spine_x + side * (st.vertebra_a + 0.7 * a), st.vertebra_y + st.u(-6.0, 4.0),
                            a * st.u(0.85, 1.15), b * st.u(0.85, 1.15), side * st.u(0.2, 0.7)), st.hu["muscle"])


def _draw_vertebra(st: _Slice) -> None:
    """Vertebral body (cortical rim, cancellous centre), spinal canal, pedicles, laminae and processes."""
    cv, hu = st.canvas, st.hu
    x, y, a, b = st.spine_x, st.vertebra_y, st.vertebra_a, st.vertebra_b
    cortex = hu["bone_cortex"]
    posterior_bone = 0.5 * (cortex + hu["bone_cancellous"])
    canal_r = st.u(7.0, 9.0)
    cy = st.canal_y
    arch = st.u(2.5, 4.0)  # thickness of pedicles and laminae
    spinous_base = cy + canal_r + arch
    spinous_tip = (x + st.u(-2.0, 2.0), spinous_base + st.u(18.0, 30.0))
    cv.paint(cv.tube([x, spinous_tip[0]], [spinous_base - arch, spinous_tip[1]],
                     [st.u(2.5, 3.5), st.u(2.0, 3.5)]), posterior_bone)
    for side in (-1.0, 1.0):
        pedicle = (x + side * (canal_r + 1.0), cy - 0.5 * canal_r)
        cv.paint(cv.tube([x + side * 0.6 * a, pedicle[0], x + side * 0.4 * canal_r],  # pedicle and lamina
                         [y + 0.6 * b, pedicle[1], spinous_base - 0.5 * arch], [arch, arch, arch]), posterior_bone)
        cv.paint(cv.tube([pedicle[0], x + side * st.u(24.0, 34.0)], [pedicle[1], cy + st.u(-6.0, 4.0)],
                         [st.u(2.5, 3.5), st.u(1.5, 3.0)]), posterior_bone)  # transverse process
    cv.paint(cv.ellipse(x, cy, canal_r, canal_r * st.u(0.8, 1.0)), hu["csf"])
    wobble = ((2, st.u(0.0, 0.06), 0.0),)  # slightly kidney-shaped body
    outer, inner = cv.nested_ellipses(x, y, a, b, 0.0, wobble, (0.0, st.u(1.5, 3.0)))
    cv.paint(outer, cortex)
    if inner is not None:
        cv.paint(inner, hu["bone_cancellous"] + st.u(15.0, 40.0) * st.texture_fine[inner.box])


def _draw_ribs(st: _Slice) -> None:
    """Cross-sections of the lower ribs in the posterolateral wall; costal cartilage anteriorly up high."""
    cv, hu = st.canvas, st.hu
    rx, ry = st.wall_ax - 4.0, st.wall_ay - 4.0
    for side in (-1.0, 1.0):
        for _ in range(st.integer(RIBS_PER_SIDE[0], RIBS_PER_SIDE[1] + 1)):
            t = st.u(0.55, 1.9)  # angle from the posterior midline
            x, y = st.cx + side * rx * math.sin(t), st.cy + ry * math.cos(t)
            tangent = math.atan2(-ry * math.sin(t), side * rx * math.cos(t))
            a, b = st.u(6.0, 11.0), st.u(3.0, 5.0)
            cortex, marrow = cv.nested_ellipses(x, y, a, b, tangent, (), (0.0, 1.5))
            cv.paint(cortex, hu["bone_cortex"] * st.within(RIB_OBLIQUITY))
            cv.paint(marrow, hu["rib_marrow"])
        if st.level < 0.4 and st.chance(0.6):
            t = st.u(2.3, 2.8)
            x, y = st.cx + side * rx * math.sin(t), st.cy + ry * math.cos(t)
            tangent = math.atan2(-ry * math.sin(t), side * rx * math.cos(t))
            cv.paint(cv.ellipse(x, y, st.u(6.0, 10.0), st.u(3.0, 5.0), tangent), hu["costal_cartilage"])


# --------------------------------------------------------------------------------------------------------
# Lesions, one function per class


def _no_lesion(st: _Slice) -> None:
    """``normal``: nothing added; the mimics are part of the normal anatomy."""


def _kidney_point(st: _Slice, k: _Kidney, radial: float, angle: float) -> tuple[float, float]:
    """The point at polar (radial fraction of the outline, angle) in the kidney's own frame."""
    u, v = k.a * radial * math.cos(angle), k.b * radial * math.sin(angle)
    c, s = math.cos(k.angle), math.sin(k.angle)
    return k.cx + c * u - s * v, k.cy + s * u + c * v


def _pick_kidney(st: _Slice) -> _Kidney:
    return st.kidneys[st.integer(0, len(st.kidneys))]


def _away_from_hilum(st: _Slice, k: _Kidney, spread: float) -> float:
    """A polar angle in the kidney's frame on its outer convexity (opposite the hilum) +- spread."""
    hilum_angle = math.atan2(*_frame(k, k.hilum)[::-1])
    return hilum_angle + math.pi + st.u(-spread, spread)


def _paint_renal_cyst(st: _Slice, k: _Kidney, diameter_mm: float) -> None:
    """A round water-density cyst in the cortex, often bulging out of the renal outline (exophytic)."""
    cv = st.canvas
    r = diameter_mm / 2.0
    x, y = _kidney_point(st, k, st.u(0.55, 1.15), _away_from_hilum(st, k, 2.2))
    cv.paint(cv.ellipse(x, y, r, r * st.u(0.85, 1.0), st.u(0, math.pi)), st.within(CYST_HU))


def _cysts(st: _Slice) -> None:
    """``cyst``: one or more simple cysts, hepatic or renal: round, sharp, water density, non-enhancing."""
    if st.chance(HEPATIC_CYST_PROBABILITY):
        liver = st.layers["liver"]
        for _ in range(st.integer(CYST_COUNT[0], CYST_COUNT[1] + 1)):
            x, y = _point_in_liver(st)
            r = st.within(CYST_DIAMETER_MM) / 2.0
            m = st.canvas.ellipse(x, y, r, r * st.u(0.85, 1.0), st.u(0, math.pi))
            st.canvas.paint(m.times(liver) if m else None, st.within(CYST_HU))
        return
    k = _pick_kidney(st)
    for _ in range(st.integer(CYST_COUNT[0], CYST_COUNT[1] + 1)):
        _paint_renal_cyst(st, k if st.chance(0.75) else _pick_kidney(st), st.within(CYST_DIAMETER_MM))


def _gallstones(st: _Slice) -> None:
    """Calcified gallstones layering in the dependent (posterior) part of the gallbladder."""
    if st.gallbladder is None:
        _draw_gallbladder(st, always=True)
    x, y, a, b, _ = st.gallbladder
    radius = min(a, b)
    density = st.within(GALLSTONE_HU)  # one density per gallbladder: stones of one kind
    for _ in range(st.integer(GALLSTONE_COUNT[0], GALLSTONE_COUNT[1] + 1)):
        r = min(st.within(CALCULUS_DIAMETER_MM) / 2.0, 0.8 * radius)
        sx = x + st.u(-0.6, 0.6) * (a - r)
        sy = y + st.u(0.0, 0.8) * (radius - r)
        wobble = ((4, st.u(0.0, 0.12), st.u(0, math.tau)),)  # faceted
        st.canvas.paint(st.canvas.ellipse(sx, sy, r, r * st.u(0.75, 1.0), st.u(0, math.pi), wobble), density)


def _calculi(st: _Slice) -> None:
    """``calculi``: dense stones, in the gallbladder (cholelithiasis) or the kidney (:func:`_renal_calculi`)."""
    if st.chance(GALLSTONE_PROBABILITY):
        _gallstones(st)
    else:
        _renal_calculi(st)


def _renal_calculi(st: _Slice) -> None:
    """Dense stones in the renal collecting system (pelvis, calyces), or a branching staghorn cast.

    Sometimes the stone obstructs and the pelvis around it is dilated (hydronephrosis).
    """
    cv = st.canvas
    k = _pick_kidney(st)
    calcium = st.chance(CALCIUM_STONE_PROBABILITY)
    density = st.within(CALCIUM_STONE_HU if calcium else URIC_ACID_STONE_HU)
    ex, ey = k.hilum
    ux, uy = k.long_axis
    if st.chance(HYDRONEPHROSIS_PROBABILITY):
        r = st.u(5.0, 11.0)
        cv.paint(cv.ellipse(k.cx + ex * k.b * 0.6, k.cy + ey * k.b * 0.6, r * 1.3, r, k.angle), st.hu["urine"])
    if k.has_sinus and st.chance(STAGHORN_PROBABILITY):  # a cast of the pelvis branching into calyces
        px, py = k.cx + ex * k.b * 0.55, k.cy + ey * k.b * 0.55
        for _ in range(st.integer(2, 4)):
            along, across = st.u(-0.7, 0.7), st.u(-0.1, 0.3)
            tx, ty = k.cx + ux * k.a * along + ex * k.b * across, k.cy + uy * k.a * along + ey * k.b * across
            cv.paint(cv.tube([px, tx], [py, ty], [st.u(3.0, 5.0), st.u(1.5, 3.5)]), density)
        return
    for _ in range(st.integer(CALCULUS_COUNT[0], CALCULUS_COUNT[1] + 1)):
        across = st.u(0.35, 0.85) if k.has_sinus else st.u(-0.3, 0.3)  # pelvis/calyx, or central at a pole
        along = st.u(-0.55, 0.55)
        x = k.cx + ex * k.b * across + ux * k.a * along
        y = k.cy + ey * k.b * across + uy * k.a * along
        r = st.within(CALCULUS_DIAMETER_MM) / 2.0
        wobble = ((3, st.u(0.0, 0.15), st.u(0, math.tau)),)
        cv.paint(cv.ellipse(x, y, r, r * st.u(0.6, 1.0), st.u(0, math.pi), wobble), density)


def _renal_tumour(st: _Slice) -> None:
    """``tumour``: renal cell carcinoma: heterogeneous, often necrotic, bulging the renal contour."""
    cv = st.canvas
    k = _pick_kidney(st)
    low, high = TUMOUR_DIAMETER_MM
    r = (low + (high - low) * st.fraction() ** 1.4) / 2.0
    x, y = _kidney_point(st, k, st.u(0.45, 1.0), _away_from_hilum(st, k, 1.8))  # convexity or a pole
    wobble = tuple((kk, st.u(0.0, 0.08), st.u(0, math.tau)) for kk in (2, 3, 5))
    mass = cv.ellipse(x, y, r, r * st.u(0.75, 1.0), st.u(0, math.pi), wobble)
    if mass is None:
        return
    base = st.within(TUMOUR_HU[st.phase])
    heterogeneity = st.u(6.0, 20.0) * st.texture_coarse[mass.box] + st.u(3.0, 8.0) * st.texture_fine[mass.box]
    cv.paint(mass, base + heterogeneity)
    if r > 9.0 and st.chance(0.6):  # necrotic centre
        nr = r * st.u(0.3, 0.6)
        nwobble = tuple((kk, st.u(0.0, 0.15), st.u(0, math.tau)) for kk in (2, 3, 4))
        cv.paint(cv.ellipse(x + st.u(-0.2, 0.2) * r, y + st.u(-0.2, 0.2) * r, nr, nr * st.u(0.6, 1.0),
                            st.u(0, math.pi), nwobble), st.within(NECROSIS_HU))
    if st.chance(0.08):  # a fleck of dystrophic calcification
        cv.paint(cv.ellipse(x + st.u(-0.5, 0.5) * r, y + st.u(-0.5, 0.5) * r, 1.2, 1.0), st.u(200.0, 600.0))


def _frame(k: _Kidney, vec: tuple[float, float]) -> tuple[float, float]:
    """A world-frame direction expressed in the kidney's (long axis, short axis) frame."""
    c, s = math.cos(k.angle), math.sin(k.angle)
    return c * vec[0] + s * vec[1], -s * vec[0] + c * vec[1]


def _duct_sites(st: _Slice, count: int, centre: tuple[float, float] | None, spread: float) -> list[tuple[float, float]]:
    """``count`` points inside the liver: near ``centre`` (within ``spread`` mm), or anywhere when None."""
    liver, cv = st.layers["liver"], st.canvas
    sites = []
    for _ in range(count):
        for _attempt in range(6):  # a point of the segment that is liver on this slice, if one is found
            if centre is None:
                x, y = _point_in_liver(st)
            else:
                t, r = st.u(0, math.tau), spread * math.sqrt(st.fraction())
                x, y = centre[0] + r * math.cos(t), centre[1] + r * math.sin(t)
            j, i = (int((v + FOV_MM / 2.0) / cv.px) for v in (x, y))
            if 0 <= i < cv.size and 0 <= j < cv.size and liver[i, j] > 0.5:
                break
        sites.append((x, y))
    return sites


def _draw_dilated_ducts(st: _Slice, root: tuple[float, float], sites: list[tuple[float, float]],
                        diameter_mm: tuple[float, float], dot_probability: float, stone_probability: float) -> None:
    """Dilated bile ducts from ``root`` to a saccule at each site: fusiform duct segments, a side branch
    now and then, and round water-density saccules holding the central dot sign or an intraductal stone.

    Everything is clipped to the liver.
    """
    cv, hu = st.canvas, st.hu
    liver = st.layers["liver"]
    bile = hu["bile"]
    dot_value = hu["vein"] if st.phase == PORTAL else st.within(SOFT_TISSUE_DOT_HU)
    for tx, ty in sites:
        rx, ry = root
        n = 4
        xs = [rx + (tx - rx) * i / (n - 1) + (st.u(-6.0, 6.0) if 0 < i < n - 1 else 0.0) for i in range(n)]
        ys = [ry + (ty - ry) * i / (n - 1) + (st.u(-6.0, 6.0) if 0 < i < n - 1 else 0.0) for i in range(n)]
        base = st.within(DUCT_RADIUS_MM)
        radii = [base * (1.0 + st.u(0.0, 1.0) * math.sin(math.pi * i / (n - 1))) for i in range(n)]
        m = cv.tube(xs, ys, radii)
        if m is not None:
            cv.paint(m.times(liver), bile)
        if st.chance(0.5):  # a side branch
            i = st.integer(1, n - 1)
            bx, by = xs[i] + st.u(-20.0, 20.0), ys[i] + st.u(-20.0, 20.0)
            m = cv.tube([xs[i], bx], [ys[i], by], [radii[i] * 0.8, base * 0.6])
            if m is not None:
                cv.paint(m.times(liver), bile)
        sr = st.within(diameter_mm) / 2.0  # the saccule at the end of the duct
        sac = cv.ellipse(tx, ty, sr, sr * st.u(0.75, 1.0), st.u(0, math.pi))
        if sac is None:
            continue
        cv.paint(sac.times(liver), bile)
        if st.chance(stone_probability):  # a stone lying in the dependent part of the saccule
            cr = min(st.within(INTRADUCTAL_STONE_DIAMETER_MM) / 2.0, 0.8 * sr)
            stone = cv.ellipse(tx + st.u(-0.3, 0.3) * (sr - cr), ty + st.u(0.2, 0.9) * (sr - cr), cr,
                               cr * st.u(0.7, 1.0), st.u(0, math.pi))
            cv.paint(stone.times(liver) if stone else None, st.within(INTRADUCTAL_STONE_HU))
        elif st.chance(dot_probability):  # central dot sign: the portal radicle inside the duct
            dr = st.within(CENTRAL_DOT_RADIUS_MM)
            dot = cv.ellipse(tx + st.u(-0.3, 0.3) * sr, ty + st.u(-0.3, 0.3) * sr, dr, dr)
            cv.paint(dot.times(liver) if dot else None, dot_value)


def _caroli_focal(st: _Slice) -> None:
    """``caroli-focal``: a few saccular dilatations confined to one segment (often of the left lobe)."""
    count = st.integer(FOCAL_SACCULES[0], FOCAL_SACCULES[1] + 1)
    spread = st.within(FOCAL_SEGMENT_RADIUS_MM)
    if st.liver_left is not None and st.chance(0.65):
        lx, ly, la, _, lang = st.liver_left
        centre = _point_in_liver(st, "left")
        root = (lx - 0.6 * la * math.cos(lang), ly - 0.6 * la * math.sin(lang))
    else:
        centre = _point_in_liver(st, "right")
        hx, hy = st.liver_hilum
        root = (hx + 0.4 * (centre[0] - hx), hy + 0.4 * (centre[1] - hy))
    _draw_dilated_ducts(st, root, _duct_sites(st, count, centre, spread), FOCAL_SACCULE_DIAMETER_MM,
                        dot_probability=0.6, stone_probability=FOCAL_STONE_PROBABILITY)


def _caroli_syndrome_anatomy(st: _Slice) -> None:
    """Before drawing: congenital hepatic fibrosis (nodular, septate liver) and, often, splenomegaly."""
    st.liver_nodularity_hu = st.u(3.0, 10.0)
    st.liver_fibrosis_hu = st.u(4.0, 14.0)
    st.liver_contour_irregularity = st.u(0.0, 0.025)
    if st.chance(0.6):
        st.spleen_scale = st.u(1.15, 1.5)


def _caroli_diffuse(st: _Slice) -> None:
    """``caroli-diffuse``: many smaller saccules throughout the liver, plus often polycystic-looking kidneys."""
    count = st.integer(DIFFUSE_SACCULES[0], DIFFUSE_SACCULES[1] + 1)
    _draw_dilated_ducts(st, st.liver_hilum, _duct_sites(st, count, None, 0.0), DIFFUSE_SACCULE_DIAMETER_MM,
                        dot_probability=0.5, stone_probability=DIFFUSE_STONE_PROBABILITY)
    if st.chance(POLYCYSTIC_KIDNEY_PROBABILITY):
        for k in st.kidneys:
            for _ in range(st.integer(1, 6)):
                _paint_renal_cyst(st, k, st.within(POLYCYSTIC_CYST_DIAMETER_MM))


_LESIONS: dict[str, Callable[[_Slice], None]] = {
    "normal": _no_lesion,
    "cyst": _cysts,
    "calculi": _calculi,
    "tumour": _renal_tumour,
    "caroli-focal": _caroli_focal,
    "caroli-diffuse": _caroli_diffuse,
    **{name: _no_lesion for name in LEVEL_CLASSES},
}
