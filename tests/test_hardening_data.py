"""Issue 16, data readers: DICOM identifiers never printed, decompression bombs refused from the header, and
wrong input (float images in [0, 1], NaN pixels, class names differing by case, a bad split.file) named in
one line."""

from __future__ import annotations

import gzip
import io
import logging
import struct
import time
import tracemalloc
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import mltl
from mltl import get_registry
from mltl.cli import main as mltl_main
from mltl.data.domain import Domain
from mltl.data.images import read_image
from mltl.running.protocols import splits_from_file


@pytest.fixture(autouse=True)
def _salt(monkeypatch, tmp_path):
    monkeypatch.setenv("MLTL_SECRET_FILE", str(tmp_path / "secret"))
    monkeypatch.delenv("MLTL_SALT", raising=False)
    monkeypatch.delenv("MLTL_MAX_DECODED_BYTES", raising=False)
    monkeypatch.delenv("MLTL_MAX_IMAGE_PIXELS", raising=False)


def create(plugin, options, size=16):
    return get_registry().create("domain", plugin, options, key="stages[0].domain", extra={"image_size": size})


def refused_quickly(fn, *, seconds=3.0, peak_mb=64):
    """fn() must raise UserError fast and without allocating much (the refusal comes from the header)."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(mltl.UserError) as info:
            fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    elapsed = time.perf_counter() - t0
    assert elapsed < seconds, f"took {elapsed:.1f} s: the file was decoded before it was refused"
    assert peak < peak_mb * 2**20, f"peak {peak / 2**20:.0f} MiB: the file was decoded before it was refused"
    message = str(info.value)
    assert "\n" not in message and len(message) < 400, message
    return message


# ------------------------------------------------------------------------------- DICOM identifiers (3)

NAME, MRN = "Doe^Jane Secretname", "MRN77123401"
LEADING_ZERO_UID = "1.2.840.0099.17.3"          # a leading-zero component: invalid, common in real data
NAME_IN_UID = "Smith^Alice MRN998877"           # a name and MRN typed into a UID field


def write_dicom(path, pixels, **kw):
    """A CT slice; pydicom's warnings about the invalid values written on purpose are silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("pydicom").disabled = True
        try:
            _write_dicom(path, pixels, **kw)
        finally:
            logging.getLogger("pydicom").disabled = False


def _write_dicom(path, pixels, *, patient=MRN, study=LEADING_ZERO_UID, series=NAME_IN_UID, modality="CT",
                instance="1"):
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID = NAME, patient
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.Modality = modality
    ds.add_new(0x00200013, "IS" if instance.strip().isdigit() else "LO", instance)  # InstanceNumber, maybe text
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.PixelData = pixels.astype(np.int16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def dicom_tree(root: Path) -> Path:
    rng = np.random.default_rng(3)
    for c, cls in enumerate(("normal", "lesion")):
        for p in range(4):
            px = rng.integers(900, 1300, (20, 20))
            px[5:15, 5:15] += 300 * c
            write_dicom(root / cls / f"p{p}.dcm", px, patient="" if p % 2 else f"{MRN}{c}{p}",
                        study=f"{LEADING_ZERO_UID}.{c}{p}", series=NAME_IN_UID,
                        instance=f"{p + 1:04d}")
    return root


SECRETS = (NAME, "Secretname", MRN, LEADING_ZERO_UID, "0099", "Smith^Alice", "MRN998877", "DOE^JOHN")

TINY_DICOM = """
[run]
name = "dicom-quiet"
seed = 1

[input]
size = 32
channels = 1

[[stages]]
name = "target"
domain = {{ plugin = "dicom", root = "{root}", group_by = "{group_by}" }}
backbone = "gfe-1"
split = {{ protocol = "holdout", val = 0.25, test = 0.25 }}
train = {{ epochs = 1, batch_size = 4 }}
"""


def test_dicom_identifiers_never_reach_the_console_or_a_log(tmp_path, capsys, caplog):
    pytest.importorskip("pydicom")
    root = dicom_tree(tmp_path / "tree")
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for group_by in ("patient", "study", "series", "file"):
            dom = create("dicom", {"root": str(root), "group_by": group_by})
            assert len(dom) == 8
        codes = []
        for group_by in ("series", "patient"):
            cfg = tmp_path / f"{group_by}.toml"
            cfg.write_text(TINY_DICOM.format(root=root.as_posix(), group_by=group_by))
            codes.append(mltl_main(["validate", str(cfg)]))
    out, err = capsys.readouterr()
    seen = "\n".join([out, err, caplog.text, *(r.getMessage() for r in caplog.records),
                      *(str(w.message) for w in caught)])
    for secret in SECRETS:
        assert secret not in seen, f"{secret!r} reached the console, a log or a warning"
    assert codes == [2, 0]  # by series: one group per class, too few to split (said quietly); by patient: OK


def test_dicom_error_messages_quote_no_header_value(tmp_path):
    pytest.importorskip("pydicom")
    root = tmp_path / "tree"
    for cls in ("a", "b"):
        for p in range(3):
            write_dicom(root / cls / f"{p}.dcm", np.full((8, 8), 1000), patient=f"{MRN}{p}",
                        study=f"1.2.3.{p}", series=f"1.2.4.{p}", modality="DOE^JOHN" if cls == "b" else "CT")
    with pytest.raises(mltl.UserError) as info:
        create("dicom", {"root": str(root)})
    assert "DOE^JOHN" not in str(info.value) and "has no Hounsfield units" in str(info.value)
    assert "b/0.dcm" in str(info.value) and "\n" not in str(info.value)
    # text in InstanceNumber (an IS element) is no number to order by, and never quoted: the slice sorts first
    for p in range(3):
        write_dicom(root / "b" / f"{p}.dcm", np.full((8, 8), 1000 + p), patient=f"{MRN}{p}", study=f"1.2.3.{p}",
                    series="1.2.4.1", instance="DOE^JOHN 1" if p == 2 else str(p + 1))
    dom = create("dicom", {"root": str(root)})
    assert len(dom) == 6


# ---------------------------------------------------------------------------- decompression bombs (4)

def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def zero_png(path: Path, width: int, height: int, *, depth: int, color_type: int) -> Path:
    """A complete, valid PNG of zeros, compressed without ever holding its pixels (a few hundred KB)."""
    bands = {0: 1, 2: 3, 4: 2, 6: 4}[color_type]
    n = height * (1 + width * bands * depth // 8)   # filter byte + row, all zero
    block = 1 << 20
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)  # raw deflate; full flushes make blocks repeatable
    comp.compress(bytes(block))
    unit = comp.flush(zlib.Z_FULL_FLUSH)
    first = unit
    units, rest = divmod(n, block)
    tail = comp.compress(bytes(rest)) + comp.flush()
    adler = ((n % 65521) << 16) | 1               # adler32 of n zero bytes
    stream = b"\x78\xda" + first + unit * (units - 1) + tail + struct.pack(">I", adler)
    path.write_bytes(b"\x89PNG\r\n\x1a\n"
                     + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, color_type, 0, 0, 0))
                     + _chunk(b"IDAT", stream) + _chunk(b"IEND", b""))
    return path


def test_the_crafted_png_is_a_real_image(tmp_path):
    path = zero_png(tmp_path / "z.png", 300, 200, depth=16, color_type=0)
    with Image.open(path) as im:
        im.load()
        assert im.size == (300, 200) and np.asarray(im).max() == 0
    assert read_image(path, channels=1, size=8).max() == 0


@pytest.mark.parametrize("depth,color_type,mode", [(16, 0, "16-bit grey"), (8, 6, "RGBA")])
def test_a_huge_png_from_a_tiny_file_is_refused_from_its_header(tmp_path, depth, color_type, mode):
    path = zero_png(tmp_path / "bomb.png", 13000, 13000, depth=depth, color_type=color_type)
    assert path.stat().st_size < 1_000_000, mode
    message = refused_quickly(lambda: read_image(path, channels=1, size=64, who="image-folder"))
    assert "bomb.png" in message and "13000x13000" in message and "MLTL_MAX_IMAGE_PIXELS" in message


def test_image_limits_are_configurable_and_checked(tmp_path, monkeypatch):
    Image.fromarray(np.zeros((40, 50), np.uint8)).save(tmp_path / "s.png")
    monkeypatch.setenv("MLTL_MAX_IMAGE_PIXELS", "1000")
    with pytest.raises(mltl.UserError, match=r"s.png: the image is 50x40 pixels .*MLTL_MAX_IMAGE_PIXELS"):
        read_image(tmp_path / "s.png", channels=1, size=8)
    monkeypatch.setenv("MLTL_MAX_IMAGE_PIXELS", "2000")
    assert read_image(tmp_path / "s.png", channels=1, size=8).shape == (8, 8)
    monkeypatch.setenv("MLTL_MAX_DECODED_BYTES", "1K")
    with pytest.raises(mltl.UserError, match=r"about 2.0 KiB once decoded, over the limit of 1.0 KiB .*"
                                             r"MLTL_MAX_DECODED_BYTES"):
        read_image(tmp_path / "s.png", channels=1, size=8)
    monkeypatch.setenv("MLTL_MAX_DECODED_BYTES", "lots")
    with pytest.raises(mltl.UserError, match=r"MLTL_MAX_DECODED_BYTES='lots': not a positive size in bytes"):
        read_image(tmp_path / "s.png", channels=1, size=8)


def nifti_header_only(path: Path, shape, dtype=np.int16) -> Path:
    """A .nii.gz whose header describes ``shape`` (the voxels themselves are left out: the reader must
    refuse from the header, before it reads any)."""
    nib = pytest.importorskip("nibabel")
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header.set_qform(np.eye(4), code=1)
    header.set_sform(np.eye(4), code=1)
    buf = io.BytesIO()
    header.write_to(buf)
    with gzip.open(path, "wb") as f:
        f.write(buf.getvalue() + bytes(4))   # vox_offset 352: header and extension flag, then (no) data
        f.write(bytes(1 << 16))
    return path


def test_a_huge_nifti_is_refused_from_its_header(tmp_path):
    pytest.importorskip("nibabel")
    from mltl_ct.nifti import read_nifti_hu

    path = nifti_header_only(tmp_path / "v.nii.gz", (900, 900, 900))
    message = refused_quickly(lambda: read_nifti_hu(path))
    assert "v.nii.gz" in message and "900 x 900 x 900" in message and "MLTL_MAX_DECODED_BYTES=3G" in message


def test_mltl_validate_refuses_a_nifti_over_the_budget_in_one_line(tmp_path, monkeypatch, capsys):
    nib = pytest.importorskip("nibabel")
    for cls in ("a", "b"):
        (tmp_path / "n" / cls).mkdir(parents=True)
        for k in range(3):
            nib.save(nib.Nifti1Image(np.full((40, 40, 40), k, np.int16), np.eye(4)),
                     tmp_path / "n" / cls / f"v{k}.nii.gz")
    cfg = tmp_path / "c.toml"
    cfg.write_text(TINY_DICOM.format(root=(tmp_path / "n").as_posix(), group_by="x")
                   .replace('plugin = "dicom"', 'plugin = "nifti"').replace(', group_by = "x"', ""))
    monkeypatch.setenv("MLTL_MAX_DECODED_BYTES", "200K")   # a 40^3 volume is 250 KiB as float32
    assert mltl_main(["validate", str(cfg)]) == 2
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(lines) == 1 and "v0.nii.gz" in lines[0] and "over the limit of 200.0 KiB" in lines[0], lines


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def medmnist_arrays(n=(6, 3, 3), size=8, dtype=np.uint8, scale=255, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for s, k in zip(("train", "val", "test"), n):
        out[f"{s}_images"] = (rng.random((k, size, size)) * scale).astype(dtype)
        out[f"{s}_labels"] = (np.arange(k) % 2).reshape(k, 1).astype(np.uint8)
    return out


def test_an_npz_label_of_thirty_million_is_one_short_line(tmp_path):
    arrays = medmnist_arrays()
    arrays["train_labels"] = arrays["train_labels"].astype(np.int64)
    arrays["train_labels"][2, 0] = 30_000_000
    (tmp_path / "x.npz").write_bytes(npz_bytes(arrays))
    assert (tmp_path / "x.npz").stat().st_size < 20_000
    message = refused_quickly(lambda: create("medmnist", {"path": str(tmp_path / "x.npz")}), peak_mb=32)
    assert "labels run up to 30000000" in message and "no image has label 2, 3, 4, 5, 6 ..." in message


def crafted_npz(path: Path, claimed_shape) -> Path:
    """An .npz whose train_images header claims ``claimed_shape`` but whose member holds a few bytes."""
    small = medmnist_arrays()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, arr in small.items():
            buf = io.BytesIO()
            if name == "train_images":
                np.lib.format.write_array_header_1_0(buf, {"descr": "|u1", "fortran_order": False,
                                                           "shape": tuple(claimed_shape)})
                buf.write(bytes(64))
            else:
                np.lib.format.write_array(buf, arr)
            zf.writestr(name + ".npy", buf.getvalue())
    return path


def test_an_npz_header_over_the_budget_or_its_own_size_is_refused_before_loading(tmp_path, monkeypatch):
    path = crafted_npz(tmp_path / "lie.npz", (200_000, 224, 224))
    message = refused_quickly(lambda: create("medmnist", {"path": str(path)}))
    assert "lie.npz" in message and "train_images claims shape" in message and "damaged" in message
    (tmp_path / "ok.npz").write_bytes(npz_bytes(medmnist_arrays(size=28)))
    monkeypatch.setenv("MLTL_MAX_DECODED_BYTES", "4K")
    message = refused_quickly(lambda: create("medmnist", {"path": str(tmp_path / "ok.npz")}))
    assert "ok.npz" in message and "over the limit of 4.0 KiB" in message and "MLTL_MAX_DECODED_BYTES" in message


def test_error_messages_with_huge_values_stay_one_short_line(tmp_path):
    (tmp_path / "im.png").parent.mkdir(exist_ok=True)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "im.png")
    huge = "x" * 100_000
    (tmp_path / "m.csv").write_text(f"path,label,split\nim.png,a,{huge}\n")
    with pytest.raises(mltl.UserError) as info:
        create("csv-manifest", {"csv": str(tmp_path / "m.csv")})
    assert "line 2: unknown split" in str(info.value) and len(str(info.value)) < 300
    # a domain whose split misses many classes: the message lists a few, then a count
    dom = Domain(classes=[f"c{k}" for k in range(5000)], images=np.zeros((5000, 2, 2), np.uint8),
                 labels=np.arange(5000), ids=[str(k) for k in range(5000)])
    from mltl.data.domain import check_split_classes

    with pytest.raises(mltl.UserError) as info:
        check_split_classes(dom, {"test": np.arange(3)}, "")
    assert "c3, c4, c5, c6, c7 and 4992 more" in str(info.value) and len(str(info.value)) < 300


# ------------------------------------------------------------------------- silent acceptance of wrong input

def test_float_npz_images_in_zero_one_are_scaled_not_made_black(tmp_path):
    arrays = medmnist_arrays(dtype=np.float32, scale=1.0)
    (tmp_path / "f.npz").write_bytes(npz_bytes(arrays))
    dom = create("medmnist", {"path": str(tmp_path / "f.npz")})
    expected = np.rint(np.concatenate([arrays[f"{s}_images"] for s in ("train", "val", "test")]) * 255)
    assert dom.images.max() > 200 and np.array_equal(dom.images, expected.astype(np.uint8))
    # integer-valued floats in 0..255 are kept as they are
    arrays = medmnist_arrays(dtype=np.float64, scale=255)
    (tmp_path / "g.npz").write_bytes(npz_bytes({k: np.floor(v) if "images" in k else v for k, v in arrays.items()}))
    dom = create("medmnist", {"path": str(tmp_path / "g.npz")})
    assert dom.images.max() == np.floor(arrays["train_images"]).max()


def test_nan_pixels_are_refused_naming_the_file_and_the_image(tmp_path):
    arrays = medmnist_arrays(dtype=np.float32, scale=1.0)
    arrays["val_images"][2, 3, 4] = np.nan
    (tmp_path / "n.npz").write_bytes(npz_bytes(arrays))
    with pytest.raises(mltl.UserError, match=r"n.npz: val_images\[2\] has NaN pixel values"):
        create("medmnist", {"path": str(tmp_path / "n.npz")})
    img = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    img[5, 6] = np.nan
    Image.fromarray(img).save(tmp_path / "f.tif")
    with pytest.raises(mltl.UserError, match=r"f.tif: 1 pixel\(s\) are NaN .*row 5, column 6"):
        read_image(tmp_path / "f.tif", channels=1, size=8)


def test_nan_voxels_in_a_nifti_volume_are_refused(tmp_path):
    nib = pytest.importorskip("nibabel")
    from mltl_ct.nifti import read_nifti_hu

    vol = np.zeros((6, 6, 6), np.float32)
    vol[1, 2, 3] = np.nan
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "v.nii.gz")
    with pytest.raises(mltl.UserError, match=r"v.nii.gz: 1 voxel\(s\) are NaN or infinite .*voxel 1, 2, 3"):
        read_nifti_hu(tmp_path / "v.nii.gz", axis=0)


def test_class_names_differing_only_by_case_are_refused(tmp_path):
    root = tmp_path / "data"
    for cls in ("Cyst", "cyst", "Normal"):
        (root / cls).mkdir(parents=True)
        for k in range(3):
            Image.fromarray(np.full((6, 6), 40 * k + len(cls) * 7, np.uint8)).save(root / cls / f"{k}.png")
    if len({p.name for p in root.iterdir()}) < 3:
        pytest.skip("a case-insensitive file system: Cyst and cyst are one folder")
    with pytest.raises(mltl.UserError, match=r'classes "Cyst" and "cyst" differ only in letter case') as info:
        create("image-folder", {"root": str(root)})
    assert "\n" not in str(info.value) and str(root) in str(info.value)
    assert create("image-folder", {"root": str(root), "classes": ["Cyst", "Normal"]}).classes == ("Cyst", "Normal")
    (tmp_path / "m.csv").write_text("path,label\n" + "".join(f"data/{c}/{k}.png,{c}\n" for c in ("Cyst", "cyst")
                                                             for k in range(3)))
    with pytest.raises(mltl.UserError, match=r'm.csv: labels "Cyst" \(line 2\) and "cyst" \(line 5\) differ only'):
        create("csv-manifest", {"csv": str(tmp_path / "m.csv")})


def small_domain(n=6):
    return Domain(classes=("a", "b"), images=np.zeros((n, 2, 2), np.uint8), labels=np.arange(n) % 2,
                  ids=[f"im{k}" for k in range(n)])


def test_split_file_giving_one_id_two_splits_names_both_lines(tmp_path):
    rows = ["id,split"] + [f"im{k},{s}" for k, s in enumerate(["train", "train", "val", "val", "test", "test"])]
    (tmp_path / "s.csv").write_text("\n".join(rows + ["im0,test"]) + "\n")
    with pytest.raises(mltl.UserError, match=r"s.csv lines 2 and 8: image im0 is given two splits \(train, then "
                                             r"test\)"):
        splits_from_file(small_domain(), str(tmp_path / "s.csv"), "stages[0].")
    (tmp_path / "same.csv").write_text("\n".join(rows + ["im0,train"]) + "\n")  # a repeated line is harmless
    assert list(splits_from_file(small_domain(), str(tmp_path / "same.csv"), "")["train"]) == [0, 1]


@pytest.mark.parametrize("content,message", [
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", r"s.csv: not a UTF-8 text file \(byte 0 is b'\\x89'\)"),
    (b"\xff\xfe\x00i\x00d", r"not a UTF-8 text file"),
    (b"id,split\nim0,train\x00\n", r"line 2: a NUL byte"),
    (b"id;split\nim0;train\n", r"needs columns id and split \(found id;split\)"),
    (b"id,split\n,train\n", r"line 2: empty id"),
    (b"id,split\nim0\n", r"line 2: split '' is not one of train, val, test"),
    (b'id,split\n"im0,train\n', r"line 2: split '' is not one of"),  # an unclosed quote
    (b"", r"needs columns id and split \(found none\)"),
])
def test_a_binary_or_malformed_split_file_is_one_line(tmp_path, content, message):
    (tmp_path / "s.csv").write_bytes(content)
    with pytest.raises(mltl.UserError, match=message) as info:
        splits_from_file(small_domain(), str(tmp_path / "s.csv"), "stages[0].")
    assert "\n" not in str(info.value) and "s.csv" in str(info.value) and len(str(info.value)) < 300


def test_the_ct_plugin_uses_the_cores_limits():
    """One implementation: the DICOM and NIfTI readers take the checks from the plugin API."""
    pytest.importorskip("mltl_ct")
    import mltl_ct.dicom
    import mltl_ct.nifti

    assert mltl_ct.dicom.check_decoded_bytes is mltl.check_decoded_bytes
    assert mltl_ct.dicom.check_image_pixels is mltl.check_image_pixels
    assert mltl_ct.nifti.check_decoded_bytes is mltl.check_decoded_bytes



def test_the_fractal_domain_refuses_counts_it_cannot_make(tmp_path):
    """A huge class or image count is one line at once (it hung `mltl validate`, or ran out of memory)."""
    import time

    from mltl.builtins import fractal_domain

    for options, words in (({"classes": 100_000}, "classes must be at most 1000"),
                           ({"images_per_class": 2**32}, "over the limit"),
                           ({"size": 100_000}, "size must be from 8 to 4096")):
        start = time.perf_counter()
        with pytest.raises(mltl.UserError, match=words) as info:
            fractal_domain(**options, image_size=32)
        assert time.perf_counter() - start < 5 and "\n" not in str(info.value)
