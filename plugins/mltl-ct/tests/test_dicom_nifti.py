"""CT windows, the dicom and nifti domains (real files from ../shared/data and generated ones), privacy."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import mltl
from mltl import get_registry

pydicom = pytest.importorskip("pydicom")
nib = pytest.importorskip("nibabel")

from mltl_ct.dicom import read_dicom_hu  # noqa: E402
from mltl_ct.nifti import read_nifti_hu  # noqa: E402
from mltl_ct.windows import PRESETS, apply_windows, parse_windows  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]  # plugins/mltl-ct/tests/ -> the repository root
NAME, MRN, BIRTH = "Doe^Jane Secretname", "MRN77123401", "19591231"


@pytest.fixture(autouse=True)
def _salt(monkeypatch, tmp_path):
    monkeypatch.setenv("MLTL_SECRET_FILE", str(tmp_path / "secret"))
    monkeypatch.delenv("MLTL_SALT", raising=False)


def create(plugin, options, size=32):
    return get_registry().create("domain", plugin, options, key="stages[1].domain", extra={"image_size": size})


def write_ct(path, pixels, *, slope=1.0, intercept=-1024.0, patient=MRN, study=None, instance=1,
             pixel_data=True, modality="CT", window=None, transfer_syntax=None, raw=None):
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax or ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = NAME, patient, BIRTH
    ds.StudyInstanceUID = study or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality, ds.InstanceNumber = modality, instance
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    if pixel_data:
        if raw is not None:
            from pydicom.encaps import encapsulate

            ds.PixelData = encapsulate([raw])
            ds["PixelData"].VR = "OB"
        else:
            ds.PixelData = pixels.astype(np.int16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def phantom_pixels(rng, shape=(40, 40)):
    """Stored values (HU = stored - 1024): a disc of soft tissue with coarse random structure, so that no two
    generated slices are near-duplicates of each other."""
    y, x = np.mgrid[: shape[0], : shape[1]]
    body = ((x - shape[1] / 2) ** 2 + (y - shape[0] / 2) ** 2 < (shape[0] * 0.45) ** 2)
    blocks = np.kron(rng.integers(-150, 250, (5, 5)), np.ones((shape[0] // 5 + 1, shape[1] // 5 + 1)))
    return (body * (1064 + blocks[: shape[0], : shape[1]]) + rng.normal(0, 20, shape)).astype(np.int16)


# ------------------------------------------------------------------------------------------- windows

def test_window_presets_custom_and_stacking():
    hu = np.array([[-1000.0, -160.0, 50.0, 240.0, 2000.0]])
    (abd,) = parse_windows("abdomen")
    assert (abd.level, abd.width) == PRESETS["abdomen"] == (40.0, 400.0)
    assert apply_windows(hu, [abd]).tolist() == [[0, 0, 134, 255, 255]]     # (50 + 160) / 400 * 255
    custom = parse_windows({"level": 0, "width": 100})
    assert apply_windows(hu, custom).tolist() == [[0, 0, 255, 255, 255]]
    assert parse_windows([50, 350])[0].describe() == "50/350"
    stacked = apply_windows(hu, parse_windows(["abdomen", "Soft Tissue", "bone"]))
    assert stacked.shape == (3, 1, 5) and stacked.dtype == np.uint8
    assert stacked[2].tolist() == [[0, 48, 78, 105, 255]]                   # bone: (hu + 500) / 1800 * 255
    for bad, message in [("abdomn", r'unknown window "abdomn", did you mean "abdomen"'),
                         (["abdomen", "bone"], r"2 windows given; images have 1 channel"),
                         ({"level": 40}, r"a custom window is \{ level = ..., width = ... \}"),
                         ({"level": 40, "width": -5}, r"width > 0"),
                         (7, r"a window is a preset name")]:
        with pytest.raises(mltl.UserError, match=message):
            parse_windows(bad)


# -------------------------------------------------------------------------------------- real DICOM

def test_real_single_dicom_in_hu(shared_data):
    path = shared_data / "dicom" / "CT_small.dcm"
    ds = pydicom.dcmread(path)
    expected = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    hu = read_dicom_hu(path)
    assert hu.shape == (1, 128, 128)
    np.testing.assert_array_equal(hu[0], expected)
    assert float(ds.RescaleIntercept) == -1024 and hu.min() < -800 and hu.max() > 1000


def test_real_jpeg2000_series_in_hu_and_as_a_domain(shared_data, tmp_path):
    series = shared_data / "dicom" / "ct_abdomen_series"
    files = sorted(p for p in series.iterdir() if p.is_file())
    ds = pydicom.dcmread(files[3])
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.90"   # JPEG 2000, decoded via Pillow
    expected = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_array_equal(read_dicom_hu(files[3])[0], expected)
    # liver in the middle of the series sits at 60-160 HU in portal venous phase, air below -900
    mid = read_dicom_hu(files[10])[0]
    assert np.median(mid[200:260, 100:160]) > 40 and mid[:10, :10].max() < -900
    # as a domain: a series folder under a class folder, next to a single file of another class
    (tmp_path / "liver").mkdir()
    (tmp_path / "other").mkdir()
    os.symlink(series, tmp_path / "liver" / "series-1")
    os.symlink(shared_data / "dicom" / "CT_small.dcm", tmp_path / "other" / "one.dcm")
    dom = create("dicom", {"root": str(tmp_path), "windows": ["abdomen", "liver", "bone"]}, size=64)
    assert dom.images.shape == (21, 3, 64, 64) and dom.class_counts() == {"liver": 20, "other": 1}
    # the series' UIDs are blank: its slices fall back to one group, the series folder
    assert len(set(dom.groups[:20])) == 1 and dom.groups[0] == "folder:liver/series-1"
    # ordered along the slice normal (here the reverse of InstanceNumber, which counts head to feet)
    from mltl_ct.dicom import slice_position

    heads = [pydicom.dcmread(series / i.split("/")[-1], stop_before_pixels=True) for i in dom.ids[:20]]
    positions = [slice_position(ds) for ds in heads]
    assert None not in positions and positions == sorted(positions)
    numbers = [int(ds.InstanceNumber) for ds in heads]
    assert numbers in (sorted(numbers), sorted(numbers, reverse=True))


# ---------------------------------------------------------------------------------- generated DICOM

def make_dicom_tree(root, rng, *, patients=3, slices=2, classes=("normal", "lesion")):
    for c, cls in enumerate(classes):
        for p in range(patients):
            for s in range(slices):
                px = phantom_pixels(rng)
                if c:
                    px[15:25, 15:25] = 1024 + 300
                write_ct(root / cls / f"pat{p}" / f"s{s}.dcm", px, patient=f"{MRN}{c}{p}",
                         study=f"1.2.3.{c}.{p}", instance=s + 1)
    return root


def test_generated_dicoms_with_slope_intercept_windows_and_groups(tmp_path):
    rng = np.random.default_rng(0)
    px = phantom_pixels(rng, (32, 32))
    path = write_ct(tmp_path / "x.dcm", px, slope=2.0, intercept=-2048.0)
    hu = read_dicom_hu(path)[0]
    np.testing.assert_array_equal(hu, px.astype(np.float64) * 2 - 2048)
    make_dicom_tree(tmp_path / "tree", rng)
    dom = create("dicom", {"root": str(tmp_path / "tree"), "windows": {"level": 40, "width": 400}}, size=40)
    assert dom.images.shape == (12, 40, 40) and dom.classes == ("lesion", "normal")
    ds = pydicom.dcmread(tmp_path / "tree" / "lesion" / "pat0" / "s0.dcm")
    want = apply_windows(ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept),
                         parse_windows("abdomen"))
    np.testing.assert_array_equal(dom.images[dom.ids.index("lesion/pat0/s0.dcm")], want)
    assert len(set(dom.groups)) == 6 and all(g.startswith("p-") for g in dom.groups)
    by_study = create("dicom", {"root": str(tmp_path / "tree"), "group_by": "study"})
    assert len(set(by_study.groups)) == 6 and set(by_study.groups).isdisjoint(dom.groups)
    # a stable salt gives the same pseudonyms, another salt others
    again = create("dicom", {"root": str(tmp_path / "tree")})
    assert again.groups == dom.groups
    assert set(create("dicom", {"root": str(tmp_path / "tree"), "salt": "other"}).groups).isdisjoint(dom.groups)


def test_dicom_manifest_and_the_files_own_window(tmp_path):
    rng = np.random.default_rng(1)
    for i in range(4):
        write_ct(tmp_path / "d" / f"{i}.dcm", phantom_pixels(rng), window=(40, 400), instance=i)
    write_ct(tmp_path / "d" / "series" / "a.dcm", phantom_pixels(rng), window=(40, 400))
    write_ct(tmp_path / "d" / "series" / "b.dcm", phantom_pixels(rng), window=(40, 400))
    (tmp_path / "m.csv").write_text("path,label,patient_id,split\n" + "\n".join(
        [f"d/{i}.dcm,{'ab'[i % 2]},pt{i},{['train', 'val', 'test', 'train'][i]}" for i in range(4)]
        + ["d/series,b,pt9,test"]) + "\n")
    dom = create("dicom", {"manifest": str(tmp_path / "m.csv"), "windows": "dicom"})
    assert len(dom) == 6 and dom.splits.count("test") == 3
    assert dom.ids[-2:] == ("d/series/a.dcm", "d/series/b.dcm") and dom.groups[-1] == dom.groups[-2]
    fixed = create("dicom", {"manifest": str(tmp_path / "m.csv"), "windows": "abdomen"})
    # the file's window is 40/400 = abdomen, applied with DICOM's LINEAR function (centre - 0.5, width - 1,
    # as pydicom's apply_voi_lut): at most one grey level from the preset's plain linear ramp
    assert np.abs(dom.images.astype(int) - fixed.images).max() <= 1


@pytest.mark.parametrize("case,message", [
    ("garbage", r"cannot read .*bad.dcm: not a DICOM file"),
    ("truncated", r"bad.dcm.*(damaged or truncated)"),
    ("no_pixels", r"bad.dcm has no pixel data"),
    ("mr", r"bad.dcm is MR, which has no Hounsfield units; use windows = \"dicom\""),
    ("jpeg_lossless", r"cannot decode .*bad.dcm: its pixel data is compressed as JPEG Lossless.*pip install "
                      r"python-gdcm \(or, GPL-3.0 licensed: pylibjpeg pylibjpeg-libjpeg\)"),
])
def test_bad_dicoms_are_named(tmp_path, case, message):
    rng = np.random.default_rng(2)
    make_dicom_tree(tmp_path, rng, slices=1)
    bad = tmp_path / "normal" / "bad.dcm"
    px = phantom_pixels(rng)
    if case == "garbage":
        bad.write_bytes(b"this is not a DICOM file at all" * 10)
    elif case == "truncated":
        write_ct(bad, px)
        bad.write_bytes(bad.read_bytes()[:-1500])
    elif case == "no_pixels":
        write_ct(bad, px, pixel_data=False)
    elif case == "mr":
        write_ct(bad, px, modality="MR")
    else:
        import importlib.util

        if any(importlib.util.find_spec(m) for m in ("pylibjpeg", "gdcm")):
            pytest.skip("a JPEG lossless decoder is installed here; the missing-decoder message cannot appear")
        write_ct(bad, px, transfer_syntax="1.2.840.10008.1.2.4.70", raw=b"\xff\xd8\xff\xc3" + b"\0" * 64 + b"\xff\xd9")
    with pytest.raises(mltl.UserError, match=message):
        create("dicom", {"root": str(tmp_path)})


# ---------------------------------------------------------------------------------------------- NIfTI

def test_real_nifti_in_hu_axial_and_raw_axis(shared_data):
    path = shared_data / "nifti" / "ct_abdomen.nii.gz"
    img = nib.load(str(path))
    data = img.get_fdata()
    raw = read_nifti_hu(path, axis=2)
    assert raw.shape == (112, 122, 101)
    np.testing.assert_allclose(raw[50], data[:, :, 50], rtol=0, atol=1e-3)
    canon = nib.as_closest_canonical(img).get_fdata()
    axial = read_nifti_hu(path, axis="axial")
    np.testing.assert_allclose(axial[50], canon[:, :, 50].T[::-1, ::-1], atol=1e-3)
    assert -1300 < axial.min() < -1000 and axial.max() > 1000
    # radiological view: anterior (belly) at the top, spine (bone) in the lower half
    mid = axial[len(axial) // 2]
    bone_rows = np.nonzero((mid > 300).any(axis=1))[0]
    assert np.median(bone_rows) > mid.shape[0] / 2


def nifti_tree(root, rng, *, shape=(20, 18, 12), slope=2.0, inter=-1000.0, per_class=3):
    for c, cls in enumerate(("a", "b")):
        for v in range(per_class):
            stored = (rng.normal(500 + 60 * c, 30, shape)).astype(np.int16)
            img = nib.Nifti1Image(stored, np.diag([1.5, 1.5, 3.0, 1.0]))
            img.header.set_data_dtype(np.int16)
            img.header.set_slope_inter(slope, inter)
            (root / cls).mkdir(parents=True, exist_ok=True)
            nib.save(img, root / cls / f"vol{v}.nii.gz")
            mask = np.zeros(shape, np.uint8)
            mask[5:10, 5:10, 3:7] = 1
            nib.save(nib.Nifti1Image(mask, np.diag([1.5, 1.5, 3.0, 1.0])), root / cls / f"vol{v}_seg.nii.gz")
    return root


def test_generated_nifti_scaling_slicing_and_groups(tmp_path):
    rng = np.random.default_rng(3)
    root = nifti_tree(tmp_path / "n", rng)
    img = nib.load(str(root / "a" / "vol0.nii.gz"))
    assert img.dataobj.slope == 2.0 and img.dataobj.inter == -1000.0
    np.testing.assert_allclose(read_nifti_hu(root / "a" / "vol0.nii.gz", axis=2)[4], img.get_fdata()[:, :, 4])
    np.testing.assert_allclose(img.get_fdata()[0, 0, 0], np.asarray(img.dataobj.get_unscaled())[0, 0, 0] * 2 - 1000)
    dom = create("nifti", {"root": str(root), "mask_suffix": "_seg.nii.gz"}, size=16)
    assert dom.images.shape == (6 * 4, 16, 16)                     # only the 4 axial slices the mask covers
    assert {i.split("#")[1] for i in dom.ids} == {"axial0003", "axial0004", "axial0005", "axial0006"}
    assert len(set(dom.groups)) == 6                                # one group per volume
    dom = create("nifti", {"root": str(root), "mask_suffix": "_seg.nii.gz", "axis": "coronal",
                           "slice_range": [0.25, 0.75], "every": 2, "windows": ["abdomen", "liver", "bone"]}, size=16)
    assert dom.images.shape[1:] == (3, 16, 16)
    assert {i.split("#")[1] for i in dom.ids} == {"coronal0005", "coronal0007", "coronal0009"}  # [4, 14), mask 5..9, every 2
    dom = create("nifti", {"root": str(root), "axis": 0, "slice_range": [2, -2]}, size=16)
    assert len(dom) == 12 * 16   # without mask_suffix the _seg volumes count as images too; 20 - 4 slices each


def test_nifti_of_the_wrong_dimensionality_and_bad_files(tmp_path):
    rng = np.random.default_rng(4)
    root = nifti_tree(tmp_path / "n", rng, per_class=1)
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8, 3), np.int16), np.eye(4)), root / "a" / "four_d.nii.gz")
    with pytest.raises(mltl.UserError, match=r"four_d.nii.gz has shape \(8, 8, 8, 3\) \(4D\); expected a 3D volume"):
        create("nifti", {"root": str(root), "mask_suffix": "_seg.nii.gz"})
    (root / "a" / "four_d.nii.gz").unlink()
    nib.save(nib.Nifti1Image(np.zeros((8, 8), np.int16), np.eye(4)), root / "a" / "flat.nii")
    with pytest.raises(mltl.UserError, match=r"flat.nii has shape \(8, 8\) \(2D\); expected a 3D volume"):
        create("nifti", {"root": str(root), "mask_suffix": "_seg.nii.gz"})
    (root / "a" / "flat.nii").unlink()
    good = (root / "a" / "vol0.nii.gz").read_bytes()
    (root / "a" / "vol0.nii.gz").write_bytes(good[: len(good) // 2])
    with pytest.raises(mltl.UserError, match=r"cannot read .*vol0.nii.gz: not a NIfTI volume, or damaged or truncated"):
        create("nifti", {"root": str(root), "mask_suffix": "_seg.nii.gz"})
    (root / "a" / "vol0.nii.gz").write_bytes(good)
    with pytest.raises(mltl.UserError, match=r"no slice of .*selected"):
        create("nifti", {"root": str(root), "slice_range": [0.0, 0.01], "mask_suffix": "_seg.nii.gz"})


# ---------------------------------------------------------------------------------- privacy, CLI

TINY_DICOM = """
[run]
name = "dicom-privacy"
seed = 1

[input]
size = 32
channels = 3

[[stages]]
name = "target"
domain = {{ plugin = "dicom", root = "{root}", windows = ["abdomen", "liver", "bone"] }}
backbone = "gfe-1"
train = {{ epochs = 1, batch_size = 8 }}
"""


def test_identifying_tags_never_reach_the_domain(tmp_path):
    make_dicom_tree(tmp_path / "tree", np.random.default_rng(5))
    dom = create("dicom", {"root": str(tmp_path / "tree")})
    text = json.dumps([dom.ids, dom.groups, dom.description, dom.classes])
    for secret in (NAME, "Secretname", MRN, BIRTH, "1.2.3.0.1"):
        assert secret not in text


@pytest.mark.slow
def test_identifying_tags_appear_nowhere_in_a_run_directory(tmp_path):
    make_dicom_tree(tmp_path / "tree", np.random.default_rng(6), patients=5)   # 5 groups a class: 5-fold CV
    cfg = tmp_path / "c.toml"
    cfg.write_text(TINY_DICOM.format(root=tmp_path / "tree"))
    env = {**os.environ, "MLTL_QUIET": "1", "MLTL_SECRET_FILE": str(tmp_path / "secret")}
    r = subprocess.run([sys.executable, "-m", "mltl", "run", str(cfg), "--out", str(tmp_path / "run"),
                        "--device", "cpu"], capture_output=True, text=True, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert len(files) > 5
    for secret in (NAME, "Secretname", MRN, BIRTH):
        assert secret not in r.stdout + r.stderr
        hits = [p for p in files if secret.encode() in p.read_bytes()]
        assert not hits, f"{secret} found in {hits}"


@pytest.mark.slow
def test_bad_dicom_and_nifti_via_the_cli_exit_2_with_one_line(tmp_path):
    make_dicom_tree(tmp_path / "tree", np.random.default_rng(7), slices=1)
    write_ct(tmp_path / "tree" / "normal" / "nopix.dcm", phantom_pixels(np.random.default_rng(0)), pixel_data=False)
    cfg = tmp_path / "c.toml"
    cfg.write_text(TINY_DICOM.format(root=tmp_path / "tree"))
    env = {**os.environ, "MLTL_QUIET": "1", "MLTL_SECRET_FILE": str(tmp_path / "secret")}
    r = subprocess.run([sys.executable, "-m", "mltl", "validate", str(cfg)], capture_output=True, text=True,
                       cwd=ROOT, env=env)
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "c.toml: stages[0].domain: dicom:" in lines[0] and "nopix.dcm has no pixel data" in lines[0]
    root = nifti_tree(tmp_path / "n", np.random.default_rng(8), per_class=1)
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 2), np.int16), np.eye(4)), root / "b" / "t.nii.gz")
    cfg.write_text(TINY_DICOM.format(root=root).replace('plugin = "dicom"', 'plugin = "nifti"'))
    r = subprocess.run([sys.executable, "-m", "mltl", "validate", str(cfg)], capture_output=True, text=True,
                       cwd=ROOT, env=env)
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "expected a 3D volume" in lines[0], r.stderr
