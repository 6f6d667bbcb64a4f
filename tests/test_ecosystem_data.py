"""The data side fitting its users' tools: the leakage audit on NumPy 1.x (no ``np.bitwise_count``), cache
folders where the platform keeps them (platformdirs, ``MLTL_CACHE_DIR``), MedMNIST files where the
official ``medmnist`` package keeps them (``~/.medmnist``)."""

import sys
import types

import numpy as np
import pytest
from PIL import Image

import mltl
from mltl import get_registry
from mltl.data import cache, datacheck, medmnist
from mltl.data.domain import Domain

# ---------------------------------------------------------------- NumPy 1.x: popcount without bitwise_count


def test_popcount_fallback_equals_the_fast_path(monkeypatch):
    rng = np.random.default_rng(0)
    hashes = rng.integers(0, 2**63, 300, dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, 300).astype(np.uint64)
    hashes[:3] = [0, np.iinfo(np.uint64).max, 1 << 63]
    pairs = hashes[:, None] ^ hashes[None, :]
    fast = datacheck.popcount64(pairs)
    expected = np.array([[bin(int(v)).count("1") for v in row] for row in pairs[:40]], dtype=np.uint8)
    np.testing.assert_array_equal(fast[:40], expected)
    monkeypatch.delattr(np, "bitwise_count", raising=False)        # NumPy 1.x: the lookup-table path
    assert not hasattr(np, "bitwise_count")
    slow = datacheck.popcount64(pairs)
    assert slow.dtype == fast.dtype == np.uint8 and slow.shape == fast.shape
    np.testing.assert_array_equal(slow, fast)
    assert datacheck.popcount64(np.array([], dtype=np.uint64)).shape == (0,)
    big_endian = pairs[:5, :5].astype(">u8")                       # the byte order does not matter
    np.testing.assert_array_equal(datacheck.popcount64(big_endian), fast[:5, :5])


def _near_duplicate_domain():
    from mltl_ct import ct_phantom_domain

    dom = ct_phantom_domain(["normal", "cyst", "calculi"], 20, seed=5, image_size=48)
    images = dom.images.copy()
    rng = np.random.default_rng(1)
    for src, dst in [(0, 30), (1, 41), (25, 55)]:               # planted twins: brighter, a little noise
        images[dst] = np.clip(images[src].astype(int) + 6 + rng.integers(-2, 3, images[src].shape), 0, 255)
    return Domain(classes=dom.classes, images=images, labels=dom.labels, ids=dom.ids)


def test_near_duplicate_audit_is_the_same_without_bitwise_count(monkeypatch, tmp_path):
    dom = _near_duplicate_domain()
    thumbs = datacheck.thumbnails(dom.images)
    fast_pairs = datacheck.near_duplicate_pairs(thumbs)
    fast_groups = datacheck.near_duplicate_groups(dom)
    assert {(0, 30), (1, 41), (25, 55)} <= {tuple(p) for p in fast_pairs.tolist()}
    # a folder audit (mltl data check) with twins across classes
    root = tmp_path / "data"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
    for i in range(12):
        Image.fromarray(dom.images[i]).save(root / ("a" if i % 2 else "b") / f"{i}.png")
    Image.fromarray(dom.images[30]).save(root / "a" / "twin-of-0.png")
    fast_report = datacheck.check_folder(root)

    monkeypatch.delattr(np, "bitwise_count", raising=False)
    np.testing.assert_array_equal(datacheck.near_duplicate_pairs(thumbs), fast_pairs)
    assert datacheck.near_duplicate_groups(dom) == fast_groups
    slow_report = datacheck.check_folder(root)
    assert slow_report == fast_report
    found = slow_report["domains"][0]
    assert found["near_duplicate_groups"] == 1
    assert found["duplicate_groups"][0]["ids"] == ["a/twin-of-0.png", "b/0.png"]


# ---------------------------------------------------------------- cache folders


def test_cache_dir_env_override_platformdirs_and_fallback(monkeypatch, tmp_path):
    from mltl_ct import _cache_dir as phantom_cache_dir

    monkeypatch.setenv("MLTL_CACHE_DIR", str(tmp_path / "mine"))
    assert cache.cache_dir() == tmp_path / "mine"
    assert phantom_cache_dir() == tmp_path / "mine" / "ct-phantom"
    monkeypatch.delenv("MLTL_CACHE_DIR")
    # platformdirs installed: its user cache folder for "mltl"
    fake = types.ModuleType("platformdirs")
    calls = []

    def user_cache_dir(appname, appauthor=None):
        calls.append((appname, appauthor))
        return str(tmp_path / "platform" / appname)

    fake.user_cache_dir = user_cache_dir
    monkeypatch.setitem(sys.modules, "platformdirs", fake)
    assert cache.cache_dir() == tmp_path / "platform" / "mltl"
    assert phantom_cache_dir() == tmp_path / "platform" / "mltl" / "ct-phantom"
    assert calls[0] == ("mltl", False)
    # without platformdirs: $XDG_CACHE_HOME/mltl, else ~/.cache/mltl
    monkeypatch.setitem(sys.modules, "platformdirs", None)          # import platformdirs -> ImportError
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache.cache_dir() == tmp_path / "home" / ".cache" / "mltl"
    assert phantom_cache_dir() == tmp_path / "home" / ".cache" / "mltl" / "ct-phantom"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_dir() == tmp_path / "xdg" / "mltl"


def test_real_platformdirs_when_installed(monkeypatch, tmp_path):
    platformdirs = pytest.importorskip("platformdirs")
    monkeypatch.delenv("MLTL_CACHE_DIR", raising=False)
    assert cache.cache_dir() == type(cache.cache_dir())(platformdirs.user_cache_dir("mltl", appauthor=False))


def test_decode_cache_is_written_under_the_platform_folder(monkeypatch, tmp_path):
    fake = types.ModuleType("platformdirs")
    fake.user_cache_dir = lambda appname, appauthor=None: str(tmp_path / "plat" / appname)
    monkeypatch.setitem(sys.modules, "platformdirs", fake)
    monkeypatch.delenv("MLTL_CACHE_DIR", raising=False)
    monkeypatch.delenv("MLTL_CACHE", raising=False)
    f = tmp_path / "x.png"
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(f)
    cache.clear_memory()
    out = cache.cached_decode([f], {"reader": "test-ecosystem"}, lambda p: np.asarray(Image.open(p)))
    assert out.shape == (1, 8, 8)
    assert list((tmp_path / "plat" / "mltl" / "decoded").rglob("*.npy"))


# ---------------------------------------------------------------- MedMNIST in ~/.medmnist


def _fake_npz(path, classes=11, n=(22, 11, 11)):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, count in zip(("train", "val", "test"), n):
        arrays[f"{split}_images"] = rng.integers(0, 255, (count, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(count) % classes).reshape(-1, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)


def create(options):
    return get_registry().create("domain", "medmnist", options, key="stages[0].domain", extra={"image_size": 28})


def test_medmnist_found_in_the_official_packages_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MLTL_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("MLTL_OFFLINE", "1")
    assert medmnist.medmnist_package_dir() == tmp_path / "home" / ".medmnist"
    with pytest.raises(mltl.UserError, match=r"data/organamnist.npz not found .*at .*data/organamnist.npz \(or in "
                                             r".*home/.medmnist, the medmnist package's folder\)"):
        create({"flag": "organamnist"})
    _fake_npz(tmp_path / "home" / ".medmnist" / "organamnist.npz")
    dom = create({"flag": "organamnist"})                          # no download: the package's copy
    assert len(dom) == 44 and dom.ids[0].startswith("organamnist/")
    assert not (tmp_path / "data" / "organamnist.npz").exists()
    # a file in mltl's own data folder comes first
    _fake_npz(tmp_path / "data" / "organamnist.npz", n=(11, 11, 11))
    assert len(create({"flag": "organamnist"})) == 33
    # the MedMNIST+ sizes use the package's names too
    _fake_npz(tmp_path / "home" / ".medmnist" / "organamnist_64.npz")
    assert len(create({"flag": "organamnist", "resolution": 64})) == 44
