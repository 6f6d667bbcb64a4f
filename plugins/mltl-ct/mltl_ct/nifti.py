"""The ``nifti`` domain: CT volumes (``.nii``, ``.nii.gz``) cut into 2D slices, in HU, windowed.

Layout: ``root`` with one sub-folder per class holding volumes, or ``manifest``: a CSV with ``path`` (a
volume, relative to the CSV) and ``label``, optionally a patient id and a ``split`` (see
:mod:`mltl.data.manifest`).

Values: nibabel's ``get_fdata()``, which applies the header's ``scl_slope``/``scl_inter``; for CT volumes
these are HU. Volumes must be 3D (a 4D file with a single volume is accepted); anything else is an error.

Slicing: ``axis = "axial"`` (default), ``"coronal"`` or ``"sagittal"`` reorients the volume to RAS+ first
(``nibabel.as_closest_canonical``) and shows each slice in radiological convention (patient's right on the
image's left, anterior or superior at the top); ``axis = 0, 1 or 2`` slices the stored voxel array as it
is. Which slices, in this order: ``slice_range = [start, stop]`` (integers: voxel indices, Python-style, stop
excluded, negatives from the end; floats in [0, 1]: fractions of the axis, e.g. ``[0.25, 0.75]`` for the
middle half); then, with ``mask_suffix``, only slices where the mask/label volume beside the image
(``<name><mask_suffix>``, e.g. ``ct.nii.gz`` + ``"_seg.nii.gz"`` -> ``ct_seg.nii.gz``) has at least
``min_mask_voxels`` non-zero voxels; then every ``every``-th of those.

Each volume is one group (its slices never straddle two splits); with a manifest patient column, one
patient's volumes form one group (a salted pseudonym, :mod:`mltl.data.privacy`). By default voxel spacing
is not resampled: slices are resized to the square input size, so strongly anisotropic coronal or sagittal
slices are stretched. With ``spacing_mm`` each kept slice is resampled to square pixels of that size (the
in-plane voxel sizes from the header's zooms) and centre-cropped or padded with its minimum to the square
size, so one pixel is ``spacing_mm`` in every image.
"""

from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path

import numpy as np

from mltl import Domain, UserError, check_decoded_bytes, few, pseudonym, resolve_salt

from .sources import labelled_entries
from .windows import apply_windows, check_spacing, fit_square, parse_windows, resample_hu, resize_hu

__all__ = ["nifti_domain", "read_nifti_hu", "select_slices", "AXES"]

AXES = {"sagittal": 0, "coronal": 1, "axial": 2}


def _nibabel():
    try:
        import nibabel
    except ImportError:
        raise UserError('the "nifti" domain needs nibabel: pip install "mltl-ct[nifti]" (or pip install nibabel)') from None
    return nibabel


def is_nifti(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


def read_nifti_hu(path: str | Path, *, axis: str | int = "axial", where: str = "",
                  spacing_mm: float | None = None) -> np.ndarray:
    """The volume as float32, slices first: ``(n_slices, rows, cols)`` along ``axis`` (see module doc); with
    ``spacing_mm``, every slice resampled to square pixels of that size."""
    target = check_spacing(spacing_mm, "nifti")
    data, spacing = _read_nifti(path, axis=axis, where=where)
    if target is None:
        return data
    return np.stack([_resample(s, spacing, target, Path(path), where) for s in data])


def _resample(hu: np.ndarray, spacing: tuple[float, float] | None, target: float, path: Path,
              where: str) -> np.ndarray:
    if spacing is None:
        raise UserError(f"{where}nifti: {path} has no usable voxel size in its header (pixdim), so it cannot be "
                        f"resampled to spacing_mm = {target:g}; leave spacing_mm out or fix the header")
    return resample_hu(hu, spacing, target, prefix=f"{where}nifti: cannot resample {path}: ",
                       what="a slice resampled")


def _in_plane_spacing(zooms, axis: str | int) -> tuple[float, float] | None:
    """(row mm, column mm) of the slices :func:`read_nifti_hu` returns along ``axis``."""
    if len(zooms) < 3 or not all(math.isfinite(z) and z > 0 for z in zooms[:3]):
        return None
    if isinstance(axis, str):  # rows and columns swapped by the radiological transpose
        a, b = (i for i in range(3) if i != AXES.get(axis, 2))
        return float(zooms[b]), float(zooms[a])
    a, b = (i for i in range(3) if i != axis)
    return float(zooms[a]), float(zooms[b])


def _read_nifti(path: str | Path, *, axis: str | int, where: str) -> tuple[np.ndarray, tuple[float, float] | None]:
    nib = _nibabel()
    path = Path(path)
    bad = (nib.filebasedimages.ImageFileError, OSError, EOFError, ValueError, zlib.error, TypeError, struct.error,
           IndexError, OverflowError)
    try:
        img = nib.load(str(path))
        shape = tuple(int(d) for d in img.header.get_data_shape())  # the header only: nothing decoded yet
        check_decoded_bytes(math.prod(shape) * 4, f"{where}nifti: cannot read {path}: ",
                    f"a volume of {' x '.join(map(str, shape[:5]))} voxels (float32 HU)")
        if isinstance(axis, str):
            img = nib.as_closest_canonical(img)
        zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
        data = np.asarray(img.get_fdata(dtype=np.float32))
    except FileNotFoundError:
        raise UserError(f"{where}nifti: {path} not found") from None
    except MemoryError:
        raise UserError(f"{where}nifti: cannot read {path}: not enough memory to decode it") from None
    except bad as exc:
        raise UserError(f"{where}nifti: cannot read {path}: not a NIfTI volume, or damaged or truncated "
                        f"({type(exc).__name__}: {str(exc)[:120]}); remove or replace it") from None
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise UserError(f"{where}nifti: {path} has shape {data.shape} ({data.ndim}D); expected a 3D volume "
                        f"(a 4D file must hold a single volume)")
    for k in range(data.shape[-1] if data.ndim else 0):  # one slab at a time: no mask of the whole volume
        slab = data[..., k]
        if not np.isfinite(slab).all():
            where_nan = tuple(int(v[0]) for v in np.nonzero(~np.isfinite(slab))) + (k,)
            count = sum(int(np.count_nonzero(~np.isfinite(data[..., j]))) for j in range(data.shape[-1]))
            raise UserError(f"{where}nifti: {path}: {count} voxel(s) are NaN or infinite (the first at voxel "
                            f"{few(where_nan, 4)}{' after reorientation' if isinstance(axis, str) else ''}); "
                            f"replace them with a value (e.g. -1024 HU for air) or remove the file")
    if isinstance(axis, str):
        if axis not in AXES:
            raise UserError(f'nifti: axis "{axis}" is not one of {", ".join(AXES)} or 0, 1, 2')
        moved = np.moveaxis(data, AXES[axis], 0)            # (n, a, b) with a, b in RAS order
        return (np.ascontiguousarray(np.transpose(moved, (0, 2, 1))[:, ::-1, ::-1]),  # rows top = A/S, cols = R->L
                _in_plane_spacing(zooms, axis))
    if axis not in (0, 1, 2):
        raise UserError(f"nifti: axis must be 0, 1, 2 or a name ({', '.join(AXES)}), got {axis}")
    return np.ascontiguousarray(np.moveaxis(data, axis, 0)), _in_plane_spacing(zooms, axis)


def select_slices(n: int, *, slice_range: list | None, every: int, mask: np.ndarray | None,
                  min_mask_voxels: int, who: str) -> np.ndarray:
    """Indices of the kept slices, in order."""
    start, stop = 0, n
    if slice_range is not None:
        if len(slice_range) != 2:
            raise UserError(f"{who}: slice_range must be [start, stop], got {slice_range}")
        a, b = slice_range
        if all(isinstance(v, float) for v in (a, b)):
            if not 0 <= a < b <= 1:
                raise UserError(f"{who}: slice_range fractions must satisfy 0 <= start < stop <= 1, got {slice_range}")
            start, stop = int(np.floor(a * n)), max(int(np.ceil(b * n)), int(np.floor(a * n)) + 1)
        elif all(isinstance(v, int) and not isinstance(v, bool) for v in (a, b)):
            start, stop, _ = slice(a, b).indices(n)
        else:
            raise UserError(f"{who}: slice_range is [start, stop] as two integers (voxel indices) or two "
                            f"fractions like [0.25, 0.75], got {slice_range}")
    idx = np.arange(start, max(start, stop))
    if mask is not None:
        counts = np.count_nonzero(mask.reshape(len(mask), -1), axis=1)
        idx = idx[counts[idx] >= min_mask_voxels]
    return idx[::every]


def nifti_domain(root: str | None = None, manifest: str | None = None, classes: list[str] | None = None,
                 windows: str | list | dict = "abdomen", axis: str | int = "axial",
                 slice_range: list | None = None, every: int = 1, mask_suffix: str | None = None,
                 min_mask_voxels: int = 1, salt: str | None = None, path_column: str = "path",
                 label_column: str = "label", group_column: str | None = None, split_column: str | None = None,
                 delimiter: str = ",", size: int | None = None, spacing_mm: float | None = None, *,
                 image_size: int = 64) -> Domain:
    """2D slices of NIfTI CT volumes in HU, windowed; one group per volume; classes from folders or a CSV."""
    _nibabel()
    target = check_spacing(spacing_mm, "nifti")
    if every < 1:
        raise UserError(f"nifti: every must be at least 1, got {every}")
    if min_mask_voxels < 1:
        raise UserError(f"nifti: min_mask_voxels must be at least 1, got {min_mask_voxels}")
    wins = parse_windows(windows, who="nifti: windows")
    side = size or image_size

    def accept(p: Path) -> bool:
        return is_nifti(p) and not (mask_suffix and p.name.endswith(mask_suffix))

    names, entries, origin = labelled_entries("nifti", root=root, manifest=manifest, classes=classes,
                                              accept=accept, path_column=path_column, label_column=label_column,
                                              group_column=group_column, split_column=split_column,
                                              delimiter=delimiter)
    key = resolve_salt(salt) if any(e.patient for e in entries) else b""
    index = {c: i for i, c in enumerate(names)}
    axis_name = axis if isinstance(axis, str) else f"axis{axis}"
    images, labels, ids, groups, splits = [], [], [], [], []
    for e in entries:
        if e.path.is_dir() or not is_nifti(e.path):
            raise UserError(f"{e.where}nifti: {e.path} is not a .nii or .nii.gz file")
        vol, spacing = _read_nifti(e.path, axis=axis, where=e.where)
        mask = None
        if mask_suffix:
            stem = e.path.name[:-7] if e.path.name.lower().endswith(".nii.gz") else e.path.name[:-4]
            mpath = e.path.with_name(stem + mask_suffix)
            if not mpath.is_file():
                raise UserError(f"{e.where}nifti: no mask {mpath.name} beside {e.path} (mask_suffix = "
                                f"{mask_suffix!r}); add it or drop mask_suffix")
            mask = read_nifti_hu(mpath, axis=axis, where=e.where)
            if mask.shape != vol.shape:
                raise UserError(f"{e.where}nifti: mask {mpath} has shape {mask.shape}, the volume {vol.shape} "
                                f"(after orientation); they must match voxel for voxel")
        keep = select_slices(len(vol), slice_range=slice_range, every=every, mask=mask,
                             min_mask_voxels=min_mask_voxels, who=f"{e.where}nifti: {e.path}")
        if len(keep) == 0:
            raise UserError(f"{e.where}nifti: no slice of {e.path} selected ({len(vol)} {axis_name} slices; "
                            f"slice_range {slice_range}, mask_suffix {mask_suffix!r}); widen the selection")
        group = pseudonym("manifest:" + e.patient, key) if e.patient is not None else f"volume:{e.rel}"
        for k in keep:
            if target is None:
                hu = resize_hu(vol[k], side)
            else:
                hu = _resample(vol[k], spacing, target, e.path, e.where)
                hu = fit_square(hu, side, float(hu.min()))
            images.append(apply_windows(hu, wins))
            labels.append(index[e.label])
            ids.append(f"{e.rel}#{axis_name}{int(k):04d}")
            groups.append(group)
            splits.append(e.split)
    split_tuple = tuple(splits) if all(s is not None for s in splits) else None
    return Domain(classes=names, images=np.stack(images), labels=labels, ids=tuple(ids), groups=tuple(groups),
                  splits=split_tuple,
                  description=f"NIfTI {origin}: {len(entries)} volumes, {len(ids)} {axis_name} slices, windows "
                              f"{', '.join(w.describe() for w in wins)}"
                              + (f", resampled to {target:g} mm pixels" if target is not None else ""))
