"""The ``dicom`` domain: CT DICOM files and series, in Hounsfield units, windowed.

Layout: ``root`` is a folder with one sub-folder per class; below each, single DICOM files and/or series
folders (any depth). Or ``manifest``: a CSV with ``path`` (a DICOM file or a series folder, relative to the
CSV) and ``label`` columns, and optionally a patient id and a ``split`` column (see :mod:`mltl.data.manifest`).
A file counts as DICOM when it has the Part 10 preamble (``DICM`` at byte 128; series files often have no
extension) or ends in ``.dcm``/``.dicom``/``.ima``; ``DICOMDIR`` files and hidden files are skipped.

Each slice (each frame of a multi-frame file) is one image: stored values -> HU with the modality LUT
(``RescaleSlope``/``RescaleIntercept``, via :func:`pydicom.pixels.apply_modality_lut`), resized, then
windowed (:mod:`mltl_ct.windows`). Slices of a series are ordered by InstanceNumber, then position.

Compressed pixel data is decoded by pydicom's plugins: JPEG 2000 through Pillow (or pylibjpeg-openjpeg),
JPEG baseline through Pillow, JPEG lossless and JPEG-LS need ``pylibjpeg pylibjpeg-libjpeg`` or
``python-gdcm``; a missing decoder is a one-line error naming the package to install.

Privacy: patient grouping uses ``PatientID`` (``group_by = "patient"``), ``StudyInstanceUID``
(``"study"``) or ``SeriesInstanceUID`` (``"series"``), the first non-empty of them in that order from the one
asked for; the value is turned at once into a salted pseudonym (:mod:`mltl.data.privacy`) and only the
pseudonym is kept. No other tag is read into the domain; image ids are file paths relative to the root (or
as the manifest writes them), so name folders and files without patient names. pydicom's warnings, which
can quote element values, are silenced while reading.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Literal

import numpy as np

from mltl import Domain, UserError, is_dicom_file, pseudonym, resolve_salt

from .sources import labelled_entries, walk_files
from .windows import apply_windows, parse_windows, resize_hu

__all__ = ["dicom_domain", "read_dicom_hu", "DECODER_HINTS"]

DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
_LIBJPEG = "pylibjpeg pylibjpeg-libjpeg (or python-gdcm)"
DECODER_HINTS = {
    "1.2.840.10008.1.2.4.50": "pillow (or pylibjpeg pylibjpeg-libjpeg)",
    "1.2.840.10008.1.2.4.51": _LIBJPEG,
    "1.2.840.10008.1.2.4.57": _LIBJPEG,
    "1.2.840.10008.1.2.4.70": _LIBJPEG,
    "1.2.840.10008.1.2.4.80": _LIBJPEG + " or pyjpegls",
    "1.2.840.10008.1.2.4.81": _LIBJPEG + " or pyjpegls",
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


def _looks_dicom(path: Path) -> bool:
    return path.name.upper() != "DICOMDIR" and (path.suffix.lower() in DICOM_SUFFIXES or is_dicom_file(path))


def _read(path: Path, where: str = ""):
    pydicom = _pydicom()
    from pydicom.errors import InvalidDicomError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pydicom.dcmread(path)
    except InvalidDicomError:
        raise UserError(f"{where}dicom: cannot read {path}: not a DICOM file (no DICM preamble); "
                        f"remove or replace it") from None
    except (OSError, EOFError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        raise UserError(f"{where}dicom: cannot read {path}: the DICOM file is damaged or truncated "
                        f"({type(exc).__name__}); remove or replace it") from None


def _decode(ds, path: Path, where: str) -> np.ndarray:
    """Stored pixel values, (frames, H, W)."""
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise UserError(f"{where}dicom: {path} has no pixel data (a report, presentation state or "
                        f"DICOMDIR?); remove it from the image folders")
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise UserError(f"{where}dicom: {path} is a colour image ({ds.get('PhotometricInterpretation', '?')}); "
                        f"the dicom domain reads grey CT/MR slices (convert colour images to PNG and use "
                        f"image-folder)")
    ts = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr = ds.pixel_array
    except Exception as exc:  # pydicom raises RuntimeError/NotImplementedError/ValueError from its plugins
        text = str(exc)
        try:
            from pydicom.uid import UID

            ts_name = UID(ts).name if ts else "unknown"
        except Exception:
            ts_name = ts
        if "missing" in text or "No pixel data decoders" in text or "no available" in text.lower() \
                or "not installed" in text:
            hint = DECODER_HINTS.get(ts, "pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg (or python-gdcm)")
            raise UserError(f"{where}dicom: cannot decode {path}: its pixel data is compressed as {ts_name} "
                            f"({ts}) and no installed decoder handles it; pip install {hint}") from None
        raise UserError(f"{where}dicom: cannot decode the pixel data of {path} ({ts_name}): damaged or "
                        f"truncated ({type(exc).__name__}); remove or replace the file") from None
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    arr = np.asarray(arr)
    if frames == 1 and arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise UserError(f"{where}dicom: {path}: unexpected pixel array shape {arr.shape}")
    return arr


def _to_hu(ds, arr: np.ndarray) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut

    if "RescaleSlope" not in ds and "ModalityLUTSequence" not in ds:
        shared = ds.get("SharedFunctionalGroupsSequence")  # enhanced multi-frame CT
        try:
            t = shared[0].PixelValueTransformationSequence[0]
            return arr.astype(np.float32) * float(t.RescaleSlope) + float(t.RescaleIntercept)
        except (AttributeError, IndexError, TypeError, KeyError):
            pass
    return np.asarray(apply_modality_lut(arr, ds), dtype=np.float32)


def read_dicom_hu(path: str | Path) -> np.ndarray:
    """A DICOM file's slices in HU, float32 ``(frames, H, W)`` (modality LUT applied)."""
    path = Path(path)
    ds = _read(path)
    return _to_hu(ds, _decode(ds, path, ""))


def _file_window(ds) -> tuple[float, float] | None:
    def first(v):
        if v is None:
            return None
        try:
            return float(v[0]) if hasattr(v, "__len__") and not isinstance(v, str) else float(v)
        except (TypeError, ValueError, IndexError):
            return None

    c, w = first(ds.get("WindowCenter")), first(ds.get("WindowWidth"))
    return (c, w) if c is not None and w and w > 0 else None


def _series_files(folder: Path) -> list[Path]:
    return [p for p in walk_files(folder) if _looks_dicom(p)]


def dicom_domain(root: str | None = None, manifest: str | None = None, classes: list[str] | None = None,
                 windows: str | list | dict = "abdomen",
                 group_by: Literal["patient", "study", "series", "file"] = "patient", salt: str | None = None,
                 path_column: str = "path", label_column: str = "label", group_column: str | None = None,
                 split_column: str | None = None, delimiter: str = ",", size: int | None = None,
                 *, image_size: int = 64) -> Domain:
    """CT DICOM slices (files and series) in HU, windowed; classes from sub-folders or a CSV manifest."""
    _pydicom()
    wins = parse_windows(windows, who="dicom: windows", allow_file=True)
    side = size or image_size
    names, entries, origin = labelled_entries("dicom", root=root, manifest=manifest, classes=classes,
                                              accept=_looks_dicom, path_column=path_column,
                                              label_column=label_column, group_column=group_column,
                                              split_column=split_column, delimiter=delimiter)
    index = {c: i for i, c in enumerate(names)}
    key = resolve_salt(salt) if group_by != "file" or any(e.patient for e in entries) else b""
    images, labels, ids, groups, splits = [], [], [], [], []
    from_tags = 0
    for e in entries:
        files = _series_files(e.path) if e.path.is_dir() else [e.path]
        if not files:
            raise UserError(f"{e.where}dicom: folder {e.path} holds no DICOM files")
        slices = []
        for f in files:
            ds = _read(f, e.where)
            arr = _decode(ds, f, e.where)
            modality = str(ds.get("Modality", "CT") or "CT").upper()
            if modality not in ("CT", "PT", "OT") and any(w.level is not None for w in wins):
                raise UserError(f'{e.where}dicom: {f} is {modality}, which has no Hounsfield units; use '
                                f'windows = "dicom" (the file\'s own window) or a window in its own units')
            hu = _to_hu(ds, arr)
            if e.patient is not None:
                group = pseudonym("manifest:" + e.patient, key)
            elif group_by == "file":
                group = None
            else:
                tag, value = next(((t, str(ds.get(t, "") or "").strip()) for t in _GROUP_TAGS[group_by]
                                   if str(ds.get(t, "") or "").strip()), (None, ""))
                group = pseudonym(f"{tag}:{value}", key) if tag else None
            order = (int(ds.get("InstanceNumber", 0) or 0),
                     float((ds.get("ImagePositionPatient") or [0, 0, 0])[2]), f.name)
            fw = _file_window(ds)
            windowed = [apply_windows(resize_hu(frame, side), wins, file_window=fw, who=f"{e.where}dicom: {f}")
                        for frame in hu]
            slices.append((order, f, windowed, group))
            del ds, arr, hu
        slices.sort(key=lambda s: s[0])
        for _, f, windowed, group in slices:
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
                              + (f" ({len(ids) - from_tags} slices without the tag: grouped by series folder)"
                                 if group_by != "file" and from_tags < len(ids) and not any(e.patient for e in entries)
                                 else ""))
