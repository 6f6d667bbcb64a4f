"""The ``csv-manifest`` domain: a CSV file listing images with their labels, patients and splits.

One row per image. Columns (names configurable, matched case-insensitively):

* ``path`` -- the image file, relative to the CSV file's folder (or to the ``root`` option), or absolute;
* ``label`` -- the class name;
* a patient or study id (optional; by default the first of ``patient_id``, ``patient``, ``study_id``,
  ``subject_id``, ``group`` that the header has): images sharing one stay in one split. Stored only as a
  salted hash (:mod:`mltl.data.privacy`);
* ``split`` (optional): ``train``, ``val`` or ``test`` (also ``training``, ``valid``, ``validation``,
  ``dev``, ``testing``) for every row -- a predefined split, used instead of a random one.

Other columns are ignored. :func:`read_manifest` is shared with the DICOM and NIfTI domains of
``mltl-ct``, whose rows point at DICOM files or NIfTI volumes instead of images.
"""

from __future__ import annotations

import csv as _csv
from pathlib import Path

import attrs
import numpy as np

from ..errors import UserError
from .domain import Domain
from .images import is_dicom_file, read_image
from .limits import few
from .privacy import pseudonym, resolve_salt

__all__ = ["ManifestRow", "Manifest", "read_manifest", "csv_manifest_domain", "GROUP_COLUMNS", "sort_labels"]

GROUP_COLUMNS = ("patient_id", "patient", "study_id", "subject_id", "group")
SPLIT_WORDS = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
               "dev": "val", "test": "test", "testing": "test"}


@attrs.frozen
class ManifestRow:
    line: int          # line number in the CSV file (the header is line 1)
    path: Path         # resolved file
    name: str          # the path as the CSV writes it (used as the image id)
    label: str
    group: str | None  # raw patient/study id: hash it before it goes anywhere
    split: str | None  # "train" / "val" / "test"


@attrs.frozen
class Manifest:
    csv: Path
    rows: tuple[ManifestRow, ...]
    classes: tuple[str, ...]
    group_column: str | None
    split_column: str | None


def sort_labels(labels) -> list[str]:
    """Label names in a natural order: numerically when every label is an integer, else alphabetically."""
    labels = sorted(set(labels))
    try:
        return sorted(labels, key=int)
    except ValueError:
        return labels


def _find_column(header: dict[str, str], wanted: str) -> str | None:
    return header.get(wanted.strip().lower())


def read_manifest(csv: str | Path, *, who: str = "csv-manifest", path_column: str = "path",
                  label_column: str = "label", group_column: str | None = None,
                  split_column: str | None = None, classes: list[str] | None = None, root: str | None = None,
                  delimiter: str = ",", check_files: bool = True) -> Manifest:
    """Parse and check a manifest; every problem names the CSV file and its line."""
    path = Path(csv).expanduser()
    if not path.is_file():
        raise UserError(f'{who}: manifest "{csv}" is not a file (resolved to {path.resolve()}); '
                        f"point the domain's csv option at a CSV file with columns {path_column},{label_column}")
    base = Path(root).expanduser() if root else path.parent
    if root and not base.is_dir():
        raise UserError(f'{who}: root "{root}" is not a folder (resolved to {base.resolve()})')
    if len(delimiter) != 1:
        raise UserError(f"{who}: delimiter must be one character, got {delimiter!r}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte {exc.start}); save the manifest as UTF-8 CSV") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read the manifest ({exc.strerror or exc})") from None
    reader = _csv.reader(text.splitlines(), delimiter=delimiter)
    try:
        header_row = next(reader)
    except StopIteration:
        raise UserError(f"{path}: the manifest is empty; it needs a header line with columns "
                        f"{path_column},{label_column}") from None
    except _csv.Error as exc:
        raise UserError(f"{path} line 1: {exc}") from None
    header = {h.strip().lower(): h for h in header_row}
    names = [h.strip() for h in header_row]

    def need(col: str, option: str) -> int:
        found = _find_column(header, col)
        if found is None:
            hint = "" if delimiter != "," or len(header_row) > 1 else \
                " (only one column: is the file separated by ';' or tabs? set delimiter)"
            raise UserError(f'{path}: no column "{few([col])}" in the header ({few(names, 8) or "empty"}); '
                            f"add it or set the domain's {option} option{hint}")
        return header_row.index(found)

    i_path, i_label = need(path_column, "path_column"), need(label_column, "label_column")
    if group_column is not None:
        i_group = need(group_column, "group_column")
    else:
        auto = next((header[c] for c in GROUP_COLUMNS if c in header), None)
        i_group = header_row.index(auto) if auto is not None else None
    if split_column is not None:
        i_split = need(split_column, "split_column")
    else:
        i_split = header_row.index(header["split"]) if "split" in header else None

    rows: list[ManifestRow] = []
    seen: dict[Path, int] = {}
    missing: list[tuple[int, str, Path]] = []
    try:
        for fields in reader:
            line = reader.line_num
            if not any(f.strip() for f in fields):
                continue

            def cell(i: int | None, col: str) -> str | None:
                if i is None:
                    return None
                value = fields[i].strip() if i < len(fields) else ""
                if not value:
                    raise UserError(f"{path} line {line}: empty {col}; every row needs one "
                                    f"(or remove the line)")
                return value

            name = cell(i_path, f'"{header_row[i_path].strip()}"')
            label = cell(i_label, f'"{header_row[i_label].strip()}"')
            group = cell(i_group, f'"{header_row[i_group].strip()}"') if i_group is not None else None
            split = None
            if i_split is not None:
                raw = cell(i_split, f'"{header_row[i_split].strip()}"')
                split = SPLIT_WORDS.get(raw.lower())
                if split is None:
                    raise UserError(f'{path} line {line}: unknown split "{few([raw])}"; use train, val or test')
            file = Path(name).expanduser()
            file = file if file.is_absolute() else base / file
            key = file.resolve()
            if key in seen:
                raise UserError(f"{path} line {line}: {few([name])} is listed again (first on line {seen[key]}); "
                                f"each file may appear once")
            seen[key] = line
            if check_files and not file.is_file():
                missing.append((line, name, file))
            rows.append(ManifestRow(line=line, path=file, name=Path(name).as_posix(), label=label, group=group,
                                    split=split))
    except _csv.Error as exc:
        raise UserError(f"{path} line {reader.line_num}: {exc}") from None
    if missing:
        line, name, file = missing[0]
        more = f" (and {len(missing) - 1} more missing files)" if len(missing) > 1 else ""
        raise UserError(f"{path} line {line}: file {name} not found (looked at {file.resolve()}){more}; "
                        f"paths are relative to {'root ' + str(base) if root else 'the CSV file'}")
    if not rows:
        raise UserError(f"{path}: the manifest has a header but no rows")
    present = sort_labels(r.label for r in rows)
    if classes:
        absent = [c for c in classes if c not in present]
        if absent:
            raise UserError(f'{path}: no row has label "{few([absent[0]])}" (given in classes); labels in the '
                            f"file: {few(present, 10)}")
        rows = [r for r in rows if r.label in classes]
        names_out = tuple(classes)
    else:
        names_out = tuple(present)
    first_line: dict[str, int] = {}
    for r in rows:
        first_line.setdefault(r.label, r.line)
    folded: dict[str, str] = {}
    for name in names_out:  # "Cyst" and "cyst" would become two classes
        other = folded.setdefault(name.casefold(), name)
        if other != name:
            raise UserError(f'{path}: labels "{few([other])}" (line {first_line.get(other, "?")}) and "{few([name])}" '
                            f"(line {first_line.get(name, '?')}) differ only in letter case; spell each class one "
                            f"way")
    if len(names_out) < 2:
        raise UserError(f"{path}: {len(names_out)} class(es) ({few(names_out)}); a classifier needs at least 2")
    return Manifest(csv=path, rows=tuple(rows), classes=names_out,
                    group_column=header_row[i_group].strip() if i_group is not None else None,
                    split_column=header_row[i_split].strip() if i_split is not None else None)


def hashed_groups(manifest: Manifest, salt: str | None) -> tuple[str, ...] | None:
    """Each row's patient/study id as a salted pseudonym (None when the manifest has no such column)."""
    if manifest.group_column is None:
        return None
    key = resolve_salt(salt)
    return tuple(pseudonym(r.group, key) for r in manifest.rows)


def csv_manifest_domain(csv: str, path_column: str = "path", label_column: str = "label",
                        group_column: str | None = None, split_column: str | None = None,
                        classes: list[str] | None = None, root: str | None = None, delimiter: str = ",",
                        channels: int = 1, salt: str | None = None, size: int | None = None,
                        *, image_size: int = 64) -> Domain:
    """Images listed in a CSV file: path, label, optional patient/study id and split columns."""
    if channels not in (1, 3):
        raise UserError(f"csv-manifest: channels must be 1 or 3, got {channels}")
    m = read_manifest(csv, path_column=path_column, label_column=label_column, group_column=group_column,
                      split_column=split_column, classes=classes, root=root, delimiter=delimiter)
    side = size or image_size
    index = {c: i for i, c in enumerate(m.classes)}
    images = []
    for r in m.rows:
        if r.path.suffix.lower() in (".dcm", ".dicom") or is_dicom_file(r.path):
            raise UserError(f'{m.csv} line {r.line}: {r.name} is a DICOM file; list DICOM files in a manifest '
                            f'for the "dicom" domain (plugin mltl-ct: domain = {{ plugin = "dicom", manifest = ... }})')
        if r.path.name.lower().endswith((".nii", ".nii.gz")):
            raise UserError(f'{m.csv} line {r.line}: {r.name} is a NIfTI volume; use the "nifti" domain '
                            f"(plugin mltl-ct) with manifest = ...")
        images.append(read_image(r.path, channels=channels, size=side, who=f"{m.csv} line {r.line}"))
    splits = tuple(r.split for r in m.rows) if m.split_column else None
    return Domain(classes=m.classes, images=np.stack(images), labels=[index[r.label] for r in m.rows],
                  ids=tuple(r.name for r in m.rows), groups=hashed_groups(m, salt), splits=splits,
                  description=f"CSV manifest {m.csv} ({len(m.rows)} images"
                              + (f", grouped by {m.group_column}" if m.group_column else "")
                              + (f", splits from {m.split_column}" if m.split_column else "") + ")")
