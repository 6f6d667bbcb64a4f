"""Tests of the synthetic abdominal CT phantom (mltl_ct.phantom): determinism, shapes, HU sanity, windowing."""

import functools

import numpy as np
import pytest
from mltl_ct import phantom
from mltl_ct.phantom import CLASSES, LEVEL_CLASSES, WINDOWS, _render, apply_window, generate, slice_hu


def rng_for(seed, label, i):
    return np.random.default_rng(np.random.SeedSequence([seed, CLASSES.index(label), i]))


# --- determinism ------------------------------------------------------------------------------------------


def test_same_seed_gives_identical_bytes():
    a_images, a_labels = generate(["normal", "cyst", "caroli-diffuse"], 3, size=48, seed=7)
    b_images, b_labels = generate(["normal", "cyst", "caroli-diffuse"], 3, size=48, seed=7)
    assert a_images.tobytes() == b_images.tobytes()
    assert a_labels.tobytes() == b_labels.tobytes()


def test_different_seed_gives_different_images():
    a, _ = generate(["normal"], 2, size=48, seed=0)
    b, _ = generate(["normal"], 2, size=48, seed=1)
    assert not np.array_equal(a, b)


def test_more_images_per_class_keeps_the_first_ones():
    small, _ = generate(["calculi", "normal"], 2, size=40, seed=3)
    big, _ = generate(["calculi", "normal"], 5, size=40, seed=3)
    np.testing.assert_array_equal(small[:2], big[:2])  # calculi 0, 1
    np.testing.assert_array_equal(small[2:], big[5:7])  # normal 0, 1


def test_image_depends_on_class_name_not_on_its_position_in_the_list():
    alone, _ = generate(["tumour"], 2, size=40, seed=2)
    among, labels = generate(["normal", "tumour"], 2, size=40, seed=2)
    np.testing.assert_array_equal(alone, among[2:])
    assert labels.tolist() == [0, 0, 1, 1]


def test_generate_matches_windowed_slice_hu():
    images, _ = generate(["caroli-focal"], 2, size=40, seed=4, window=WINDOWS["liver"])
    hu = slice_hu("caroli-focal", 40, rng_for(4, "caroli-focal", 1))
    np.testing.assert_array_equal(images[1], apply_window(hu, *WINDOWS["liver"]))


# --- shapes and types -------------------------------------------------------------------------------------


def test_generate_shapes_and_dtypes():
    images, labels = generate(CLASSES, 2, size=32, seed=0)
    assert images.shape == (len(CLASSES) * 2, 32, 32) and images.dtype == np.uint8
    assert labels.shape == (len(CLASSES) * 2,) and labels.dtype == np.int64
    assert labels.tolist() == [c for c in range(len(CLASSES)) for _ in range(2)]


def test_generate_with_no_images_per_class():
    images, labels = generate(["normal", "cyst"], 0, size=32)
    assert images.shape == (0, 32, 32) and labels.shape == (0,)


@pytest.mark.parametrize("label", CLASSES)
def test_slice_hu_is_float32_finite_and_in_ct_range(label):
    hu = slice_hu(label, 64, np.random.default_rng(0))
    assert hu.shape == (64, 64) and hu.dtype == np.float32
    assert np.isfinite(hu).all()
    assert hu.min() >= -1024 and hu.max() <= 3071


def test_other_sizes():
    assert slice_hu("normal", 150, np.random.default_rng(1)).shape == (150, 150)
    assert slice_hu("calculi", 97, np.random.default_rng(1)).shape == (97, 97)


# --- HU sanity --------------------------------------------------------------------------------------------


def test_air_outside_the_body_and_soft_tissue_inside():
    for i in range(8):
        hu = slice_hu(CLASSES[i % len(CLASSES)], 64, np.random.default_rng(i))
        corners = [hu[:6, :6], hu[:6, -6:], hu[-6:, :6], hu[-6:, -6:]]
        for corner in corners:
            assert abs(float(corner.mean()) + 1000.0) < 30.0
        centre = hu[24:40, 24:40]  # mid-abdomen: organs, bowel, fat, vessels
        assert -300.0 < float(np.median(centre)) < 250.0
        assert hu.max() > 400.0  # the vertebra (partial-volumed at 64 px), denser than any soft tissue


def test_noise_is_averaged_down_on_coarse_pixels():
    # NOISE_SD_HU holds per pixel of NOISE_REFERENCE_MM; a 64-px slice's 5.5 mm pixels average it down
    def air_noise(size):
        return np.mean([float(slice_hu("normal", size, np.random.default_rng(i))[:8, :8].std()) for i in range(4)])

    fine, coarse = air_noise(256), air_noise(64)  # 1.37 mm and 5.47 mm pixels
    assert 3.0 < fine < 25.0
    assert coarse < 0.5 * fine


def kidney_max_hu(label, n, size=96):
    """Per slice: the highest HU inside the kidneys (parenchyma and sinus)."""
    maxima = []
    for i in range(n):
        rendered = _render(label, size, rng_for(0, label, i))
        inside = rendered.layers["kidney"] > 0.5
        maxima.append(float(rendered.hu[inside].max()))
    return np.array(maxima)


@functools.cache
def liver_stats(label, n=12, size=96):
    """Per slice: the share of water-density (bile, cyst) pixels in the visible liver, and its highest HU."""
    shares, maxima = [], []
    for i in range(n):
        rendered = _render(label, size, rng_for(0, label, i))
        liver = rendered.layers["liver"] > 0.9
        shares.append(float(np.mean(rendered.hu[liver] < 25.0)))
        maxima.append(float(rendered.hu[liver].max()))
    return np.array(shares), np.array(maxima)


def test_caroli_saccules_add_bile_density_to_the_liver():
    normal, _ = liver_stats("normal")
    for label in ("caroli-focal", "caroli-diffuse"):
        caroli, _ = liver_stats(label)
        assert caroli.mean() > normal.mean() + 0.03, label
        assert np.mean(caroli > normal.max()) >= 0.7, label  # most slices show it, not a few outliers


def test_caroli_saccules_hold_stones_the_normal_liver_has_none():
    # intraductal stones (hepatolithiasis): the calculi primitive of the intermediate findings, in the liver
    _, normal = liver_stats("normal")
    _, focal = liver_stats("caroli-focal")
    _, diffuse = liver_stats("caroli-diffuse")
    assert normal.max() < 250.0  # enhanced liver and vessels stay below 200 HU, plus noise
    assert np.mean(focal > 300.0) >= 0.4  # FOCAL_STONE_PROBABILITY per saccule, partial-volumed
    assert np.mean(np.concatenate([focal, diffuse]) > 300.0) >= 0.4


def test_focal_saccules_stay_in_one_segment_and_diffuse_ones_spread(monkeypatch):
    sites = {}
    draw = phantom._draw_dilated_ducts

    def spy(st, root, where, *args, **kwargs):
        sites.setdefault(label, []).append(np.array(where))
        return draw(st, root, where, *args, **kwargs)

    monkeypatch.setattr(phantom, "_draw_dilated_ducts", spy)
    for label in ("caroli-focal", "caroli-diffuse"):
        for i in range(12):
            _render(label, 48, rng_for(0, label, i))

    def span(points):  # the largest distance between two saccules of one slice, mm
        return max(float(np.hypot(*(a - b))) for a in points for b in points)

    focal_counts = [len(p) for p in sites["caroli-focal"]]
    diffuse_counts = [len(p) for p in sites["caroli-diffuse"]]
    assert min(focal_counts) >= phantom.FOCAL_SACCULES[0] and max(focal_counts) <= phantom.FOCAL_SACCULES[1]
    assert min(diffuse_counts) >= phantom.DIFFUSE_SACCULES[0]
    assert max(span(p) for p in sites["caroli-focal"]) <= 2 * phantom.FOCAL_SEGMENT_RADIUS_MM[1]
    assert np.median([span(p) for p in sites["caroli-diffuse"]]) > np.median([span(p) for p in sites["caroli-focal"]])


def test_cysts_are_hepatic_or_renal():
    # the common findings share the rare target's primitives: water-density cysts in the liver too
    normal, _ = liver_stats("normal")
    cyst, _ = liver_stats("cyst")
    hepatic = cyst > normal.max()
    assert 0.2 <= hepatic.mean() <= 0.8  # HEPATIC_CYST_PROBABILITY = 0.5; the rest are renal


def test_calculi_are_dense_and_normal_kidneys_are_not():
    calculi = []
    for i in range(12):  # renal stones, or calcified gallstones
        rendered = _render("calculi", 96, rng_for(0, "calculi", i))
        inside = np.maximum(rendered.layers["kidney"], rendered.layers.get("gallbladder", 0.0)) > 0.5
        calculi.append(float(rendered.hu[inside].max()))
    normal = kidney_max_hu("normal", 12)  # enhanced cortex is at most 200 HU, plus noise
    assert np.mean(np.array(calculi) > 300.0) >= 0.6
    assert np.mean(normal > 300.0) <= 0.1


def test_level_classes_are_lesion_free_slices_from_their_third_of_the_abdomen():
    low, high = phantom.SLICE_LEVEL_RANGE
    for k, label in enumerate(LEVEL_CLASSES):
        for drawn in np.linspace(low, high, 7):
            level = phantom._slice_level(label, float(drawn))
            assert low + (high - low) * k / 3 - 1e-9 <= level <= low + (high - low) * (k + 1) / 3 + 1e-9
    assert phantom._slice_level("normal", 0.5) == 0.5
    # the upper abdomen has the big liver, the lower one its tip
    liver = {label: np.mean([_render(label, 48, rng_for(0, label, i)).layers["liver"].sum() for i in range(6)])
             for label in ("level-upper", "level-lower")}
    assert liver["level-upper"] > 1.5 * liver["level-lower"]


# --- errors -----------------------------------------------------------------------------------------------


def test_unknown_class_raises_naming_it_and_listing_classes():
    with pytest.raises(ValueError) as info:
        generate(["normal", "kidney-stone"], 2)
    message = str(info.value)
    assert "kidney-stone" in message
    for name in CLASSES:
        assert name in message
    with pytest.raises(ValueError, match="bogus"):
        slice_hu("bogus", 64, np.random.default_rng(0))


def test_bad_arguments_raise():
    with pytest.raises(ValueError):
        generate(["normal", "normal"], 2)
    with pytest.raises(ValueError):
        generate(["normal"], -1)
    with pytest.raises(ValueError):
        slice_hu("normal", 4, np.random.default_rng(0))


# --- windowing --------------------------------------------------------------------------------------------


def test_apply_window_arithmetic():
    out = apply_window(np.array([-1000.0, -160.0, 40.0, 240.0, 3000.0]), 40.0, 400.0)
    assert out.dtype == np.uint8
    assert out[0] == 0 and out[1] == 0
    assert out[2] in (127, 128)
    assert out[3] == 255 and out[4] == 255


def test_apply_window_is_linear_and_monotonic():
    hu = np.linspace(-500.0, 500.0, 1001)
    out = apply_window(hu, 60.0, 160.0).astype(int)
    assert (np.diff(out) >= 0).all()
    assert out[hu <= -20.0].max() == 0 and out[hu >= 140.0].min() == 255
    np.testing.assert_allclose(out[(hu > -20) & (hu < 140)], (hu[(hu > -20) & (hu < 140)] + 20) / 160 * 255, atol=0.51)


def test_apply_window_rejects_non_positive_width():
    with pytest.raises(ValueError):
        apply_window(np.zeros(3), 40.0, 0.0)


def test_windows():
    assert WINDOWS == {
        "abdomen": (40.0, 400.0),
        "liver": (60.0, 160.0),
        "soft-tissue": (50.0, 350.0),
        "bone": (400.0, 1800.0),
        "lung": (-600.0, 1500.0),
    }
    assert CLASSES == ("normal", "cyst", "calculi", "tumour", "caroli-focal", "caroli-diffuse",
                       "level-upper", "level-mid", "level-lower")


# --- the ct-phantom domain plugin (mltl_ct/__init__.py) -----------------------------------------------------


def test_domain_plugin_caches_and_checks(tmp_path, monkeypatch):
    import mltl

    monkeypatch.setenv("MLTL_CACHE_DIR", str(tmp_path))
    reg = mltl.get_registry()
    dom = reg.create("domain", "ct-phantom", {"classes": ["normal", "tumour"], "images_per_class": 5, "seed": 2},
                     extra={"image_size": 32})
    assert dom.images.shape == (10, 32, 32) and len(list(tmp_path.rglob("*.npz"))) == 1
    again = reg.create("domain", "ct-phantom", {"classes": ["normal", "tumour"], "images_per_class": 5, "seed": 2},
                       extra={"image_size": 32})
    assert (again.images == dom.images).all()
    with pytest.raises(mltl.UserError, match='unknown class "kidney"'):
        reg.create("domain", "ct-phantom", {"classes": ["normal", "kidney"]}, extra={"image_size": 32})
    with pytest.raises(mltl.UserError, match='unknown window "brain"'):
        reg.create("domain", "ct-phantom", {"window": "brain"}, extra={"image_size": 32})


def test_levels_choose_the_slices_and_default_to_the_whole_range(tmp_path, monkeypatch):
    import mltl

    monkeypatch.setenv("MLTL_CACHE_DIR", str(tmp_path))
    whole, _ = generate(["normal"], 4, size=32, seed=3)
    explicit, _ = generate(["normal"], 4, size=32, seed=3, levels=phantom.SLICE_LEVEL_RANGE)
    assert (whole == explicit).all()  # the default is the whole range, byte for byte
    # through the liver (upper abdomen) the liver is large; at the lower levels only its tip shows
    def liver(levels):
        return np.mean([_render("normal", 48, rng_for(1, "normal", i), levels).layers["liver"].sum() for i in range(8)])

    assert liver((0.03, 0.45)) > 2.0 * liver((0.55, 0.97))
    reg = mltl.get_registry()
    upper = reg.create("domain", "ct-phantom", {"classes": ["normal", "cyst"], "images_per_class": 3,
                                                "levels": [0.03, 0.45]}, extra={"image_size": 32})
    assert "levels 0.03-0.45" in upper.description and len(list(tmp_path.rglob("*.npz"))) == 1
    for bad in ([0.5, 0.2], [0.0, 0.4], [0.1]):
        with pytest.raises(mltl.UserError, match=r"levels must be \[low, high\]"):
            reg.create("domain", "ct-phantom", {"levels": bad}, extra={"image_size": 32})
    with pytest.raises(ValueError, match="levels must be"):
        generate(["normal"], 1, size=32, levels=(0.6, 0.4))


def test_cache_key_follows_the_generator_code(tmp_path, monkeypatch):
    import mltl
    import mltl_ct

    monkeypatch.setenv("MLTL_CACHE_DIR", str(tmp_path))
    opts = {"classes": ["normal", "cyst"], "images_per_class": 3, "seed": 9}
    mltl.get_registry().create("domain", "ct-phantom", opts, extra={"image_size": 32})
    monkeypatch.setattr(mltl_ct, "_generator_hash", lambda: "changed")
    mltl.get_registry().create("domain", "ct-phantom", opts, extra={"image_size": 32})
    assert len(list(tmp_path.rglob("*.npz"))) == 2  # a new generator version does not reuse the old file
