"""The ``covid-ct`` domain: COVID-CT (Zhao et al. 2020, arXiv:2003.13865), chest CT slices with patient ids.

The dataset (GitHub ``UCSD-AI4H/COVID-CT``) is a folder with

* ``Images/CT_COVID`` and ``Images/CT_NonCOVID`` (upstream: ``Images-processed/``, unzipped): PNG and JPEG
  figures cut from papers, RGB, RGBA and grey, about 100 to over 1,600 px; file names contain ``%``;
* ``Info/COVID-CT-MetaInfo.csv`` (columns ``File name``, ``Patient ID``, ...) and
  ``Info/NonCOVID-CT-MetaInfo.csv`` (an unnamed index column, ``image name``, ``patient id``), also looked
  for in the folder itself and in ``Data-split/``;
* ``split/`` (upstream: ``Data-split/``) ``COVID/{train,val,test}CT_COVID.txt`` and
  ``NonCOVID/{train,val,test}CT_NonCOVID.txt``: the official patient-disjoint split, one file name a line.

Classes ``non-covid`` (0) and ``covid`` (1): COVID is the positive class (column 1) of the binary ROC and
calibration. Every image is grouped by its patient, namespaced by class (``covid:Patient 1``,
``non-covid:crawled_patient_0``; the two CSVs number their patients independently), so no patient straddles
two splits or folds. ``split = "official"`` uses the official split as ``Domain.splits``; ``"none"`` leaves the
split to the chain (``split.val`` / ``split.test`` or patient-grouped ``split.folds``).

Mismatches: an image without a metadata row (its patient unknown), a metadata row giving one image two
patients, a split file naming an image of the other class, an image in two split files or in none, and a
patient in two official splits are :class:`mltl.UserError`\\ s; metadata rows and split-file lines naming
no image are skipped and counted in the domain description.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from mltl import IMAGE_SUFFIXES, Domain, UserError, check_decoded_bytes, did_you_mean, few, read_image

WHO = "covid-ct"
CLASSES = ("non-covid", "covid")
SPLIT_CHOICES = ("official", "none")
_SPLITS = ("train", "val", "test")

# class name -> (image folder, split folder and file tag, metadata CSV, file-name headers, patient headers)
_LAYOUT = {
    "covid": ("CT_COVID", "COVID", "COVID-CT-MetaInfo.csv", ("file name", "image name"), ("patient id",)),
    "non-covid": ("CT_NonCOVID", "NonCOVID", "NonCOVID-CT-MetaInfo.csv", ("image name", "file name"),
                  ("patient id",)),
}
_IMAGE_DIRS = ("Images", "Images-processed")
_SPLIT_DIRS = ("split", "Data-split")
_INFO_DIRS = ("Info", ".", "Data-split")

# decoded stacks of this process, keyed by files (path, size, mtime, inode) and settings: a k-fold or several stages on
# COVID-CT decode the 746 figures once per process (the core decode cache is not part of the plugin API)
_MEMO: dict[tuple, np.ndarray] = {}
_MEMO_MAX = 2  # stacks kept; a stack over _MEMO_BYTES is not kept
_MEMO_BYTES = 512 * 2**20


def _first(base: Path, dirs: tuple[str, ...], *parts: str) -> Path | None:
    for d in dirs:
        p = base.joinpath(d, *parts)
        if p.exists():
            return p
    return None


def _list_images(folder: Path) -> tuple[list[str], int]:
    """(image file names, sorted; how many other visible files were left out)."""
    names, other = [], 0
    for entry in os.scandir(folder):
        if entry.name.startswith(".") or not entry.is_file():
            continue
        if Path(entry.name).suffix.lower() in IMAGE_SUFFIXES:
            names.append(entry.name)
        else:
            other += 1
    return sorted(names), other


def _read_metadata(base: Path, cls: str) -> tuple[dict[str, str], Path]:
    """image file name -> patient id, from the class's metadata CSV."""
    _, _, csv_name, name_headers, patient_headers = _LAYOUT[cls]
    path = _first(base, _INFO_DIRS, csv_name)
    if path is None:
        xlsx = _first(base, _INFO_DIRS, csv_name[:-4] + ".xlsx")
        hint = (f"found {xlsx}: save it as CSV ({csv_name}) beside it" if xlsx is not None else
                "download it with the images from GitHub UCSD-AI4H/COVID-CT")
        raise UserError(f'{WHO}: no {csv_name} in {base} (looked in {", ".join(_INFO_DIRS)}); it gives each '
                        f"{cls} image's patient id; {hint}")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"{WHO}: cannot read {path}: {getattr(exc, 'strerror', None) or exc}; "
                        f"restore the file from the dataset") from None
    header = [h.strip().casefold() for h in rows[0]] if rows else []
    i_name = next((header.index(h) for h in name_headers if h in header), None)
    i_patient = next((header.index(h) for h in patient_headers if h in header), None)
    if i_name is None or i_patient is None:
        raise UserError(f"{WHO}: {path}: expected columns {name_headers[0]!r} and {patient_headers[0]!r} "
                        f"(any letter case) in the first line, found {few(rows[0]) if rows else 'an empty file'}; "
                        f"restore the file from the dataset")
    out: dict[str, str] = {}
    line_of: dict[str, int] = {}
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        name = row[i_name].strip() if i_name < len(row) else ""
        patient = row[i_patient].strip() if i_patient < len(row) else ""
        if not name:
            raise UserError(f"{WHO}: {path} line {line}: no image name in column {rows[0][i_name]!r}; fill it "
                            f"in or delete the row")
        if not patient:
            raise UserError(f"{WHO}: {path} line {line}: image {name} has no patient id in column "
                            f"{rows[0][i_patient]!r}; fill it in (images of one patient must stay in one split) "
                            f"or delete the row and the image")
        if name in out and out[name] != patient:
            raise UserError(f"{WHO}: {path} lines {line_of[name]} and {line}: image {name} is given two patients "
                            f"({out[name]!r} and {patient!r}); keep the right row and delete the other")
        out[name] = patient
        line_of.setdefault(name, line)
    return out, path


def _read_split(base: Path, cls: str, names: set[str], other_names: set[str], other_cls: str
                ) -> tuple[dict[str, str], int]:
    """image name -> official split for one class; and how many split-file lines name no image."""
    _, tag, *_ = _LAYOUT[cls]
    folder = _first(base, _SPLIT_DIRS, tag)
    if folder is None:
        raise UserError(f'{WHO}: split = "official" but {base} has no {"/ or ".join(_SPLIT_DIRS)}/{tag} folder '
                        f"with the official split files; add it from GitHub UCSD-AI4H/COVID-CT (Data-split/), or "
                        f'set split = "none" to let the chain split by patient')
    out: dict[str, str] = {}
    missing = 0
    for s in _SPLITS:
        path = folder / f"{s}CT_{tag}.txt"
        try:
            lines = path.read_text(encoding="utf-8-sig").splitlines()
        except FileNotFoundError:
            raise UserError(f'{WHO}: split = "official" but {path} is missing; restore it from the dataset or set '
                            f'split = "none"') from None
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"{WHO}: cannot read {path}: {getattr(exc, 'strerror', None) or exc}; restore it from "
                            f"the dataset") from None
        for line_no, raw in enumerate(lines, start=1):
            name = raw if raw in names else raw.strip()
            if not name:
                continue
            if name not in names:
                if name in other_names:
                    raise UserError(f"{WHO}: {path} line {line_no}: {name} is a {other_cls} image, listed in a "
                                    f"{cls} split file; remove the line, or move the image to its class folder")
                missing += 1
                continue
            if out.get(name, s) != s:
                raise UserError(f"{WHO}: {path} line {line_no}: {name} is also in the {out[name]} split file; "
                                f"list each image in one split file")
            out[name] = s
    return out, missing


def _decode(paths: list[Path], side: int, channels: int) -> np.ndarray:
    stats = []
    for p in paths:
        try:
            st = p.stat()
        except OSError as exc:
            raise UserError(f"{WHO}: cannot read image {p}: {exc.strerror or exc}; remove or replace the file") from None
        stats.append((str(p), st.st_size, st.st_mtime_ns, st.st_ino))
    key = (tuple(stats), side, channels)
    hit = _MEMO.get(key)
    if hit is not None:
        return hit.copy()
    images = np.stack([read_image(p, channels=channels, size=side, who=WHO) for p in paths])
    if images.nbytes <= _MEMO_BYTES:
        while len(_MEMO) >= _MEMO_MAX:
            _MEMO.pop(next(iter(_MEMO)))
        _MEMO[key] = images.copy()  # the caller's array is its own: writing to it cannot change the memo
    return images


def covid_ct_domain(root: str, split: str = "official", channels: int = 1, size: int | None = None,
                    *, image_size: int = 64) -> Domain:
    """COVID-CT chest CT slices (covid / non-covid), grouped by patient, with the official split or none."""
    if split not in SPLIT_CHOICES:
        raise UserError(f'{WHO}: unknown split "{split}"{did_you_mean(str(split), SPLIT_CHOICES)} ("official": '
                        f'the dataset\'s patient-disjoint train/val/test files; "none": the chain splits by patient)')
    if channels not in (1, 3):
        raise UserError(f"{WHO}: channels must be 1 or 3, got {channels}")
    side = image_size if size is None else size
    if not 8 <= side <= 4096:
        raise UserError(f"{WHO}: size must be from 8 to 4096 pixels, got {side}")
    base = Path(root).expanduser()
    try:
        is_folder, resolved = base.is_dir(), f" (resolved to {base.resolve()})"
    except (OSError, ValueError):  # a NUL byte, a name too long
        is_folder, resolved = False, ""
    if not is_folder:
        raise UserError(f"{WHO}: root {root!r} is not a folder{resolved}; point it at the COVID-CT folder holding "
                        f"Images/CT_COVID, Images/CT_NonCOVID, Info/ and split/")

    names: dict[str, list[str]] = {}
    folders: dict[str, Path] = {}
    other_files = 0
    for cls in CLASSES:
        folder = _first(base, _IMAGE_DIRS, _LAYOUT[cls][0])
        if folder is None or not folder.is_dir():
            raise UserError(f"{WHO}: no {' or '.join(d + '/' + _LAYOUT[cls][0] for d in _IMAGE_DIRS)} folder in "
                            f"{base}; unzip the dataset's {_LAYOUT[cls][0]}.zip there")
        names[cls], skipped = _list_images(folder)
        other_files += skipped
        if not names[cls]:
            raise UserError(f"{WHO}: {folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}); unzip the "
                            f"dataset's {_LAYOUT[cls][0]}.zip there")
        folders[cls] = folder

    patients: dict[str, dict[str, str]] = {}
    unused_rows = 0
    for cls in CLASSES:
        meta, csv_path = _read_metadata(base, cls)
        present = set(names[cls])
        lacking = [n for n in names[cls] if n not in meta]
        if lacking:
            raise UserError(f"{WHO}: {len(lacking)} image(s) in {folders[cls]} have no row in {csv_path} "
                            f"({few(lacking, 3)}), so their patient is unknown; add a row with the patient id "
                            f"for each, or remove the images")
        unused_rows += sum(1 for n in meta if n not in present)
        patients[cls] = meta

    splits: dict[str, dict[str, str]] = {}
    unlisted_lines = 0
    if split == "official":
        for cls in CLASSES:
            other = next(c for c in CLASSES if c != cls)
            splits[cls], missing = _read_split(base, cls, set(names[cls]), set(names[other]), other)
            unlisted_lines += missing
            unplaced = [n for n in names[cls] if n not in splits[cls]]
            if unplaced:
                raise UserError(f"{WHO}: {len(unplaced)} {cls} image(s) are in none of the official split files "
                                f"({few(unplaced, 3)}); add them to one, remove them, or set split = \"none\"")
            where: dict[str, set[str]] = {}
            for n in names[cls]:
                where.setdefault(patients[cls][n], set()).add(splits[cls][n])
            straddling = sorted(p for p, s in where.items() if len(s) > 1)
            if straddling:
                p = straddling[0]
                raise UserError(f"{WHO}: {len(straddling)} {cls} patient(s) have images in two official splits "
                                f"(e.g. {p!r} in {' and '.join(s for s in _SPLITS if s in where[p])}), which would "
                                f"leak between training and test; fix the split files, or set split = \"none\" "
                                f"to split by patient")

    paths, labels, ids, groups, split_of = [], [], [], [], []
    for c, cls in enumerate(CLASSES):
        for n in names[cls]:
            paths.append(folders[cls] / n)
            labels.append(c)
            ids.append(f"{_LAYOUT[cls][0]}/{n}")
            groups.append(f"{cls}:{patients[cls][n]}")
            split_of.append(splits[cls][n] if split == "official" else None)
    check_decoded_bytes(len(paths) * side * side * channels, f"{WHO}: ",
                        f"{len(paths)} images of {side}x{side}x{channels}")
    images = _decode(paths, side, channels)

    counts = ", ".join(f"{len(names[cls])} {cls} images of {len({patients[cls][n] for n in names[cls]})} patients"
                       for cls in reversed(CLASSES))
    text = f"COVID-CT {base}: {counts}"
    if split == "official":
        text += "; official split " + ", ".join(
            f"{s} {sum(1 for x in split_of if x == s)}" for s in _SPLITS)
    else:
        text += "; no predefined split (the chain splits by patient)"
    notes = [f"{k} {what}" for k, what in ((unused_rows, "metadata row(s) naming no image, skipped"),
                                          (unlisted_lines, "split-file line(s) naming no image, skipped"),
                                          (other_files, "non-image file(s) in the image folders, ignored")) if k]
    if notes:
        text += " (" + "; ".join(notes) + ")"
    return Domain(classes=CLASSES, images=images, labels=np.array(labels), ids=tuple(ids), groups=tuple(groups),
                  splits=tuple(split_of) if split == "official" else None, description=text)
