"""DICOM display conventions on files the tests build with pydicom: MONOCHROME1, the file's own VOI transform
(VOI LUT Sequence, VOILUTFunction) compared with pydicom's ``apply_voi_lut``, per-frame rescale of enhanced
multi-frame files, slice order along the slice normal, and resampling to a pixel spacing (DICOM and NIfTI)."""

import numpy as np
import pytest

import mltl
from mltl import get_registry

pydicom = pytest.importorskip("pydicom")

from pydicom.dataset import Dataset, FileDataset, FileMetaDataset  # noqa: E402
from pydicom.pixels import apply_modality_lut, apply_voi_lut  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, generate_uid  # noqa: E402

from mltl_ct.dicom import file_voi, read_dicom_hu, slice_position  # noqa: E402
from mltl_ct.windows import to_8bit  # noqa: E402

CT, CR, ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.2.1"


@pytest.fixture(autouse=True)
def _salt(monkeypatch, tmp_path):
    monkeypatch.setenv("MLTL_SECRET_FILE", str(tmp_path / "secret"))
    monkeypatch.delenv("MLTL_SALT", raising=False)


def create(plugin, options, size=32):
    return get_registry().create("domain", plugin, options, key="stages[1].domain", extra={"image_size": size})


def write(path, pixels, *, sop=CT, modality="CT", photometric="MONOCHROME2", bits=16, signed=True,
          rescale=(1.0, -1024.0), patient="P1", **tags):
    """A small single- or multi-frame DICOM file; ``tags`` are set on the dataset as they are."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = sop, meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID = patient, generate_uid(), generate_uid()
    ds.Modality = modality
    frames = pixels.shape[0] if pixels.ndim == 3 else 1
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, int(signed)
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.PixelData = pixels.astype(np.int16 if signed else np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def pydicom_8bit(path, low=None, high=None):
    """What pydicom shows: apply_modality_lut, then apply_voi_lut, mapped from its output range to 8 bit."""
    ds = pydicom.dcmread(path)
    out = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds)
    return to_8bit(out, low, high)


def two_class_tree(root, writer):
    """``writer(path)`` for a file in each of two class folders (a domain needs two classes)."""
    for cls in ("a", "b"):
        writer(root / cls / "x.dcm")
    return root


def gradient(shape=(24, 24), low=-1200, high=1400, signed=True):
    values = np.linspace(low, high, shape[0] * shape[1]).reshape(shape)
    return np.rint(values).astype(np.int16 if signed else np.uint16)


# ---------------------------------------------------------------------------------------- MONOCHROME1

def test_monochrome1_is_inverted_after_the_window(tmp_path):
    px = gradient(low=0, high=4095, signed=False)          # a 12-bit CR: high stored values are dark
    opts = dict(sop=CR, modality="CR", bits=12, signed=False, rescale=None, WindowCenter=2048, WindowWidth=4096)
    mono1 = two_class_tree(tmp_path / "m1", lambda p: write(p, px, photometric="MONOCHROME1", **opts))
    mono2 = two_class_tree(tmp_path / "m2", lambda p: write(p, px, photometric="MONOCHROME2", **opts))
    one = create("dicom", {"root": str(mono1), "windows": "dicom"}, size=24)
    two = create("dicom", {"root": str(mono2), "windows": "dicom"}, size=24)
    np.testing.assert_array_equal(one.images, 255 - two.images)
    # higher stored value = darker: the brightest pixel of the MONOCHROME1 image is its lowest stored value
    assert one.images[0].flat[0] == 255 and one.images[0].flat[-1] == 0
    # and the window is pydicom's (LINEAR, 12-bit unsigned output range), then inverted
    want = pydicom_8bit(mono1 / "a" / "x.dcm", 0, 4095)
    np.testing.assert_array_equal(one.images[0], 255 - want)


# ------------------------------------------------------------------------------------ the file's own VOI

# pydicom indexes an 8-bit LUT with uint8 indices, so its inputs stay within first + 255 in the 8-bit case
@pytest.mark.parametrize("lut_bits,entries,high", [(8, 256, 455), (16, 500, 1000)])
def test_voi_lut_sequence_is_applied_as_pydicom_does(tmp_path, lut_bits, entries, high):
    px = gradient(low=0, high=high, signed=False)
    first = 200                                             # values below 200 and past the last entry are clamped
    lut = np.rint(np.sqrt(np.arange(entries) / (entries - 1)) * (2 ** lut_bits - 1)).astype(int)
    item = Dataset()
    item.LUTDescriptor = [entries, first, lut_bits]
    item.LUTData = lut.tolist()
    item["LUTData"].VR = "US"
    opts = dict(sop=CR, modality="CR", bits=12, signed=False, rescale=None, VOILUTSequence=[item],
                WindowCenter=500, WindowWidth=100)          # the LUT wins over the window, as in pydicom
    root = two_class_tree(tmp_path / "d", lambda p: write(p, px, **opts))
    dom = create("dicom", {"root": str(root), "windows": "dicom"}, size=24)
    want = pydicom_8bit(root / "a" / "x.dcm", 0, 2 ** lut_bits - 1)
    np.testing.assert_array_equal(dom.images[0], want)
    assert want.min() == 0 and want.max() == 255 and len(np.unique(want)) > 100


@pytest.mark.parametrize("function", ["SIGMOID", "LINEAR_EXACT", "LINEAR", ""])
def test_window_function_and_first_of_several_windows_as_pydicom(tmp_path, function):
    px = gradient()                                         # CT, HU = stored - 1024, signed 16 bit
    tags = dict(WindowCenter=[40, 300], WindowWidth=[400, 1500])  # two windows: the first is used
    if function:
        tags["VOILUTFunction"] = function
    root = two_class_tree(tmp_path / "d", lambda p: write(p, px, **tags))
    dom = create("dicom", {"root": str(root), "windows": "dicom"}, size=24)
    low, high = -(2 ** 15) - 1024.0, 2 ** 15 - 1 - 1024.0   # pydicom's output range for this file
    want = pydicom_8bit(root / "a" / "x.dcm", low, high)
    np.testing.assert_array_equal(dom.images[0], want)
    ds = pydicom.dcmread(root / "a" / "x.dcm")
    voi = file_voi(ds)
    assert (voi.center, voi.width, voi.function) == (40, 400, function or "LINEAR")
    assert (voi.out_min, voi.out_max) == (low, high)


def test_unusable_file_windows_are_one_line_errors(tmp_path):
    px = gradient()
    bad = two_class_tree(tmp_path / "f", lambda p: write(p, px, WindowCenter=40, WindowWidth=400,
                                                         VOILUTFunction="CUBIC"))
    with pytest.raises(mltl.UserError, match=r'x.dcm: the file\'s own window \(windows = "dicom"\) cannot be used: '
                                             r"its VOILUTFunction is not LINEAR, LINEAR_EXACT or SIGMOID"):
        create("dicom", {"root": str(bad), "windows": "dicom"})
    narrow = two_class_tree(tmp_path / "w", lambda p: write(p, px, WindowCenter=40, WindowWidth=0.5))
    with pytest.raises(mltl.UserError, match=r"its WindowWidth is 0.5, and a LINEAR window needs at least 1"):
        create("dicom", {"root": str(narrow), "windows": "dicom"})
    none = two_class_tree(tmp_path / "n", lambda p: write(p, px))
    with pytest.raises(mltl.UserError, match=r'window "dicom" asked for but the file has no VOI LUT Sequence and '
                                             r"no WindowCenter/WindowWidth"):
        create("dicom", {"root": str(none), "windows": "dicom"})
    # a preset never reads the file's window: the same files load
    assert len(create("dicom", {"root": str(bad), "windows": "abdomen"})) == 2
    for descriptor, data, message in [([500, 0, 16], list(range(10)), r"its VOI LUT Data holds 10 entries, the LUT "
                                                                       r"Descriptor says 500 \(damaged\)"),
                                      ([4, 0, 9], [0, 1, 2, 3], r"its VOI LUT has 9 bits per entry \(DICOM allows 8 "
                                                                r"or 10 to 16\)")]:
        item = Dataset()
        item.LUTDescriptor, item.LUTData = descriptor, data
        item["LUTData"].VR = "US"
        root = two_class_tree(tmp_path / f"lut{descriptor[2]}", lambda p: write(p, px, VOILUTSequence=[item]))
        with pytest.raises(mltl.UserError, match=message):
            create("dicom", {"root": str(root), "windows": "dicom"})


# ------------------------------------------------------------------------- enhanced multi-frame rescale

def enhanced(path, px, per_frame, shared):
    def transform(slope, intercept):
        t = Dataset()
        t.RescaleSlope, t.RescaleIntercept, t.RescaleType = slope, intercept, "HU"
        group = Dataset()
        group.PixelValueTransformationSequence = [t]
        return group

    tags = {"SharedFunctionalGroupsSequence": [transform(*shared) if shared else Dataset()]}
    if per_frame:
        tags["PerFrameFunctionalGroupsSequence"] = [transform(*r) for r in per_frame]
    return write(path, px, sop=ENHANCED_CT, rescale=None, **tags)


def test_enhanced_multi_frame_uses_each_frames_rescale(tmp_path):
    rng = np.random.default_rng(0)
    px = rng.integers(0, 2000, (2, 16, 16)).astype(np.int16)
    path = enhanced(tmp_path / "e.dcm", px, per_frame=[(1.0, -1024.0), (2.0, -2048.0)], shared=(5.0, 0.0))
    hu = read_dicom_hu(path)
    assert hu.shape == (2, 16, 16)
    np.testing.assert_array_equal(hu[0], px[0] * 1.0 - 1024)   # per-frame wins over the shared group
    np.testing.assert_array_equal(hu[1], px[1] * 2.0 - 2048)
    shared_only = enhanced(tmp_path / "s.dcm", px, per_frame=None, shared=(2.0, -2048.0))
    np.testing.assert_array_equal(read_dicom_hu(shared_only), px * 2.0 - 2048)


# ----------------------------------------------------------------------------- slice order along the normal

def test_oblique_series_is_ordered_along_the_slice_normal(tmp_path):
    theta = np.deg2rad(30)
    row, col = np.array([1.0, 0, 0]), np.array([0, np.cos(theta), np.sin(theta)])   # tilted about x
    normal = np.cross(row, col)
    # true order k = 0..4 along the normal, 2.5 mm apart; in-plane shifts along `col` scramble the raw z,
    # InstanceNumbers are shuffled, and file names sort differently again
    shifts = [40.0, -30.0, 25.0, -45.0, 10.0]
    instances = [3, 5, 1, 4, 2]
    names = ["e", "c", "a", "d", "b"]
    for cls in ("a", "b"):
        for k in range(5):
            position = k * 2.5 * normal + shifts[k] * col + np.array([-100.0, -100.0, 50.0])
            write(tmp_path / cls / "series" / f"{names[k]}.dcm", np.full((8, 8), 1024 + 100 * k, np.int16),
                  InstanceNumber=instances[k], ImageOrientationPatient=[*row, *col],
                  ImagePositionPatient=[round(v, 4) for v in position], patient=f"P{cls}")
    raw_z = [k * 2.5 * normal[2] + shifts[k] * col[2] for k in range(5)]
    assert np.argsort(raw_z).tolist() != list(range(5))      # the raw z would order them wrongly
    dom = create("dicom", {"root": str(tmp_path), "windows": {"level": 200, "width": 1000}}, size=8)
    assert dom.ids[:5] == tuple(f"a/series/{names[k]}.dcm" for k in range(5))
    assert [int(im[0, 0]) for im in dom.images[:5]] == sorted(int(im[0, 0]) for im in dom.images[:5])
    positions = [slice_position(pydicom.dcmread(tmp_path / "a" / "series" / f"{names[k]}.dcm")) for k in range(5)]
    np.testing.assert_allclose(np.diff(positions), 2.5, atol=1e-3)


# ------------------------------------------------------------------------------------------ resampling

def test_dicom_resampled_to_a_pixel_spacing(tmp_path):
    px = gradient((40, 40))
    path = write(tmp_path / "one.dcm", px, PixelSpacing=[0.35, 0.35])
    assert read_dicom_hu(path).shape == (1, 40, 40)
    assert read_dicom_hu(path, spacing_mm=0.7).shape == (1, 20, 20)              # 40 x 0.35 mm = 20 x 0.7 mm
    assert read_dicom_hu(write(tmp_path / "aniso.dcm", px, PixelSpacing=[0.35, 0.7]),
                         spacing_mm=0.7).shape == (1, 20, 40)                     # rows, then columns
    root = two_class_tree(tmp_path / "t", lambda p: write(p, px, PixelSpacing=[0.35, 0.35]))
    small = create("dicom", {"root": str(root), "spacing_mm": 0.7}, size=16)       # 20 x 20 cropped to 16
    padded = create("dicom", {"root": str(root), "spacing_mm": 0.7}, size=32)      # 20 x 20 padded to 32
    assert small.images.shape == (2, 16, 16) and padded.images.shape == (2, 32, 32)
    assert (padded.images[0][:6] == 0).all() and padded.images[0][6:26].any()     # padding is black
    assert "resampled to 0.7 mm pixels" in small.description
    with pytest.raises(mltl.UserError, match=r"spacing_mm must be a pixel size in mm greater than 0"):
        create("dicom", {"root": str(root), "spacing_mm": -1})
    with pytest.raises(mltl.UserError, match=r"cannot resample .*x.dcm: a frame resampled to 0.0001 mm pixels .* "
                                             r"MLTL_MAX_IMAGE_PIXELS"):
        create("dicom", {"root": str(root), "spacing_mm": 0.0001})
    bare = two_class_tree(tmp_path / "bare", lambda p: write(p, px))
    with pytest.raises(mltl.UserError, match=r"x.dcm has no PixelSpacing \(nor ImagerPixelSpacing\), so it cannot "
                                             r"be resampled to spacing_mm = 0.7"):
        create("dicom", {"root": str(bare), "spacing_mm": 0.7})


def test_nifti_resampled_to_a_pixel_spacing(tmp_path):
    nib = pytest.importorskip("nibabel")
    from mltl_ct.nifti import read_nifti_hu

    vol = np.random.default_rng(0).normal(0, 100, (40, 30, 6)).astype(np.float32)
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        nib.save(nib.Nifti1Image(vol, np.diag([0.35, 0.35, 2.0, 1.0])), tmp_path / cls / "v.nii.gz")
    path = tmp_path / "a" / "v.nii.gz"
    assert read_nifti_hu(path, axis=2).shape == (6, 40, 30)
    assert read_nifti_hu(path, axis=2, spacing_mm=0.7).shape == (6, 20, 15)
    assert read_nifti_hu(path, axis="axial", spacing_mm=0.7).shape == (6, 15, 20)   # radiological: rows = y
    assert read_nifti_hu(path, axis="coronal", spacing_mm=0.7).shape == (30, round(6 * 2.0 / 0.7), 20)
    dom = create("nifti", {"root": str(tmp_path), "spacing_mm": 0.7}, size=16)
    assert dom.images.shape == (12, 16, 16) and "resampled to 0.7 mm pixels" in dom.description
    with pytest.raises(mltl.UserError, match=r"nifti: spacing_mm must be a pixel size in mm greater than 0"):
        create("nifti", {"root": str(tmp_path), "spacing_mm": 0})
