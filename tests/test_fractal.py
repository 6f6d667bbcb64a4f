"""Tests for mltl.data.fractal, the seeded IFS fractal image generator."""

import numpy
import pytest

from mltl.data.fractal import category_systems, generate

SIZE = 32


def _radial_power_profile(image: numpy.ndarray) -> numpy.ndarray:
    """Log radially averaged power spectrum of the grey image: blind to shift and rotation."""
    grey = image.astype(float).mean(axis=0)
    grey -= grey.mean()
    power = numpy.abs(numpy.fft.fftshift(numpy.fft.fft2(grey))) ** 2
    n = grey.shape[0]
    rows, cols = numpy.indices(power.shape)
    radius = numpy.hypot(rows - n // 2, cols - n // 2).astype(int).ravel()
    profile = numpy.bincount(radius, power.ravel()) / numpy.bincount(radius)
    return numpy.log(profile[: n // 2] + 1e-9)


def test_same_arguments_give_identical_bytes():
    first = generate(3, 4, size=SIZE, seed=5)
    second = generate(3, 4, size=SIZE, seed=5)
    assert first[0].tobytes() == second[0].tobytes()
    assert numpy.array_equal(first[1], second[1])


def test_other_seed_gives_other_images():
    images_a, _ = generate(2, 2, size=SIZE, seed=0)
    images_b, _ = generate(2, 2, size=SIZE, seed=1)
    assert not numpy.array_equal(images_a, images_b)


def test_more_images_per_class_keeps_the_first_ones():
    few, _ = generate(3, 2, size=SIZE, seed=7)
    many, _ = generate(3, 5, size=SIZE, seed=7)
    for k in range(3):
        assert numpy.array_equal(few[2 * k : 2 * k + 2], many[5 * k : 5 * k + 2])


def test_more_classes_keeps_the_first_classes():
    few, _ = generate(2, 3, size=SIZE, seed=7)
    many, _ = generate(4, 3, size=SIZE, seed=7)
    assert numpy.array_equal(few, many[:6])
    for small, large in zip(category_systems(2, 7), category_systems(4, 7)):
        assert numpy.array_equal(small, large)


def test_shapes_dtypes_labels_and_value_range():
    images, labels = generate(3, 4, size=SIZE, seed=1)
    assert images.shape == (12, 3, SIZE, SIZE)
    assert images.dtype == numpy.uint8
    assert labels.dtype == numpy.int64
    assert labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    for image in images:
        assert image.max() >= 200  # a bright pattern ...
        assert numpy.median(image) <= 40  # ... on a dark background


def test_minimum_size_and_larger_size_work():
    small, _ = generate(2, 1, size=8, seed=0)
    large, _ = generate(2, 1, size=100, seed=0)
    assert small.shape == (2, 3, 8, 8)
    assert large.shape == (2, 3, 100, 100)


def test_grey_and_colour():
    grey, _ = generate(2, 3, size=SIZE, seed=2, channels=1)
    colour, _ = generate(2, 3, size=SIZE, seed=2, channels=3)
    assert grey.shape == (6, 1, SIZE, SIZE)
    assert grey.dtype == numpy.uint8
    channel_spread = colour.astype(int).max(axis=1) - colour.astype(int).min(axis=1)
    assert channel_spread.mean() > 5  # colour images are not grey in disguise


def test_category_systems_are_small_contractive_ifs():
    systems = category_systems(6, seed=3)
    assert len(systems) == 6
    for maps in systems:
        assert maps.ndim == 2 and maps.shape[1] == 6
        assert 2 <= maps.shape[0] <= 4
        assert numpy.all(numpy.abs(maps) <= 1.0)
        linear = maps[:, :4].reshape(-1, 2, 2)
        assert numpy.all(numpy.linalg.norm(linear, ord=2, axis=(1, 2)) < 1.0)
    assert not numpy.array_equal(systems[0], systems[1])


def test_categories_differ_more_than_instances_of_one_category():
    images, labels = generate(5, 12, size=SIZE, seed=0)
    features = numpy.stack([_radial_power_profile(image) for image in images])
    distances = numpy.linalg.norm(features[:, None] - features[None], axis=-1)
    same_class = labels[:, None] == labels[None]
    not_self = ~numpy.eye(len(labels), dtype=bool)
    within = numpy.median(distances[same_class & not_self])
    between = numpy.median(distances[~same_class])
    assert within < 0.9 * between


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(classes=1, images_per_class=2), "classes"),
        (dict(classes=2, images_per_class=0), "images_per_class"),
        (dict(classes=2, images_per_class=2, size=7), "size"),
        (dict(classes=2, images_per_class=2, channels=2), "channels"),
        (dict(classes=2, images_per_class=2, channels=4), "channels"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate(**kwargs)
