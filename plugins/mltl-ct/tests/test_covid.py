"""The covid-ct domain: the real COVID-CT copy in shared data, and a small fake folder for the error paths."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from mltl import UserError, get_registry, make_splits
from mltl_ct.covid import covid_ct_domain


def _domain(options: dict, size: int = 32):
    return get_registry().create("domain", "covid-ct", options, key="stages[0].domain", extra={"image_size": size})


# ----------------------------------------------------------------------------------------------- real data


@pytest.mark.slow
def test_real_covid_ct_counts_official_split_and_patients(shared_data):
    root = shared_data / "covid_ct"
    d = _domain({"root": str(root)})
    assert d.classes == ("non-covid", "covid")
    assert d.images.shape == (746, 32, 32) and d.images.dtype == np.uint8
    assert d.class_counts() == {"non-covid": 397, "covid": 349}
    assert d.groups is not None and d.splits is not None
    labels = np.asarray(d.labels)
    groups = np.asarray(d.groups)
    splits = np.asarray(d.splits)
    # the official split, as the split files give it
    for cls, sizes in (("covid", {"train": 191, "val": 60, "test": 98}),
                       ("non-covid", {"train": 234, "val": 58, "test": 105})):
        k = d.classes.index(cls)
        assert {s: int(((splits == s) & (labels == k)).sum()) for s in sizes} == sizes
        assert len(set(groups[labels == k])) == {"covid": 213, "non-covid": 171}[cls]
    # patient-disjoint: no patient in two splits, and every group within one class
    for g in set(groups):
        assert len(set(splits[groups == g])) == 1, g
        assert len(set(labels[groups == g])) == 1, g
    assert "covid:Patient 2" in set(groups) and (groups == "covid:Patient 2").sum() == 16
    assert "CT_NonCOVID/1%0.jpg" in d.ids
    assert "official split train 425, val 118, test 203" in d.description
    assert "213 patients" in d.description and "171 patients" in d.description
    # an RGBA figure decodes like the others (composited, not an error), and the pixels are not blank
    assert d.images.reshape(len(d), -1).std(axis=1).min() > 0

    # no predefined split: the chain's patient-grouped split keeps every patient whole
    free = _domain({"root": str(root), "split": "none", "channels": 3})
    assert free.splits is None and free.images.shape == (746, 3, 32, 32)
    assert free.groups == d.groups
    dealt = make_splits(free, val=0.15, test=0.25, seed=1)
    where = {}
    for s, idx in dealt.items():
        for i in idx:
            assert where.setdefault(free.groups[i], s) == s


# ----------------------------------------------------------------------------------------------- fake folder


def _png(path: Path, value: int, mode: str = "L", size: int = 40) -> None:
    from PIL import Image

    if mode == "RGBA":
        arr = np.zeros((size, size, 4), dtype=np.uint8)
        arr[..., :3] = 255  # white colour under ...
        arr[: size // 2, :, 3] = 255  # ... an opaque top half and a fully transparent bottom half
        Image.fromarray(arr, "RGBA").save(path)
    else:
        Image.fromarray(np.full((size, size), value, dtype=np.uint8), "L").save(path)


def _fake(root: Path) -> Path:
    """COVID-CT's layout with three images a class, names with %, a comma and a space, one RGBA PNG."""
    covid, non = root / "Images" / "CT_COVID", root / "Images" / "CT_NonCOVID"
    covid.mkdir(parents=True)
    non.mkdir(parents=True)
    _png(covid / "p1%0.png", 0, "RGBA")
    _png(covid / "p1%1.png", 100)
    _png(covid / "fig 2, b.png", 150)
    _png(non / "0.jpg", 50)
    _png(non / "1%0.png", 60)
    _png(non / "1%1.png", 70)
    (covid / ".DS_Store").write_bytes(b"x")
    (root / "Info").mkdir()
    with open(root / "Info" / "COVID-CT-MetaInfo.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["File name", "Patient ID", "Age", "Captions"])
        w.writerow(["p1%0.png", "Patient 1", "41", "Figure 1, a"])
        w.writerow(["p1%1.png", "Patient 1", "41", ""])
        w.writerow(["fig 2, b.png", "Patient 2", "", "b"])
    with open(root / "Info" / "NonCOVID-CT-MetaInfo.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["", "image name", "patient id"])
        w.writerow(["0", "0.jpg", "crawled_patient_0"])
        w.writerow(["1", "1%0.png", "crawled_patient_1"])
        w.writerow(["2", "1%1.png", "crawled_patient_1"])
    _write_split(root, "COVID", {"train": ["p1%0.png", "p1%1.png"], "val": [], "test": ["fig 2, b.png"]})
    _write_split(root, "NonCOVID", {"train": ["1%0.png", "1%1.png"], "val": [], "test": ["0.jpg"]})
    return root


def _write_split(root: Path, tag: str, lists: dict[str, list[str]]) -> None:
    folder = root / "split" / tag
    folder.mkdir(parents=True, exist_ok=True)
    for s, names in lists.items():
        (folder / f"{s}CT_{tag}.txt").write_text("".join(n + "\n" for n in names), encoding="utf-8")


def test_fake_folder_is_read_grouped_and_split(tmp_path):
    root = _fake(tmp_path / "covid")
    d = _domain({"root": str(root)}, size=40)
    assert d.ids == ("CT_NonCOVID/0.jpg", "CT_NonCOVID/1%0.png", "CT_NonCOVID/1%1.png",
                     "CT_COVID/fig 2, b.png", "CT_COVID/p1%0.png", "CT_COVID/p1%1.png")
    assert d.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert d.groups == ("non-covid:crawled_patient_0", "non-covid:crawled_patient_1", "non-covid:crawled_patient_1",
                        "covid:Patient 2", "covid:Patient 1", "covid:Patient 1")
    assert d.splits == ("test", "train", "train", "test", "train", "train")
    rgba = d.images[d.ids.index("CT_COVID/p1%0.png")]
    assert rgba[:18].min() == 255 and rgba[22:].max() == 0  # transparent half composited onto black
    assert d.images[d.ids.index("CT_COVID/p1%1.png")].tolist() == np.full((40, 40), 100).tolist()
    assert "3 covid images of 2 patients, 3 non-covid images of 2 patients" in d.description
    assert "official split train 4, val 0, test 2" in d.description
    assert "ignored" not in d.description  # the hidden .DS_Store is not counted

    # the upstream layout (Images-processed/, Data-split/) and leftovers that are counted, not fatal
    (root / "Images").rename(root / "Images-processed")
    (root / "split").rename(root / "Data-split")
    with open(root / "Info" / "NonCOVID-CT-MetaInfo.csv", "a", newline="", encoding="utf-8") as f:
        csv.writer(f).writerow(["3", "gone.png", "crawled_patient_9"])
    with open(root / "Data-split" / "COVID" / "valCT_COVID.txt", "a", encoding="utf-8") as f:
        f.write("removed.png\n\n")
    (root / "Images-processed" / "CT_COVID" / "notes.txt").write_text("x")
    d2 = covid_ct_domain(str(root), channels=3, size=16)
    assert d2.images.shape == (6, 3, 16, 16) and d2.splits == d.splits
    assert ("1 metadata row(s) naming no image, skipped; 1 split-file line(s) naming no image, skipped; "
            "1 non-image file(s) in the image folders, ignored") in d2.description

    free = covid_ct_domain(str(root), split="none")
    assert free.splits is None and free.groups == d.groups
    assert "no predefined split" in free.description


def _drop_row(root: Path, name: str) -> None:
    path = root / "Info" / "COVID-CT-MetaInfo.csv"
    with open(path, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.reader(f) if r[0] != name]
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)


def _append_covid_row(root: Path, row: list[str]) -> None:
    with open(root / "Info" / "COVID-CT-MetaInfo.csv", "a", newline="", encoding="utf-8") as f:
        csv.writer(f).writerow(row)


@pytest.mark.parametrize("case, message", [
    ("no metadata row", r"1 image\(s\) in .*CT_COVID have no row in .*COVID-CT-MetaInfo.csv \(fig 2, b.png\)"),
    ("two patients", r"COVID-CT-MetaInfo.csv lines 3 and 5: image p1%1.png is given two patients"),
    ("empty patient", r"COVID-CT-MetaInfo.csv line 5: image new.png has no patient id"),
    ("no columns", r"COVID-CT-MetaInfo.csv: expected columns 'file name' and 'patient id'"),
    ("no csv", r"no NonCOVID-CT-MetaInfo.csv in .* \(looked in Info, ., Data-split\)"),
    ("other class", r"testCT_COVID.txt line 2: 0.jpg is a non-covid image, listed in a covid split file"),
    ("in two splits", r"testCT_NonCOVID.txt line 1: 0.jpg is also in the val split file"),
    ("in no split", r"1 covid image\(s\) are in none of the official split files \(fig 2, b.png\)"),
    ("patient in two splits", r"1 covid patient\(s\) have images in two official splits \(e.g. 'Patient 1' in train"),
    ("no split folder", r'split = "official" but .* has no split/ or Data-split/COVID folder'),
    ("missing split file", r'split = "official" but .*valCT_NonCOVID.txt is missing'),
    ("bad split option", r'unknown split "oficial", did you mean "official"\?'),
    ("no image folder", r"no Images/CT_NonCOVID or Images-processed/CT_NonCOVID folder"),
    ("not a folder", r"root '.*nowhere' is not a folder \(resolved to "),
    ("NUL in root", r"root 'a\\x00b' is not a folder; point it at"),
    ("size too small", r"size must be from 8 to 4096 pixels, got 0"),
])
def test_fake_folder_mismatches_are_named(tmp_path, case, message):
    root = _fake(tmp_path / "covid")
    options = {"root": str(root)}
    if case == "no metadata row":
        _drop_row(root, "fig 2, b.png")
    elif case == "two patients":
        _append_covid_row(root, ["p1%1.png", "Patient 7"])
    elif case == "empty patient":
        _append_covid_row(root, ["new.png", " "])
    elif case == "no columns":
        (root / "Info" / "COVID-CT-MetaInfo.csv").write_text("name,patient\np1%0.png,Patient 1\n")
    elif case == "no csv":
        (root / "Info" / "NonCOVID-CT-MetaInfo.csv").unlink()
    elif case == "other class":
        _write_split(root, "COVID", {"test": ["fig 2, b.png", "0.jpg"]})
    elif case == "in two splits":
        _write_split(root, "NonCOVID", {"val": ["0.jpg"]})
    elif case == "in no split":
        _write_split(root, "COVID", {"test": []})
    elif case == "patient in two splits":
        _write_split(root, "COVID", {"train": ["p1%0.png"], "test": ["fig 2, b.png", "p1%1.png"]})
    elif case == "no split folder":
        for f in (root / "split" / "COVID").iterdir():
            f.unlink()
        (root / "split" / "COVID").rmdir()
    elif case == "missing split file":
        (root / "split" / "NonCOVID" / "valCT_NonCOVID.txt").unlink()
    elif case == "bad split option":
        options["split"] = "oficial"
    elif case == "no image folder":
        for f in (root / "Images" / "CT_NonCOVID").iterdir():
            f.unlink()
        (root / "Images" / "CT_NonCOVID").rmdir()
    elif case == "not a folder":
        options["root"] = str(tmp_path / "nowhere")
    elif case == "NUL in root":
        options["root"] = "a\x00b"
    elif case == "size too small":
        options["size"] = 0
    with pytest.raises(UserError, match=message) as err:
        _domain(options)
    assert "\n" not in str(err.value)
    if case in ("in no split", "patient in two splits", "no split folder", "missing split file"):
        assert 'split = "none"' in str(err.value)
        assert covid_ct_domain(options["root"], split="none").splits is None  # the way out works
