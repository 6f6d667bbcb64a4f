"""Formula-driven fractal images for the source stage of a transfer chain.

Each category is a random iterated function system (IFS): a handful of 2-D affine
maps whose attractor is a fractal point pattern. Instances of a category are
slightly perturbed copies of its IFS, rendered by the chaos game at a random
pose and colour, in the spirit of Kataoka et al., "Pre-training without Natural
Images" (ACCV 2020, FractalDB). Everything is seeded, so no download is needed
and the same arguments always give byte-identical images.

Seeding: category k's system comes from a generator seeded with
``SeedSequence([seed, k], spawn_key=(CATEGORY_STREAM,))`` and image i of category
k from ``SeedSequence([seed, k, i])``, so a system never depends on how many
classes are asked for, and an image never depends on how many images are asked for.
"""

from __future__ import annotations

import numpy

# --- category systems -------------------------------------------------------
MIN_MAPS = 2
MAX_MAPS = 4
PARAM_LOW, PARAM_HIGH = -1.0, 1.0
# A map is kept only if its linear part shrinks every direction at least this much.
CONTRACTION_LIMIT = 0.95
# FractalDB's filling-rate filter: fraction of a FILL_CANVAS^2 canvas the attractor covers.
FILL_CANVAS = 64
MIN_FILL_RATE = 0.2
MAX_SYSTEM_ATTEMPTS = 10_000
# Separates the category streams from the instance streams (see module docstring).
CATEGORY_STREAM = 1

# --- chaos game -------------------------------------------------------------
POINTS_PER_PIXEL = 2.0  # points rendered per canvas pixel
RECORDED_STEPS = 16  # steps of each chain that are kept as points
BURN_IN_STEPS = 10  # steps discarded first (chains start on the attractor already)
MIN_MAP_PROBABILITY = 0.05  # floor on the |det|-proportional map probabilities

# --- per-instance variation -------------------------------------------------
PARAM_JITTER = 0.1  # each parameter scaled by a factor in [1 - j, 1 + j]
PARAM_NOISE = 0.05  # plus additive noise in [-n, n]
INSTANCE_CONTRACTION_LIMIT = 0.98  # perturbed maps are shrunk back below this
SCALE_RANGE = (0.6, 0.95)  # pattern size as a fraction of the canvas
MAX_SHIFT = 0.1  # translation, as a fraction of the canvas, per axis

# --- appearance -------------------------------------------------------------
HIT_GAIN = 0.7  # brightness = 1 - exp(-HIT_GAIN * hits in the pixel)
SATURATION_RANGE = (0.6, 1.0)  # per-map colours drawn in HSV space
VALUE_RANGE = (0.8, 1.0)
GREY_WEIGHTS = numpy.array([0.299, 0.587, 0.114])  # RGB -> luminance
GREY_FLOOR = 0.3  # so dark hues (pure blue) stay visible in grey images
BACKGROUND_MAX = 0.1  # background level drawn in [0, BACKGROUND_MAX]
NOISE_STD = 0.03  # Gaussian pixel noise, in units of full scale


# === category systems =======================================================


def category_systems(classes: int, seed: int) -> list[numpy.ndarray]:
    """One IFS per category: an array (n_maps, 6) of affine maps (a, b, c, d, e, f) meaning
    x' = a x + b y + e, y' = c x + d y + f, with 2..4 maps, drawn uniformly in [-1, 1] and kept only when
    the system is contractive-ish and its rendered attractor fills enough of the canvas (FractalDB's
    'filling rate' filter, e.g. >= 0.2 of a 64x64 canvas rendered from the point cloud's bounding box)."""
    if classes < 1:
        raise ValueError(f"classes must be >= 1, got {classes}")
    _check_seed(seed)
    return [_category_system(seed, k) for k in range(classes)]


def _category_system(seed: int, category: int) -> numpy.ndarray:
    """Rejection-sample one system from the category's own generator."""
    sequence = numpy.random.SeedSequence([seed, category], spawn_key=(CATEGORY_STREAM,))
    rng = numpy.random.default_rng(sequence)
    for _ in range(MAX_SYSTEM_ATTEMPTS):
        n_maps = int(rng.integers(MIN_MAPS, MAX_MAPS + 1))
        maps = numpy.stack([_contractive_map(rng) for _ in range(n_maps)])
        if _fill_rate(maps, rng) >= MIN_FILL_RATE:
            return maps
    raise RuntimeError(f"no IFS for category {category} passed the filling-rate filter")


def _contractive_map(rng: numpy.random.Generator) -> numpy.ndarray:
    """Draw (a, b, c, d, e, f) uniformly until the linear part is a contraction."""
    while True:
        params = rng.uniform(PARAM_LOW, PARAM_HIGH, size=6)
        if _largest_singular_values(params[None])[0] <= CONTRACTION_LIMIT:
            return params


def _fill_rate(maps: numpy.ndarray, rng: numpy.random.Generator) -> float:
    """Fraction of a FILL_CANVAS^2 canvas hit by the attractor, fitted to its bounding box."""
    points, _ = _chaos_game(maps, _point_count(FILL_CANVAS), rng)
    pixels = _to_pixels(_fit_unit_box(points), FILL_CANVAS)
    return numpy.unique(pixels[pixels >= 0]).size / FILL_CANVAS**2


# === chaos game =============================================================


def _largest_singular_values(maps: numpy.ndarray) -> numpy.ndarray:
    """Spectral norm of each map's 2x2 linear part."""
    return numpy.linalg.norm(_linear_parts(maps), ord=2, axis=(1, 2))


def _linear_parts(maps: numpy.ndarray) -> numpy.ndarray:
    return maps[:, :4].reshape(-1, 2, 2)


def _map_probabilities(maps: numpy.ndarray) -> numpy.ndarray:
    """FractalDB's choice: probability proportional to |det|, floored so no map vanishes."""
    dets = numpy.abs(numpy.linalg.det(_linear_parts(maps)))
    weights = dets / dets.sum() if dets.sum() > 0 else numpy.ones_like(dets)
    weights = numpy.maximum(weights, MIN_MAP_PROBABILITY)
    return weights / weights.sum()


def _fixed_points(maps: numpy.ndarray) -> numpy.ndarray:
    """Fixed point of each map (on the attractor), solving (I - A) p = t."""
    eye = numpy.eye(2)[None]
    shifts = maps[:, 4:6, None]
    return numpy.linalg.solve(eye - _linear_parts(maps), shifts)[:, :, 0]


def _point_count(size: int) -> int:
    return int(numpy.ceil(POINTS_PER_PIXEL * size * size))


def _chaos_game(
    maps: numpy.ndarray, n_points: int, rng: numpy.random.Generator
) -> tuple[numpy.ndarray, numpy.ndarray]:
    """Run many chains in parallel; return points (2, n) as rows x, y and the map behind each."""
    n_chains = -(-n_points // RECORDED_STEPS)
    total_steps = BURN_IN_STEPS + RECORDED_STEPS
    cumulative = numpy.cumsum(_map_probabilities(maps))
    choices = numpy.searchsorted(cumulative[:-1], rng.random((total_steps, n_chains)), side="right")
    a, b, c, d, e, f = numpy.moveaxis(maps[choices], -1, 0)  # each (total_steps, n_chains)
    x, y = _fixed_points(maps)[rng.integers(len(maps), size=n_chains)].T
    points = numpy.empty((2, RECORDED_STEPS, n_chains))
    for step in range(total_steps):
        x, y = a[step] * x + b[step] * y + e[step], c[step] * x + d[step] * y + f[step]
        if step >= BURN_IN_STEPS:
            points[0, step - BURN_IN_STEPS] = x
            points[1, step - BURN_IN_STEPS] = y
    map_ids = choices[BURN_IN_STEPS:].reshape(-1)[:n_points]
    return points.reshape(2, -1)[:, :n_points], map_ids


# === rendering ==============================================================


def _fit_unit_box(points: numpy.ndarray) -> numpy.ndarray:
    """Centre the cloud's bounding box on 0 and scale its longer side to 1 (aspect kept)."""
    low, high = points.min(axis=1, keepdims=True), points.max(axis=1, keepdims=True)
    extent = max(float((high - low).max()), 1e-12)
    return (points - (low + high) / 2) / extent


def _to_pixels(unit_points: numpy.ndarray, size: int) -> numpy.ndarray:
    """Flat pixel indices of points (2, n) in [-0.5, 0.5]^2 (x right, y up); outside ones are -1."""
    cols = numpy.floor((unit_points[0] + 0.5) * size).astype(numpy.int64)
    rows = numpy.floor((0.5 - unit_points[1]) * size).astype(numpy.int64)
    inside = (cols >= 0) & (cols < size) & (rows >= 0) & (rows < size)
    return numpy.where(inside, rows * size + cols, -1)


def _random_pose(points: numpy.ndarray, rng: numpy.random.Generator) -> numpy.ndarray:
    """Rotate, maybe mirror, scale and shift a unit-box cloud."""
    angle = rng.uniform(0.0, 2 * numpy.pi)
    cos, sin = numpy.cos(angle), numpy.sin(angle)
    mirror = -1.0 if rng.random() < 0.5 else 1.0
    scale = rng.uniform(*SCALE_RANGE)
    shift = rng.uniform(-MAX_SHIFT, MAX_SHIFT, size=2)
    pose = scale * numpy.array([[cos, -sin], [sin, cos]]) @ numpy.diag([mirror, 1.0])
    return pose @ points + shift[:, None]


def _perturb(maps: numpy.ndarray, rng: numpy.random.Generator) -> numpy.ndarray:
    """FractalDB-style intra-category variation, kept contractive."""
    factors = rng.uniform(1 - PARAM_JITTER, 1 + PARAM_JITTER, size=maps.shape)
    noisy = maps * factors + rng.uniform(-PARAM_NOISE, PARAM_NOISE, size=maps.shape)
    norms = _largest_singular_values(noisy)
    shrink = numpy.minimum(1.0, INSTANCE_CONTRACTION_LIMIT / numpy.maximum(norms, 1e-12))
    noisy[:, :4] *= shrink[:, None]
    return noisy


def _map_colours(n_maps: int, channels: int, rng: numpy.random.Generator) -> numpy.ndarray:
    """A bright random colour per map, (n_maps, channels); grey is its luminance, floored."""
    hue = rng.uniform(0.0, 1.0, size=(n_maps, 1))
    saturation = rng.uniform(*SATURATION_RANGE, size=(n_maps, 1))
    value = rng.uniform(*VALUE_RANGE, size=(n_maps, 1))
    colours = _hsv_to_rgb(hue, saturation, value)
    if channels == 1:
        return (GREY_FLOOR + (1.0 - GREY_FLOOR) * colours @ GREY_WEIGHTS)[:, None]
    return colours


def _hsv_to_rgb(hue: numpy.ndarray, saturation: numpy.ndarray, value: numpy.ndarray) -> numpy.ndarray:
    """Vectorised HSV -> RGB for column vectors in [0, 1]; returns (n, 3)."""
    k = (numpy.array([5.0, 3.0, 1.0]) + hue * 6.0) % 6.0
    ramp = numpy.clip(numpy.minimum(k, 4.0 - k), 0.0, 1.0)
    return value * (1.0 - saturation * ramp)


def _splat(pixels: numpy.ndarray, map_ids: numpy.ndarray, colours: numpy.ndarray, size: int) -> numpy.ndarray:
    """Image (channels, size, size): each pixel's mean hit colour times a saturating hit density."""
    keep = pixels >= 0
    n_maps, n_pixels = len(colours), size * size
    hits = numpy.bincount(map_ids[keep] * n_pixels + pixels[keep], minlength=n_maps * n_pixels)
    hits = hits.reshape(n_maps, n_pixels)  # hits per (map, pixel)
    counts = hits.sum(axis=0)
    mean_colour = (colours.T @ hits) / numpy.maximum(counts, 1)
    density = 1.0 - numpy.exp(-HIT_GAIN * counts)
    return (mean_colour * density).reshape(-1, size, size)


def _render_instance(
    maps: numpy.ndarray, size: int, channels: int, rng: numpy.random.Generator
) -> numpy.ndarray:
    """One uint8 image (channels, size, size) of a perturbed, posed, coloured attractor."""
    instance_maps = _perturb(maps, rng)
    points, map_ids = _chaos_game(instance_maps, _point_count(size), rng)
    pixels = _to_pixels(_random_pose(_fit_unit_box(points), rng), size)
    colours = _map_colours(len(maps), channels, rng)
    pattern = _splat(pixels, map_ids, colours, size)
    background = rng.uniform(0.0, BACKGROUND_MAX)
    noise = NOISE_STD * rng.standard_normal(pattern.shape, dtype=numpy.float32)
    image = background + (1.0 - background) * pattern + noise
    return numpy.round(numpy.clip(image, 0.0, 1.0) * 255).astype(numpy.uint8)


# === public generator =======================================================


def _check_seed(seed: int) -> None:
    if int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")


def _check_arguments(classes: int, images_per_class: int, size: int, seed: int, channels: int) -> None:
    if classes < 2:
        raise ValueError(f"classes must be >= 2 for a classification task, got {classes}")
    if images_per_class < 1:
        raise ValueError(f"images_per_class must be >= 1, got {images_per_class}")
    if size < 8:
        raise ValueError(f"size must be >= 8 pixels, got {size}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grey) or 3 (colour), got {channels}")
    _check_seed(seed)


def generate(
    classes: int, images_per_class: int, size: int = 64, seed: int = 0, channels: int = 3
) -> tuple[numpy.ndarray, numpy.ndarray]:
    """Returns (images uint8 (N, channels, size, size), labels int64 (N,)), N = classes*images_per_class,
    grouped by class in order. Instance i of category k: the category's IFS with small per-instance
    variation (FractalDB-style: each map's parameters scaled/perturbed by a small weight, plus a random
    rotation, flip, scale and translation of the rendered pattern), rendered as points by the chaos game,
    a random colour per instance (or per map), on a dark background with mild noise. Image i of category k is
    drawn from its own Generator seeded from numpy.random.SeedSequence([seed, k, i]) (the category systems from
    [seed, k] or similar), so more images per class keeps the first ones identical, and the same arguments give
    byte-identical output. channels=1 gives grey images. Raises ValueError with a clear message for classes < 2,
    images_per_class < 1, size < 8, channels not in (1, 3)."""
    _check_arguments(classes, images_per_class, size, seed, channels)
    images = numpy.empty((classes * images_per_class, channels, size, size), dtype=numpy.uint8)
    for k, maps in enumerate(category_systems(classes, seed)):
        for i in range(images_per_class):
            rng = numpy.random.default_rng(numpy.random.SeedSequence([seed, k, i]))
            images[k * images_per_class + i] = _render_instance(maps, size, channels, rng)
    labels = numpy.repeat(numpy.arange(classes, dtype=numpy.int64), images_per_class)
    return images, labels
