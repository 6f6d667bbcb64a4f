"""The decode cache (mltl.data.cache): decode once, keyed by file content and settings, never trusting a bad entry."""

import functools
import logging

import numpy as np
import pytest
from PIL import Image

from mltl.data import cache
from mltl.data.images import read_image


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    """A cache folder of the test's own, and nothing kept in memory from other tests."""
    monkeypatch.setenv("MLTL_CACHE_DIR", str(tmp_path / "cache"))
    cache.clear_memory()
    yield tmp_path / "cache"
    cache.clear_memory()


def make_images(folder, n=6, size=40):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        p = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


class Counting:
    """A decoder that counts its calls (read_image underneath, as the image-folder domain uses it)."""

    def __init__(self, size=16):
        self.calls = []
        self.size = size

    def __call__(self, path):
        self.calls.append(path.name)
        return read_image(path, channels=1, size=self.size)


SETTINGS = {"reader": "test", "size": 16, "channels": 1}


def test_second_load_decodes_nothing_from_memory_or_disk(tmp_path, own_cache):
    paths = make_images(tmp_path / "imgs")
    dec = Counting()
    first = cache.decode_cached(paths, SETTINGS, dec)
    assert first.source == "decoded" and len(dec.calls) == 6 and first.images.shape == (6, 16, 16)
    expected = np.stack([read_image(p, channels=1, size=16) for p in paths])
    assert np.array_equal(first.images, expected)

    again = cache.decode_cached(paths, SETTINGS, dec)  # same process: memory
    assert again.source == "memory" and len(dec.calls) == 6
    assert np.array_equal(again.images, expected)
    again.images[:] = 0  # a caller writing to its copy does not poison the cache
    assert np.array_equal(cache.cached_decode(paths, SETTINGS, dec), expected)

    cache.clear_memory()  # a new run: from the disk cache, as a memory map that need not be read whole
    disk = cache.decode_cached(paths, SETTINGS, dec)
    assert disk.source == "disk" and len(dec.calls) == 6
    assert np.array_equal(disk.images, expected)
    mm = cache.decode_cached(paths, SETTINGS, dec, mmap=True)
    assert isinstance(mm.images, np.memmap) and mm.images.mode == "r" and len(dec.calls) == 6
    npy = list(own_cache.rglob("*.npy"))
    assert len(npy) == 1 and np.array_equal(np.load(npy[0], mmap_mode="r"), expected)


def test_changed_file_invalidates_only_its_entry(tmp_path, own_cache):
    paths = make_images(tmp_path / "imgs")
    dec = Counting()
    cache.decode_cached(paths, SETTINGS, dec, source="folder")
    cache.clear_memory()
    Image.fromarray(np.full((40, 40), 200, dtype=np.uint8)).save(paths[2])  # replaced in place
    dec.calls.clear()
    res = cache.decode_cached(paths, SETTINGS, dec, source="folder")
    assert dec.calls == ["img2.png"] and res.reused == 5 and res.source == "decoded"
    assert np.all(res.images[2] == 200)
    assert len(list(own_cache.rglob("*.npy"))) == 1  # the superseded stack of this source is gone


def test_corrupted_cache_file_is_rebuilt_never_trusted(tmp_path, own_cache, caplog):
    paths = make_images(tmp_path / "imgs")
    dec = Counting()
    good = cache.cached_decode(paths, SETTINGS, dec)
    npy = next(own_cache.rglob("*.npy"))
    for damage in ("flip", "truncate", "metadata"):
        cache.clear_memory()
        if damage == "flip":  # one pixel changed: the file still opens, the row digest catches it
            data = bytearray(npy.read_bytes())
            data[-5] ^= 0xFF
            npy.write_bytes(bytes(data))
        elif damage == "truncate":
            npy.write_bytes(npy.read_bytes()[:300])
        else:
            npy.with_suffix(".json").write_text("{not json")
        dec.calls.clear()
        with caplog.at_level(logging.WARNING, logger="mltl.data.cache"):
            res = cache.decode_cached(paths, SETTINGS, dec)
        assert res.source == "decoded" and len(dec.calls) == 6, damage
        assert np.array_equal(res.images, good), damage
        assert "unusable" in caplog.text and "rebuilt" in caplog.text
        caplog.clear()
        cache.clear_memory()
        assert cache.decode_cached(paths, SETTINGS, dec).source == "disk"  # rebuilt entry verifies


def test_settings_or_decoder_change_gives_a_new_key(tmp_path, own_cache):
    paths = make_images(tmp_path / "imgs")
    a = cache.decode_cached(paths, SETTINGS, Counting(16))
    b_dec = Counting(24)
    b = cache.decode_cached(paths, {**SETTINGS, "size": 24}, b_dec)
    assert a.key.split("/")[0] != b.key.split("/")[0] and len(b_dec.calls) == 6 and b.images.shape == (6, 24, 24)
    # the same settings with another decoder function (another reader) is another key as well
    other = functools.partial(read_image, channels=1, size=16, who="other")
    assert cache.settings_key(SETTINGS, other) != cache.settings_key(SETTINGS, Counting(16))
    assert cache.settings_key(SETTINGS, other) != cache.settings_key(
        SETTINGS, functools.partial(read_image, channels=3, size=16))


def test_image_folder_domain_decodes_once(tmp_path, own_cache, monkeypatch):
    from mltl import builtins

    root = tmp_path / "data"
    make_images(root / "a", 4)
    make_images(root / "b", 3)
    calls = []

    def counting_read(path, **kw):
        calls.append(path)
        return read_image(path, **kw)

    monkeypatch.setattr(builtins, "read_image", counting_read)
    one = builtins.image_folder_domain(str(root), image_size=16)
    assert len(calls) == 7
    cache.clear_memory()
    two = builtins.image_folder_domain(str(root), image_size=16)
    assert len(calls) == 7  # the second load (a new run) decodes nothing
    assert np.array_equal(one.images, two.images) and one.ids == two.ids
    builtins.image_folder_domain(str(root), image_size=20)
    assert len(calls) == 14  # another input size is another key


def test_disk_cache_off_and_bad_decoder_output(tmp_path, own_cache, monkeypatch):
    paths = make_images(tmp_path / "imgs", 3)
    monkeypatch.setenv("MLTL_CACHE", "0")
    dec = Counting()
    cache.cached_decode(paths, SETTINGS, dec)
    assert not own_cache.exists() and len(dec.calls) == 3
    monkeypatch.delenv("MLTL_CACHE")
    shapes = iter([(4, 4), (5, 5), (4, 4)])
    with pytest.raises(ValueError, match="every file must decode to uint8"):
        cache.cached_decode(paths, {"reader": "bad"}, lambda p: np.zeros(next(shapes), np.uint8))


def test_a_stack_over_the_memory_budget_is_decoded_into_its_file_not_held_in_memory(tmp_path, own_cache,
                                                                                      monkeypatch):
    paths = make_images(tmp_path / "imgs", n=40)
    expected = np.stack([read_image(p, channels=1, size=16) for p in paths])
    monkeypatch.setenv("MLTL_CACHE_MEMORY_MB", "0.001")  # 1 KB: every stack is "too big"
    dec = Counting()
    got = cache.decode_cached(paths, SETTINGS, dec, workers=2)
    assert got.source == "decoded" and len(dec.calls) == 40
    assert isinstance(got.images, np.memmap) and np.array_equal(got.images, expected)
    assert [p.name for p in own_cache.rglob("*.npy")] and not list(own_cache.rglob("*.tmp*"))
    again = cache.decode_cached(paths, SETTINGS, dec)  # from the file it was decoded into, verified
    assert again.source == "disk" and len(dec.calls) == 40 and np.array_equal(again.images, expected)

    def failing(path):
        if path.name == "img30.png":
            raise ValueError("bad file")
        return read_image(path, channels=1, size=16)

    with pytest.raises(ValueError, match="bad file"):
        cache.decode_cached(paths, {**SETTINGS, "size": 17}, failing)
    assert not list(own_cache.rglob("*.tmp*"))  # a failed decode leaves no half-written stack
