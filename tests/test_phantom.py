"""The CT phantom: deterministic, HU-valued, windowed correctly, fast enough to be the demo's data."""

import numpy as np
import pytest

from mltl_ct.phantom import CLASSES, WINDOWS, apply_window, generate, slice_hu


def test_deterministic_and_prefix_stable():
    a, la = generate(["normal", "cyst"], 4, size=48, seed=3)
    b, lb = generate(["normal", "cyst"], 4, size=48, seed=3)
    assert a.tobytes() == b.tobytes() and (la == lb).all()
    more, _ = generate(["normal", "cyst"], 6, size=48, seed=3)
    assert (more[:4] == a[:4]).all() and (more[6:10] == a[4:8]).all()  # more images keep the first ones
    other, _ = generate(["normal", "cyst"], 4, size=48, seed=4)
    assert not (other == a).all()


def test_shapes_dtypes_and_labels():
    images, labels = generate(list(CLASSES), 2, size=40, seed=0)
    assert images.shape == (12, 40, 40) and images.dtype == np.uint8
    assert labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]


def test_hounsfield_units_are_plausible():
    rng = np.random.default_rng(0)
    hu = slice_hu("calculi", 128, rng)
    assert hu.dtype == np.float32
    corners = np.concatenate([hu[:4, :4].ravel(), hu[-4:, -4:].ravel()])
    assert np.median(corners) < -900  # air outside the body
    assert hu.max() > 200  # bone or stone
    body = hu[48:80, 48:80]
    assert -200 < np.median(body) < 300  # soft tissue inside


def test_windowing_arithmetic():
    level, width = WINDOWS["abdomen"]
    assert (level, width) == (40, 400)
    out = apply_window(np.array([-1000, -160, 40, 240, 3000], np.float32), level, width)
    assert out.dtype == np.uint8
    assert out[0] == 0 and out[1] == 0 and out[3] == 255 and out[4] == 255 and out[2] in (127, 128)


def test_unknown_class_is_named():
    with pytest.raises(ValueError, match="carolli"):
        generate(["normal", "carolli"], 2)


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
