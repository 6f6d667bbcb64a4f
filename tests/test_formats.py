"""Image files of every kind, the csv-manifest domain and the medmnist domain (offline, and a served download)."""

import hashlib
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import mltl
from mltl import get_registry
from mltl.data.images import read_image

ROOT = Path(__file__).resolve().parents[1]


def create(plugin, options, size=16):
    return get_registry().create("domain", plugin, options, key="stages[1].domain", extra={"image_size": size})


def mltl_cli(*args, env=None):
    import os

    return subprocess.run([sys.executable, "-m", "mltl", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "MLTL_QUIET": "1", **(env or {})})


# ---------------------------------------------------------------------------------------------- images

def gradient(h=24, w=32):
    y, x = np.mgrid[0:h, 0:w]
    return ((x * 255) // (w - 1)).astype(np.uint8), ((y * 255) // (h - 1)).astype(np.uint8)


@pytest.mark.parametrize("fmt,suffix", [("PNG", ".png"), ("JPEG", ".jpg"), ("BMP", ".bmp"), ("TIFF", ".tif"),
                                        ("WEBP", ".webp"), ("GIF", ".gif")])
def test_every_format_decodes_to_the_same_picture(tmp_path, fmt, suffix):
    gx, gy = gradient()
    rgb = np.stack([gx, gy, 255 - gx], axis=-1)
    path = tmp_path / f"x{suffix}"
    Image.fromarray(rgb).save(path, fmt, **({"quality": 95} if fmt in ("JPEG", "WEBP") else {}))
    out = read_image(path, channels=3, size=32)
    assert out.shape == (3, 32, 32) and out.dtype == np.uint8
    ref = np.asarray(Image.fromarray(rgb).resize((32, 32), Image.Resampling.BILINEAR)).transpose(2, 0, 1)
    tolerance = 40 if fmt == "GIF" else 12  # GIF is palettised, JPEG/WEBP lossy
    assert np.abs(out.astype(int) - ref).mean() < tolerance


def test_extension_that_lies_is_decoded_by_content(tmp_path):
    gx, _ = gradient()
    Image.fromarray(gx).save(tmp_path / "really_a_png.jpg", "PNG")
    Image.fromarray(gx).save(tmp_path / "really_a_bmp.png", "BMP")
    for name in ("really_a_png.jpg", "really_a_bmp.png"):
        out = read_image(tmp_path / name, channels=1, size=32)
        np.testing.assert_array_equal(out[:24], np.asarray(Image.fromarray(gx).resize((32, 32)))[:24])


def test_sixteen_bit_grey_is_scaled_by_its_own_range(tmp_path):
    raw = np.linspace(1000, 41000, 16 * 16).reshape(16, 16).astype(np.uint16)
    for fmt, suffix in (("PNG", ".png"), ("TIFF", ".tif")):
        Image.fromarray(raw).save(tmp_path / f"s{suffix}", fmt)
        out = read_image(tmp_path / f"s{suffix}", channels=1, size=16)
        expected = np.round((raw.astype(float) - 1000) / 40000 * 255)
        assert np.abs(out - expected).max() <= 1, fmt
        assert out.min() == 0 and out.max() == 255


def test_float_tiff_and_constant_sixteen_bit(tmp_path):
    Image.fromarray(np.linspace(-1, 1, 64, dtype=np.float32).reshape(8, 8)).save(tmp_path / "f.tif")
    out = read_image(tmp_path / "f.tif", channels=1, size=8)
    assert out[0, 0] == 0 and out[-1, -1] == 255
    Image.fromarray(np.full((8, 8), 1234, np.uint16)).save(tmp_path / "c.png")
    assert read_image(tmp_path / "c.png", channels=1, size=8).max() == 0


def test_rgba_is_composited_on_black(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = 200           # white-ish colour everywhere ...
    rgba[:, :4, 3] = 255          # ... opaque on the left half
    rgba[:, 4:, 3] = 0            # transparent on the right half: must become black, not 200
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = read_image(tmp_path / "a.png", channels=1, size=8)
    assert (out[:, :4] == 200).all() and (out[:, 4:] == 0).all()
    la = np.stack([np.full((8, 8), 100, np.uint8), np.full((8, 8), 128, np.uint8)], axis=-1)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    assert abs(int(read_image(tmp_path / "la.png", channels=1, size=8)[0, 0]) - 50) <= 1


def test_palette_images_with_and_without_transparency(tmp_path):
    im = Image.new("P", (8, 8))
    im.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    im.paste(1, (0, 0, 4, 8))
    im.paste(2, (4, 0, 8, 8))
    im.save(tmp_path / "p.png")
    out = read_image(tmp_path / "p.png", channels=3, size=8)
    assert tuple(out[:, 0, 0]) == (255, 0, 0) and tuple(out[:, 0, 7]) == (0, 0, 255)
    im.save(tmp_path / "pt.png", transparency=2)  # blue made transparent -> black
    out = read_image(tmp_path / "pt.png", channels=3, size=8)
    assert tuple(out[:, 0, 0]) == (255, 0, 0) and tuple(out[:, 0, 7]) == (0, 0, 0)
    grey = read_image(tmp_path / "p.png", channels=1, size=8)
    assert abs(int(grey[0, 0]) - round(0.299 * 255)) <= 1  # BT.601 luma of pure red


def test_first_frame_of_a_multipage_tiff(tmp_path):
    frames = [Image.fromarray(np.full((8, 8), v, np.uint8)) for v in (10, 200)]
    frames[0].save(tmp_path / "m.tif", save_all=True, append_images=frames[1:])
    assert (read_image(tmp_path / "m.tif", channels=1, size=8) == 10).all()


@pytest.mark.parametrize("content,reason", [
    (b"", "the file is empty"),
    (b"patient list, not an image\n", "not an image format Pillow can decode"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00", "the image file is truncated"),
])
def test_bad_files_name_the_file_and_the_reason(tmp_path, content, reason):
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(mltl.UserError, match=rf"who: cannot read image {path}: .*{reason}.*; remove or replace the file"):
        read_image(path, channels=1, size=8, who="who")


def test_truncated_jpeg_and_a_dicom_in_an_image_folder(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(buf, "JPEG")
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(mltl.UserError, match=r"cut.jpg: the image file is truncated"):
        read_image(tmp_path / "cut.jpg", channels=1, size=8)
    (tmp_path / "scan.png").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)
    with pytest.raises(mltl.UserError, match=r'scan.png: it is a DICOM file; read DICOM with the "dicom" domain'):
        read_image(tmp_path / "scan.png", channels=1, size=8)


def test_image_folder_skips_hidden_files_and_loads_mixed_kinds(tmp_path):
    gx, gy = gradient()
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.fromarray(gx if cls == "a" else gy).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "a" / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # macOS resource fork
    Image.fromarray(np.stack([gx] * 3 + [np.full_like(gx, 255)], -1), "RGBA").save(tmp_path / "a" / "rgba.webp")
    Image.fromarray((gx.astype(np.uint16) * 200)).save(tmp_path / "b" / "deep.tif")
    dom = create("image-folder", {"root": str(tmp_path), "channels": 3})
    assert dom.images.shape == (8, 3, 16, 16) and not any("._" in i for i in dom.ids)


# ---------------------------------------------------------------------------------------- csv manifest

def write_images(folder, n, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (20, 20), dtype=np.uint8)).save(folder / f"im{i}.png")
        names.append(f"{folder.name}/im{i}.png")
    return names


def test_manifest_with_patients_and_splits(tmp_path, monkeypatch):
    monkeypatch.setenv("MLTL_SALT", "test-salt")
    names = write_images(tmp_path / "imgs", 12)
    rows = ["Path,Diagnosis,Patient_ID,Split"]
    for i, n in enumerate(names):
        rows.append(f"{n},{'cyst' if i % 2 else 'normal'},MRN-{i // 2:04d},{['train', 'validation', 'TEST'][i // 4]}")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    dom = create("csv-manifest", {"csv": str(tmp_path / "m.csv"), "label_column": "diagnosis"})
    assert dom.classes == ("cyst", "normal") and dom.images.shape == (12, 16, 16)
    assert dom.splits == tuple(["train"] * 4 + ["val"] * 4 + ["test"] * 4)
    assert dom.ids[0] == "imgs/im0.png"
    assert dom.groups[0] == dom.groups[1] != dom.groups[2]   # one patient, one group
    assert all(g.startswith("p-") and "MRN" not in g for g in dom.groups)   # only salted hashes
    assert "MRN" not in dom.description
    # the image really is the file listed on that row
    np.testing.assert_array_equal(dom.images[5], read_image(tmp_path / names[5], channels=1, size=16))


def test_manifest_paths_relative_to_the_csv_and_numeric_labels(tmp_path):
    names = write_images(tmp_path / "data" / "x", 6)
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "m.csv").write_text(
        "path;label\n" + "\n".join(f"../data/{n};{i % 3 * 5}" for i, n in enumerate(names)) + "\n")
    dom = create("csv-manifest", {"csv": str(tmp_path / "lists" / "m.csv"), "delimiter": ";"})
    assert dom.classes == ("0", "5", "10") and dom.groups is None and dom.splits is None


@pytest.mark.parametrize("csv,message", [
    ("file,label\nimgs/im0.png,a\n", r'no column "path" in the header \(file, label\); add it or set the domain\'s path_column'),
    ("path\timgs/im0.png\n", r'no column "path" .*separated by \';\' or tabs'),
    ("path,label\nimgs/im0.png,a\nimgs/nope.png,b\n", r"m.csv line 3: file imgs/nope.png not found \(looked at .*\)"),
    ("path,label,split\nimgs/im0.png,a,train\nimgs/im1.png,b,holdout\n", r'm.csv line 3: unknown split "holdout"; use train, val or test'),
    ("path,label\nimgs/im0.png,a\nimgs/im1.png,\n", r'm.csv line 3: empty "label"'),
    ("path,label\nimgs/im0.png,a\nimgs/im0.png,b\n", r"m.csv line 3: imgs/im0.png is listed again \(first on line 2\)"),
    ("path,label\nimgs/im0.png,a\nimgs/im1.png,a\n", r"1 class\(es\) \(a\); a classifier needs at least 2"),
    ("", r"the manifest is empty"),
])
def test_manifest_errors_name_the_line(tmp_path, csv, message):
    write_images(tmp_path / "imgs", 2)
    (tmp_path / "m.csv").write_text(csv)
    with pytest.raises(mltl.UserError, match=message):
        create("csv-manifest", {"csv": str(tmp_path / "m.csv")})


def test_manifest_explicit_group_column_must_exist_and_bad_image_names_the_line(tmp_path):
    names = write_images(tmp_path / "imgs", 4)
    (tmp_path / "m.csv").write_text("path,label\n" + "\n".join(f"{n},{i % 2}" for i, n in enumerate(names)))
    with pytest.raises(mltl.UserError, match=r'no column "patient" in the header'):
        create("csv-manifest", {"csv": str(tmp_path / "m.csv"), "group_column": "patient"})
    (tmp_path / "imgs" / "im3.png").write_bytes(b"")
    with pytest.raises(mltl.UserError, match=r"m.csv line 5: cannot read image .*im3.png: the file is empty"):
        create("csv-manifest", {"csv": str(tmp_path / "m.csv")})


# -------------------------------------------------------------------------------------------- medmnist

def fake_medmnist(path, *, n=(20, 6, 8), classes=3, rgb=False, label_shape="N1", size=28, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, k in zip(("train", "val", "test"), n):
        shape = (k, size, size, 3) if rgb else (k, size, size)
        arrays[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        labels = (np.arange(k) % classes).astype(np.uint8)
        arrays[f"{split}_labels"] = labels[:, None] if label_shape == "N1" else labels
    np.savez_compressed(path, **arrays)
    return arrays


def test_medmnist_real_breastmnist(shared_data):
    dom = create("medmnist", {"path": str(shared_data / "medmnist" / "breastmnist.npz")})
    assert dom.classes == ("malignant", "normal, benign")
    assert [dom.splits.count(s) for s in ("train", "val", "test")] == [546, 78, 156]
    assert dom.images.shape == (780, 28, 28) and dom.images.std() > 20
    with np.load(shared_data / "medmnist" / "breastmnist.npz") as z:
        np.testing.assert_array_equal(dom.images[546:546 + 78], z["val_images"])
        np.testing.assert_array_equal(dom.labels[:546], z["train_labels"].reshape(-1))


@pytest.mark.parametrize("label_shape", ["N", "N1"])
def test_medmnist_label_shapes_and_rgb(tmp_path, label_shape):
    arrays = fake_medmnist(tmp_path / "pathmnist.npz", rgb=True, label_shape=label_shape, classes=9, n=(18, 9, 9))
    dom = create("medmnist", {"path": str(tmp_path / "pathmnist.npz")})
    assert dom.images.shape == (36, 3, 28, 28) and dom.classes[0] == "adipose"   # names from the known flag
    np.testing.assert_array_equal(dom.images[0], arrays["train_images"][0].transpose(2, 0, 1))
    assert dom.labels.tolist()[:10] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 0]


def test_medmnist_flag_in_the_data_dir_and_the_offline_message(tmp_path, monkeypatch):
    monkeypatch.setenv("MLTL_DATA_DIR", str(tmp_path / "data"))
    import urllib.request

    def offline(*a, **k):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(mltl.UserError, match=r"medmnist: .*data/organamnist.npz not found and it could not be "
                                             r"downloaded \(network is unreachable\); put organamnist.npz .* at .*data/organamnist.npz"):
        create("medmnist", {"flag": "organamnist"})
    assert not (tmp_path / "data" / "organamnist.npz").exists()
    assert not list((tmp_path / "data").glob("*"))           # no partial file left behind
    (tmp_path / "data").mkdir(exist_ok=True)
    fake_medmnist(tmp_path / "data" / "organamnist.npz", classes=11, n=(22, 11, 11))
    dom = create("medmnist", {"flag": "organamnist"})
    assert dom.classes[6] == "liver" and len(dom.classes) == 11
    with pytest.raises(mltl.UserError, match=r'unknown flag "breastmnst", did you mean "breastmnist"'):
        create("medmnist", {"flag": "breastmnst"})
    with pytest.raises(mltl.UserError, match=r'"chestmnist" is multi-label'):
        create("medmnist", {"flag": "chestmnist"})
    with pytest.raises(mltl.UserError, match=r"download = false; put pneumoniamnist_64.npz"):
        create("medmnist", {"flag": "pneumoniamnist", "resolution": 64, "download": False})


def serve(monkeypatch, payload: bytes):
    """urlopen replaced by one that serves ``payload`` (the download path without a network)."""
    import urllib.request

    calls = []

    def fake_urlopen(url, timeout=None):
        calls.append(url)
        return io.BytesIO(payload)

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    return calls


def test_medmnist_download_is_verified_and_atomic(tmp_path, monkeypatch):
    from mltl.data import medmnist

    fake_medmnist(tmp_path / "src.npz", classes=2)
    payload = (tmp_path / "src.npz").read_bytes()
    monkeypatch.setenv("MLTL_DATA_DIR", str(tmp_path / "data"))
    # the published checksum does not match our stand-in file: refused, nothing left on disk
    calls = serve(monkeypatch, payload)
    with pytest.raises(mltl.UserError, match=r"has MD5 [0-9a-f]{32}, expected 750601b1f35ba3300ea97c75c52ff8f6; "
                                             r"nothing was saved"):
        create("medmnist", {"flag": "breastmnist"})
    assert calls == ["https://zenodo.org/records/10519652/files/breastmnist.npz?download=1"]
    assert list((tmp_path / "data").iterdir()) == []
    # with the table pointing at this file's checksum, the same download is accepted and renamed into place
    labels, channels, md5s = medmnist.FLAGS["breastmnist"]
    monkeypatch.setitem(medmnist.FLAGS, "breastmnist", (labels, channels, {**md5s, 28: hashlib.md5(payload).hexdigest()}))
    dom = create("medmnist", {"flag": "breastmnist"})
    assert (tmp_path / "data" / "breastmnist.npz").read_bytes() == payload
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["breastmnist.npz"]
    assert dom.classes == ("malignant", "normal, benign")


def test_medmnist_download_with_a_local_http_server(tmp_path, monkeypatch):
    import functools
    import http.server
    import threading

    from mltl.data import medmnist

    (tmp_path / "www").mkdir()
    fake_medmnist(tmp_path / "www" / "octmnist.npz", classes=4, n=(8, 4, 4))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "www"))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(medmnist, "ZENODO", f"http://127.0.0.1:{server.server_port}/{{name}}")
        with pytest.raises(mltl.UserError, match=r"expected c68d92d5b585d8d81f7112f81e2d0842; nothing was saved"):
            create("medmnist", {"flag": "octmnist", "root": str(tmp_path / "data")})
        assert not list((tmp_path / "data").iterdir())
        md5 = hashlib.md5((tmp_path / "www" / "octmnist.npz").read_bytes()).hexdigest()
        labels, channels, md5s = medmnist.FLAGS["octmnist"]
        monkeypatch.setitem(medmnist.FLAGS, "octmnist", (labels, channels, {**md5s, 28: md5}))
        dom = create("medmnist", {"flag": "octmnist", "root": str(tmp_path / "data")})
        assert dom.classes[-1] == "normal" and len(dom) == 16
    finally:
        server.shutdown()


@pytest.mark.parametrize("arrays,message", [
    ({"train_images": np.zeros((2, 4, 4), np.uint8)}, r"lacks array train_labels"),
    ({f"{s}_{k}": (np.zeros((2, 4, 4, 4), np.uint8) if k == "images" else np.zeros(2, np.uint8))
      for s in ("train", "val", "test") for k in ("images", "labels")}, r"train_images has shape \(2, 4, 4, 4\)"),
    ({f"{s}_{k}": (np.zeros((2, 4, 4), np.uint8) if k == "images" else np.zeros((2, 3), np.uint8))
      for s in ("train", "val", "test") for k in ("images", "labels")}, r"multi-label sets are not supported"),
])
def test_medmnist_bad_files(tmp_path, arrays, message):
    np.savez(tmp_path / "x.npz", **arrays)
    with pytest.raises(mltl.UserError, match=message):
        create("medmnist", {"path": str(tmp_path / "x.npz")})
    (tmp_path / "t.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(mltl.UserError, match=r"cannot read .*t.npz as a .npz file"):
        create("medmnist", {"path": str(tmp_path / "t.npz")})


# -------------------------------------------------------------------------------------- example chain

@pytest.mark.slow
def test_medmnist_chain_example_offline_message(tmp_path):
    r = mltl_cli("validate", "examples/medmnist_chain.toml", env={"MLTL_DATA_DIR": str(tmp_path / "empty"),
                                                                  "MLTL_OFFLINE": "1"})
    assert r.returncode == 2, r.stderr
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr
    assert "organamnist.npz" in lines[0] and str(tmp_path / "empty" / "organamnist.npz") in lines[0]


@pytest.mark.slow
def test_medmnist_chain_example_runs_with_a_generated_intermediate(tmp_path, shared_data):
    data = tmp_path / "data"
    data.mkdir()
    fake_medmnist(data / "organamnist.npz", classes=11, n=(66, 33, 33))
    r = mltl_cli("run", "examples/medmnist_chain.toml", "--out", tmp_path / "run", "--device", "cpu",
                 "--set", "stages.source.train.epochs=1", "--set", "stages.intermediate.train.epochs=1",
                 "--set", "stages.target.train.epochs=1",
                 "--set", "stages.source.domain.images_per_class=20",
                 "--set", f'stages.target.domain={{ plugin = "medmnist", path = "{shared_data / "medmnist" / "breastmnist.npz"}", max_per_class = 20 }}',
                 env={"MLTL_DATA_DIR": str(data), "MLTL_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    import json

    m = json.loads((tmp_path / "run" / "target" / "metrics.json").read_text())
    assert m["classes"] == ["malignant", "normal, benign"]
