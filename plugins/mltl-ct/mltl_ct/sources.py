"""Where the labelled files of a DICOM or NIfTI domain come from: class sub-folders or a CSV manifest."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import attrs

from mltl import UserError, class_folders, read_manifest


def walk_files(folder: Path) -> list[Path]:
    """Every non-hidden file below ``folder``, sorted, following symbolic links to folders (once each)."""
    out, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a link loop
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        out += [Path(dirpath) / f for f in filenames if not f.startswith(".")]
    return sorted(p for p in out if p.is_file())


@attrs.frozen
class Entry:
    """One labelled item: a file or a folder (a DICOM series), with an optional raw patient id and split."""

    path: Path
    rel: str           # the path as the user wrote it / relative to the root, used in image ids
    label: str
    patient: str | None = None  # raw id from a manifest column: hash before storing
    split: str | None = None
    where: str = ""    # "<csv> line <n>: " for manifest rows, for error messages
    unit: str = ""     # the series folder below the class folder holding the file, else ``rel``


def labelled_entries(who: str, *, root: str | None, manifest: str | None, classes: list[str] | None,
                     accept: Callable[[Path], bool], path_column: str, label_column: str,
                     group_column: str | None, split_column: str | None,
                     delimiter: str) -> tuple[tuple[str, ...], list[Entry], str]:
    """(class names, entries, description). ``accept(path)`` says which files in a class folder count."""
    if (root is None) == (manifest is None):
        raise UserError(f"{who}: give exactly one of root (a folder with one sub-folder per class) or "
                        f"manifest (a CSV file with columns {path_column},{label_column})")
    if manifest is not None:
        m = read_manifest(manifest, who=who, path_column=path_column, label_column=label_column,
                          group_column=group_column, split_column=split_column, classes=classes,
                          delimiter=delimiter, check_files=False)
        entries = []
        for r in m.rows:
            if not r.path.exists():
                raise UserError(f"{m.csv} line {r.line}: {r.name} not found (looked at {r.path.resolve()}); "
                                f"paths are relative to the CSV file")
            entries.append(Entry(r.path, r.name, r.label, r.group, r.split, f"{m.csv} line {r.line}: ", r.name))
        return m.classes, entries, f"manifest {m.csv}"
    base, names = class_folders(who, root, classes, hint="point it at a folder holding one sub-folder per class, "
                                                         "or use manifest = a CSV file")
    entries = []
    for name in names:
        files = [p for p in walk_files(base / name) if accept(p)]
        if not files:
            raise UserError(f"{who}: class folder {base / name} holds no files of this kind")
        for f in files:
            rel = f.relative_to(base)
            unit = rel.parent.as_posix() if len(rel.parts) > 2 else rel.as_posix()
            entries.append(Entry(f, rel.as_posix(), name, unit=unit))
    return tuple(names), entries, f"folder {base}"
