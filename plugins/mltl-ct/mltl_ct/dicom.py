"""The ``dicom`` domain: CT DICOM files and series, in Hounsfield units, windowed.

Layout: ``root`` is a folder with one sub-folder per class; below each, single DICOM files and/or series
folders (any depth). Or ``manifest``: a CSV with ``path`` (a DICOM file or a series folder, relative to the
CSV) and ``label`` columns, and optionally a patient id and a ``split`` column (see :mod:`mltl.data.manifest`).
A file counts as DICOM when it has the Part 10 preamble (``DICM`` at byte 128; series files often have no
extension) or ends in ``.dcm``/``.dicom``/``.ima``; ``DICOMDIR`` files and hidden files are skipped.

Each slice (each frame of a multi-frame file) is one image: stored values -> HU with the modality LUT
(``RescaleSlope``/``RescaleIntercept``, via :func:`pydicom.pixels.apply_modality_lut`; in an enhanced
multi-frame file each frame's own rescale from the Per-frame Functional Groups'
PixelValueTransformationSequence, else the Shared Functional Groups'), resized (or, with ``spacing_mm``,
resampled to that pixel size and centre-cropped or padded to the square size), then windowed
(:mod:`mltl_ct.windows`). ``windows = "dicom"`` applies the file's own VOI transform as pydicom's
``apply_voi_lut`` does (:class:`mltl_ct.windows.FileVOI`: the VOI LUT Sequence, else the first
WindowCenter/WindowWidth with its VOILUTFunction; per frame from the Frame VOI LUT functional group when
present). MONOCHROME1 images are inverted after the window, so higher is brighter in every image.

Slices of a series are ordered by their position along the slice normal (ImagePositionPatient projected on
the cross product of ImageOrientationPatient's row and column directions), which is right for oblique
series and whatever the InstanceNumbers say; when a file lacks those tags, by InstanceNumber, then z, then
file name. Frames of a multi-frame file keep their stored order.

Compressed pixel data is decoded by pydicom's plugins: JPEG 2000 through Pillow or pylibjpeg-openjpeg
(MIT), JPEG baseline through Pillow, JPEG lossless and JPEG-LS need ``python-gdcm`` (BSD) or, for JPEG-LS,
``pyjpegls`` (MIT); ``pylibjpeg-libjpeg`` decodes them too but is GPL-3.0, so it is named last. A missing
decoder is a one-line error naming the package to install.

Privacy: patient grouping uses ``PatientID`` (``group_by = "patient"``), ``StudyInstanceUID``
(``"study"``) or ``SeriesInstanceUID`` (``"series"``), the first non-empty of them in that order from the one
asked for; the value is turned at once into a salted pseudonym (:mod:`mltl.data.privacy`) and only the
pseudonym is kept. No other tag is read into the domain; image ids are file paths relative to the root (or
as the manifest writes them), so name folders and files without patient names. Everything that touches a
dataset runs inside :func:`quiet_pydicom`: pydicom's value validation is off and its warnings and log
records, which quote element values (an invalid UID, a name typed into a UID field), are dropped; error
messages name the file and never quote a header value (a modality, photometric interpretation or transfer
syntax only when it is a standard code).

Memory: Rows x Columns x NumberOfFrames is checked against the limits of :mod:`mltl.data.limits` before the
pixel data is decoded.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from pathlib import Path
from typing import Literal

import numpy as np

from mltl import Domain, UserError, check_decoded_bytes, check_image_pixels, is_dicom_file, pseudonym, resolve_salt

from .sources import labelled_entries, walk_files
from .windows import (VOI_FUNCTIONS, FileVOI, apply_windows, check_spacing, fit_square, parse_windows,
                      resample_hu, resize_hu)

__all__ = ["dicom_domain", "read_dicom_hu", "file_voi", "slice_position", "pixel_spacing", "DECODER_HINTS",
           "quiet_pydicom"]

DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
# non-GPL decoders first: python-gdcm is BSD, pyjpegls MIT; pylibjpeg-libjpeg is GPL-3.0 (said so)
_GDCM = "python-gdcm (or, GPL-3.0 licensed: pylibjpeg pylibjpeg-libjpeg)"
_JPEGLS = "python-gdcm or pyjpegls (or, GPL-3.0 licensed: pylibjpeg pylibjpeg-libjpeg)"
DECODER_HINTS = {
    "1.2.840.10008.1.2.4.50": "pillow (or python-gdcm)",
    "1.2.840.10008.1.2.4.51": _GDCM,
    "1.2.840.10008.1.2.4.57": _GDCM,
    "1.2.840.10008.1.2.4.70": _GDCM,
    "1.2.840.10008.1.2.4.80": _JPEGLS,
    "1.2.840.10008.1.2.4.81": _JPEGLS,
    "1.2.840.10008.1.2.4.90": "pillow built with OpenJPEG (or pylibjpeg pylibjpeg-openjpeg)",
    "1.2.840.10008.1.2.4.91": "pillow built with OpenJPEG (or pylibjpeg pylibjpeg-openjpeg)",
    "1.2.840.10008.1.2.4.201": "pylibjpeg pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.202": "pylibjpeg pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.203": "pylibjpeg pylibjpeg-openjpeg",
}
_GROUP_TAGS = {"patient": ("PatientID", "StudyInstanceUID", "SeriesInstanceUID"),
               "study": ("StudyInstanceUID", "SeriesInstanceUID"),
               "series": ("SeriesInstanceUID",)}


def _pydicom():
    try:
        import pydicom
    except ImportError:
        raise UserError('the "dicom" domain needs pydicom: pip install "mltl-ct[dicom]" (or pip install pydicom)') from None
    return pydicom


# codes printed in messages; any other value of these tags is not quoted (it could be anything a user typed)
_MODALITIES = {"CT", "MR", "PT", "NM", "US", "CR", "DX", "MG", "XA", "RF", "OT", "SC", "IO", "PX", "ES", "XC",
               "OP", "SM", "RG", "SR", "PR", "KO", "SEG", "REG", "RTSTRUCT", "RTDOSE", "RTPLAN", "RTIMAGE", "DOC",
               "OCT", "OPT", "BMD", "GM", "HD", "ECG", "IVUS", "IVOCT", "LS", "PLAN", "TG", "VA", "XAPROTOCOL"}
_PHOTOMETRIC = {"MONOCHROME1", "MONOCHROME2", "PALETTE COLOR", "RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT",
                "YBR_RCT", "YBR_PARTIAL_420", "HSV", "ARGB", "CMYK"}


@contextlib.contextmanager
def quiet_pydicom():
    """While reading DICOM: no value validation, no pydicom warnings, no pydicom log records.

    pydicom's "Invalid value for VR UI: '<value>'" and similar messages quote raw element values (UIDs,
    patient ids, a name typed into a UID field); nothing from a header may reach the console or a log except
    through the pseudonymiser."""
    from pydicom import config

    loggers = [logging.getLogger("pydicom")]
    saved = [(lg, lg.disabled) for lg in loggers]
    mode = config.settings.reading_validation_mode
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            config.settings.reading_validation_mode = config.IGNORE
            for lg in loggers:
                lg.disabled = True
            yield
        finally:
            config.settings.reading_validation_mode = mode
            for lg, was in saved:
                lg.disabled = was


def _tag_text(ds, keyword: str) -> str:
    """A tag's value as stripped text, '' when absent or unreadable (never raises, never warns)."""
    try:
        return str(ds.get(keyword, "") or "").strip()
    except Exception:  # a damaged element: treat as absent
        return ""


def _tag_number(ds, keyword: str, default: float = 0.0, index: int | None = None) -> float:
    try:
        value = ds.get(keyword)
        if value is None or value == "":
            return default
        number = float(value[index] if index is not None else value)
        return number if math.isfinite(number) else default
    except Exception:  # a damaged or non-numeric value
        return default


def _looks_dicom(path: Path) -> bool:
    return path.name.upper() != "DICOMDIR" and (path.suffix.lower() in DICOM_SUFFIXES or is_dicom_file(path))


def _read(path: Path, where: str = ""):
    pydicom = _pydicom()
    from pydicom.errors import InvalidDicomError

    try:
        with quiet_pydicom():
            return pydicom.dcmread(path)
    except InvalidDicomError:
        raise UserError(f"{where}dicom: cannot read {path}: not a DICOM file (no DICM preamble); "
                        f"remove or replace it") from None
    except Exception as exc:  # whatever pydicom raises on a damaged file; its text may quote header values
        raise UserError(f"{where}dicom: cannot read {path}: the DICOM file is damaged or truncated "
                        f"({type(exc).__name__}); remove or replace it") from None


def _decode(ds, path: Path, where: str) -> np.ndarray:
    """Stored pixel values, (frames, H, W)."""
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise UserError(f"{where}dicom: {path} has no pixel data (a report, presentation state or "
                        f"DICOMDIR?); remove it from the image folders")
    if _tag_number(ds, "SamplesPerPixel", 1) not in (0, 1):  # 0: absent or empty, as before
        kind = _tag_text(ds, "PhotometricInterpretation").upper()
        raise UserError(f"{where}dicom: {path} is a colour image ({kind if kind in _PHOTOMETRIC else 'not grey'}); "
                        f"the dicom domain reads grey CT/MR slices (convert colour images to PNG and use "
                        f"image-folder)")
    rows, cols = int(_tag_number(ds, "Rows")), int(_tag_number(ds, "Columns"))
    frames = max(1, int(_tag_number(ds, "NumberOfFrames", 1)))
    check_image_pixels(cols, rows, f"{where}dicom: cannot read {path}: ", "each frame")
    check_decoded_bytes(rows * cols * frames * 4, f"{where}dicom: cannot read {path}: ",
                f"{frames} frame(s) of {cols}x{rows} pixels in HU (float32)")
    try:
        ts = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
    except Exception:
        ts = ""
    try:
        from pydicom.uid import UID

        ts_name = UID(ts).name if ts else "unknown"
    except Exception:
        ts_name = ts
    if ts_name == ts:  # not a standard transfer syntax: do not quote what the file says
        ts, ts_name = "not a standard UID", "an unknown transfer syntax"
    try:
        arr = ds.pixel_array
    except MemoryError:
        raise UserError(f"{where}dicom: cannot decode {path}: not enough memory for its pixel data") from None
    except Exception as exc:  # pydicom raises RuntimeError/NotImplementedError/ValueError from its plugins
        text = str(exc)
        if "missing" in text or "No pixel data decoders" in text or "no available" in text.lower() \
                or "not installed" in text:
            hint = DECODER_HINTS.get(ts, "python-gdcm, or pylibjpeg pylibjpeg-openjpeg")
            raise UserError(f"{where}dicom: cannot decode {path}: its pixel data is compressed as {ts_name} "
                            f"({ts}) and no installed decoder handles it; pip install {hint}") from None
        raise UserError(f"{where}dicom: cannot decode the pixel data of {path} ({ts_name}): damaged or "
                        f"truncated ({type(exc).__name__}); remove or replace the file") from None
    arr = np.asarray(arr)
    if frames == 1 and arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise UserError(f"{where}dicom: {path}: unexpected pixel array shape {arr.shape}")
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        frame = int(np.flatnonzero(~np.isfinite(arr.reshape(len(arr), -1)).all(axis=1))[0])
        raise UserError(f"{where}dicom: {path}: frame {frame} has NaN or infinite pixel values; replace or "
                        f"remove the file")
    return arr


def _functional(ds, frame: int, keyword: str):
    """The first item of the functional group ``keyword`` (e.g. ``PixelValueTransformationSequence``) for
    ``frame`` of an enhanced multi-frame file: from the Per-frame Functional Groups, else the Shared ones;
    None when neither has it (a classic single-frame file)."""
    for groups, index in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        try:
            seq = ds.get(groups)
            if not seq or index >= len(seq):
                continue
            inner = seq[index].get(keyword)
            if inner:
                return inner[0]
        except (AttributeError, IndexError, TypeError, KeyError):
            continue
    return None


def _frame_rescale(ds, frame: int) -> tuple[float, float] | None:
    """(slope, intercept) of ``frame``: its functional group's, else the file's top-level; None if neither."""
    item = _functional(ds, frame, "PixelValueTransformationSequence")
    for src in (item, ds):
        if src is not None and src.get("RescaleSlope") is not None and src.get("RescaleIntercept") is not None:
            return float(src.RescaleSlope), float(src.RescaleIntercept)
    return None


def _to_hu(ds, arr: np.ndarray) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut

    out = np.empty(arr.shape, dtype=np.float32)
    for k in range(len(arr)):
        item = _functional(ds, k, "PixelValueTransformationSequence")  # enhanced multi-frame: this frame's
        if item is not None and item.get("RescaleSlope") is not None and item.get("RescaleIntercept") is not None:
            out[k] = arr[k].astype(np.float32) * float(item.RescaleSlope) + float(item.RescaleIntercept)
        else:
            out[k] = np.asarray(apply_modality_lut(arr[k], ds), dtype=np.float32)
    return out


def _hu(ds, arr: np.ndarray, path: Path, where: str) -> np.ndarray:
    """:func:`_to_hu`, with a damaged rescale or LUT element as one line that quotes no header value."""
    try:
        return _to_hu(ds, arr)
    except MemoryError:
        raise UserError(f"{where}dicom: {path}: not enough memory to convert its pixels to HU") from None
    except Exception as exc:
        raise UserError(f"{where}dicom: {path}: cannot convert the stored values to HU: its RescaleSlope, "
                        f"RescaleIntercept or modality LUT is damaged ({type(exc).__name__}); fix or remove the "
                        f"file") from None


def read_dicom_hu(path: str | Path, *, spacing_mm: float | None = None) -> np.ndarray:
    """A DICOM file's slices in HU, float32 ``(frames, H, W)`` (modality LUT applied); with ``spacing_mm``,
    each frame resampled to square pixels of that size (``H = round(Rows * row spacing / spacing_mm)``)."""
    path = Path(path)
    target = check_spacing(spacing_mm, "dicom")
    ds = _read(path)
    with quiet_pydicom():
        hu = _hu(ds, _decode(ds, path, ""), path, "")
        if target is None:
            return hu
        return np.stack([_resample(frame, ds, k, target, path, "") for k, frame in enumerate(hu)])


def _numbers(value) -> list[float]:
    """A (possibly multi-valued) numeric element as floats; [] when absent or not numbers."""
    if value is None or value == "":
        return []
    try:
        items = list(value) if hasattr(value, "__len__") and not isinstance(value, (str, bytes)) else [value]
        return [float(v) for v in items]
    except (TypeError, ValueError):
        return []


def pixel_spacing(ds, frame: int = 0) -> tuple[float, float] | None:
    """(row spacing, column spacing) in mm of ``frame``: the Pixel Measures functional group's PixelSpacing,
    else PixelSpacing, else ImagerPixelSpacing (projection radiographs often carry only that); None if none."""
    item = _functional(ds, frame, "PixelMeasuresSequence")
    for src, keyword in ((item, "PixelSpacing"), (ds, "PixelSpacing"), (ds, "ImagerPixelSpacing")):
        if src is None:
            continue
        values = _numbers(src.get(keyword))
        if len(values) >= 2 and all(math.isfinite(v) and v > 0 for v in values[:2]):
            return values[0], values[1]
    return None


def _resample(frame: np.ndarray, ds, k: int, target: float, path: Path, where: str) -> np.ndarray:
    spacing = pixel_spacing(ds, k)
    if spacing is None:
        raise UserError(f"{where}dicom: {path} has no PixelSpacing (nor ImagerPixelSpacing), so it cannot be "
                        f"resampled to spacing_mm = {target:g}; leave spacing_mm out or fix the file")
    return resample_hu(frame, spacing, target, prefix=f"{where}dicom: cannot resample {path}: ",
                       what="a frame resampled")


def slice_position(ds) -> float | None:
    """The slice's position along its normal (mm): ImagePositionPatient . (row x column direction of
    ImageOrientationPatient), from the Plane Position/Orientation functional groups of frame 0 when the
    file has no top-level tags; None when they are missing or degenerate."""
    iop = _numbers(ds.get("ImageOrientationPatient"))
    ipp = _numbers(ds.get("ImagePositionPatient"))
    if len(iop) != 6:
        item = _functional(ds, 0, "PlaneOrientationSequence")
        iop = _numbers(item.get("ImageOrientationPatient")) if item is not None else []
    if len(ipp) != 3:
        item = _functional(ds, 0, "PlanePositionSequence")
        ipp = _numbers(item.get("ImagePositionPatient")) if item is not None else []
    if len(iop) != 6 or len(ipp) != 3 or not all(math.isfinite(v) for v in iop + ipp):
        return None
    normal = np.cross(iop[:3], iop[3:])
    norm = float(np.linalg.norm(normal))
    if norm < 1e-6:
        return None
    return float(np.dot(ipp, normal) / norm)


def _voi_error(path: Path, where: str, why: str) -> UserError:
    return UserError(f'{where}dicom: {path}: the file\'s own window (windows = "dicom") cannot be used: {why}; '
                     f"name a preset or give {{ level, width }}")


def _voi_lut(ds, item, path: Path, where: str) -> FileVOI:
    descriptor = [int(v) for v in _numbers(item.get("LUTDescriptor"))]
    if len(descriptor) != 3:
        raise _voi_error(path, where, "its VOI LUT Sequence has no valid LUT Descriptor (3 numbers)")
    entries, first, bits = descriptor[0] or 2 ** 16, descriptor[1], descriptor[2]
    if bits != 8 and not 10 <= bits <= 16:
        raise _voi_error(path, where, f"its VOI LUT has {bits} bits per entry (DICOM allows 8 or 10 to 16)")
    data = item.get("LUTData")
    try:
        if isinstance(data, (bytes, bytearray)):  # OW: 16-bit words in the file's byte order
            little = getattr(ds, "original_encoding", (None, True))[1] is not False
            lut = np.frombuffer(bytes(data), dtype="<u2" if little else ">u2")
        else:
            lut = np.asarray(_numbers(data), dtype=np.float64)
    except (TypeError, ValueError):
        lut = np.empty(0)
    if len(lut) < entries:
        raise _voi_error(path, where, f"its VOI LUT Data holds {len(lut)} entries, the LUT Descriptor says "
                                      f"{entries} (damaged)")
    return FileVOI(lut=np.asarray(lut[:entries], dtype=np.float64), first_mapped=first, lut_bits=bits)


def _output_range(ds, frame: int) -> tuple[float, float]:
    """The range a window maps onto, as pydicom's ``apply_windowing`` computes it."""
    modality_lut = ds.get("ModalityLUTSequence")
    bits = int(_tag_number(ds, "BitsStored", 0) or _tag_number(ds, "BitsAllocated", 16))
    if modality_lut:
        lut_bits = _numbers(modality_lut[0].get("LUTDescriptor"))
        low, high = 0.0, float(2 ** int(lut_bits[2]) - 1) if len(lut_bits) == 3 else float(2 ** bits - 1)
    elif int(_tag_number(ds, "PixelRepresentation", 0)) == 0:
        low, high = 0.0, float(2 ** bits - 1)
    else:
        low, high = float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    rescale = _frame_rescale(ds, frame)
    if rescale is not None:
        slope, intercept = rescale
        low, high = low * slope + intercept, high * slope + intercept
    return low, high


def file_voi(ds, frame: int = 0, path: Path | str = "", where: str = "") -> FileVOI | None:
    """The VOI transform ``windows = "dicom"`` applies to ``frame``, or None when the file states none.

    Where from, the first that has one: the frame's Frame VOI LUT functional group (per-frame, then shared),
    then the file's top level. In each, a VOI LUT Sequence (with LUT Descriptor and LUT Data) wins over
    WindowCenter/WindowWidth, as in pydicom's ``apply_voi_lut``; of a multi-valued window the first value is
    used; VOILUTFunction absent or empty means LINEAR. A VOILUTFunction other than LINEAR, LINEAR_EXACT or
    SIGMOID, a width below 1 (LINEAR) or not above 0, or a damaged LUT is a :class:`UserError`."""
    path = Path(path)
    sources = [_functional(ds, frame, "FrameVOILUTSequence"), ds]
    for src in sources:
        if src is None:
            continue
        luts = src.get("VOILUTSequence")
        if luts and luts[0].get("LUTDescriptor") is not None and luts[0].get("LUTData") is not None:
            return _voi_lut(ds, luts[0], path, where)
        centers, widths = _numbers(src.get("WindowCenter")), _numbers(src.get("WindowWidth"))
        if src.get("WindowCenter") is None or src.get("WindowWidth") is None:
            continue
        if not centers or not widths or not math.isfinite(centers[0]) or not math.isfinite(widths[0]):
            raise _voi_error(path, where, "its WindowCenter or WindowWidth is not a number")
        function = _tag_text(src, "VOILUTFunction").upper() or "LINEAR"
        if function not in VOI_FUNCTIONS:
            raise _voi_error(path, where, "its VOILUTFunction is not LINEAR, LINEAR_EXACT or SIGMOID")
        center, width = centers[0], widths[0]
        if width < 1 if function == "LINEAR" else width <= 0:
            raise _voi_error(path, where, f"its WindowWidth is {width:g}, and a {function} window needs "
                                          f"{'at least 1' if function == 'LINEAR' else 'more than 0'}")
        low, high = _output_range(ds, frame)
        return FileVOI(center=center, width=width, function=function, out_min=low, out_max=high)
    return None


def _series_files(folder: Path) -> list[Path]:
    return [p for p in walk_files(folder) if _looks_dicom(p)]


def dicom_domain(root: str | None = None, manifest: str | None = None, classes: list[str] | None = None,
                 windows: str | list | dict = "abdomen",
                 group_by: Literal["patient", "study", "series", "file"] = "patient", salt: str | None = None,
                 path_column: str = "path", label_column: str = "label", group_column: str | None = None,
                 split_column: str | None = None, delimiter: str = ",", size: int | None = None,
                 spacing_mm: float | None = None, *, image_size: int = 64) -> Domain:
    """CT DICOM slices (files and series) in HU, windowed; classes from sub-folders or a CSV manifest."""
    _pydicom()
    wins = parse_windows(windows, who="dicom: windows", allow_file=True)
    target = check_spacing(spacing_mm, "dicom")
    from_file = any(w.level is None for w in wins)
    side = size or image_size
    names, entries, origin = labelled_entries("dicom", root=root, manifest=manifest, classes=classes,
                                              accept=_looks_dicom, path_column=path_column,
                                              label_column=label_column, group_column=group_column,
                                              split_column=split_column, delimiter=delimiter)
    index = {c: i for i, c in enumerate(names)}
    key = resolve_salt(salt) if group_by != "file" or any(e.patient for e in entries) else b""
    images, labels, ids, groups, splits = [], [], [], [], []
    from_tags = 0
    series: dict[tuple[str, str], list] = {}  # (class, series folder or file) -> its slices, in first-seen order
    for e in entries:
        files = _series_files(e.path) if e.path.is_dir() else [e.path]
        if not files:
            raise UserError(f"{e.where}dicom: folder {e.path} holds no DICOM files")
        slices = []
        for f in files:
            ds = _read(f, e.where)
            with quiet_pydicom():  # every access to the dataset: values are converted lazily, and may warn
                arr = _decode(ds, f, e.where)
                modality = (_tag_text(ds, "Modality") or "CT").upper()
                if modality not in ("CT", "PT", "OT") and any(w.level is not None for w in wins):
                    shown = modality if modality in _MODALITIES else "not CT (an unrecognised modality)"
                    raise UserError(f'{e.where}dicom: {f} is {shown}, which has no Hounsfield units; use '
                                    f'windows = "dicom" (the file\'s own window) or a window in its own units')
                hu = _hu(ds, arr, f, e.where)
                if e.patient is not None:
                    group = pseudonym("manifest:" + e.patient, key)
                elif group_by == "file":
                    group = None
                else:
                    tag, value = next(((t, _tag_text(ds, t)) for t in _GROUP_TAGS[group_by] if _tag_text(ds, t)),
                                      (None, ""))
                    group = pseudonym(f"{tag}:{value}", key) if tag else None
                position = slice_position(ds)
                order = (int(_tag_number(ds, "InstanceNumber")), _tag_number(ds, "ImagePositionPatient", index=2),
                         f.name)
                invert = _tag_text(ds, "PhotometricInterpretation").upper() == "MONOCHROME1"
                vois = [file_voi(ds, k, f, e.where) if from_file else None for k in range(len(hu))]
                if target is None:
                    frames = [resize_hu(frame, side) for frame in hu]
                else:  # resampled to target mm pixels, then cropped/padded with the image's black
                    frames = [_resample(frame, ds, k, target, f, e.where) for k, frame in enumerate(hu)]
                    frames = [fit_square(frame, side, float(frame.max() if invert else frame.min()))
                              for frame in frames]
            windowed = [apply_windows(frame, wins, file_window=voi, invert=invert, who=f"{e.where}dicom: {f}")
                        for frame, voi in zip(frames, vois)]
            slices.append((position, order, e, f, windowed, group))
            del ds, arr, hu, frames
        series.setdefault((e.label, e.unit), []).extend(slices)
    for slices in series.values():  # one series folder's files: along the slice normal when all have one
        if all(s[0] is not None for s in slices):
            slices.sort(key=lambda s: (s[0], s[1]))
        else:
            slices.sort(key=lambda s: s[1])
        for _, _, e, f, windowed, group in slices:
            rel = e.rel if f == e.path else f"{e.rel.rstrip('/')}/{f.relative_to(e.path).as_posix()}"
            for k, image in enumerate(windowed):
                images.append(image)
                labels.append(index[e.label])
                ids.append(rel if len(windowed) == 1 else f"{rel}#frame{k}")
                groups.append(group if group is not None else (ids[-1] if group_by == "file" else
                                                               f"folder:{e.unit}"))
                from_tags += group is not None and e.patient is None
                splits.append(e.split)
    split_tuple = tuple(splits) if all(s is not None for s in splits) else None
    if split_tuple is None and any(s is not None for s in splits):
        raise UserError("dicom: some manifest rows have a split and others not; give every row one")
    return Domain(classes=names, images=np.stack(images), labels=labels, ids=tuple(ids), groups=tuple(groups),
                  splits=split_tuple,
                  description=f"DICOM {origin}: {len(ids)} slices, windows "
                              f"{', '.join(w.describe() for w in wins)}, {len(set(groups))} groups by {group_by}"
                              + (f", resampled to {target:g} mm pixels" if target is not None else "")
                              + (f" ({len(ids) - from_tags} slices without the tag: grouped by series folder)"
                                 if group_by != "file" and from_tags < len(ids) and not any(e.patient for e in entries)
                                 else ""))
