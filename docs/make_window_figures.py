"""Make the windowed CT figures in docs/images/ from the real public data in ../shared/data.

    python docs/make_window_figures.py            # writes docs/images/window_*.png

Each figure is one slice read exactly as the ``dicom`` / ``nifti`` domains read it (HU from pydicom's
modality LUT or nibabel's header scaling, the same windows, the same orientation), shown in several
windows side by side, and as the 3-channel abdomen/liver/bone stack (red/green/blue). 160 px per panel.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from mltl_ct.dicom import read_dicom_hu
from mltl_ct.nifti import read_nifti_hu
from mltl_ct.windows import apply_windows, parse_windows, resize_hu

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
OUT = ROOT / "docs" / "images"
PANEL = 160
WINDOWS = ["abdomen", "liver", "soft-tissue", "bone", "lung"]


def strip(hu: np.ndarray, title: str) -> Image.Image:
    hu = resize_hu(hu, PANEL)
    panels = [(w, apply_windows(hu, parse_windows(w))) for w in WINDOWS]
    rgb = apply_windows(hu, parse_windows(["abdomen", "liver", "bone"])).transpose(1, 2, 0)
    tiles = [Image.fromarray(a).convert("RGB") for _, a in panels] + [Image.fromarray(np.ascontiguousarray(rgb))]
    labels = [f"{w} {parse_windows(w)[0].level:g}/{parse_windows(w)[0].width:g}" for w, _ in panels]
    labels.append("abdomen|liver|bone as RGB")
    sheet = Image.new("RGB", (PANEL * len(tiles), PANEL + 36), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 2), title, fill="black")
    for i, (tile, label) in enumerate(zip(tiles, labels)):
        sheet.paste(tile, (i * PANEL, 36))
        draw.text((i * PANEL + 4, 20), label, fill="black")
    return sheet


def main() -> int:
    if not DATA.is_dir():
        print(f"needs the public test data at {DATA}", file=sys.stderr)
        return 1
    OUT.mkdir(parents=True, exist_ok=True)
    series = sorted(p for p in (DATA / "dicom" / "ct_abdomen_series").iterdir() if p.is_file())
    middle = series[len(series) // 2]
    nifti = read_nifti_hu(DATA / "nifti" / "ct_abdomen.nii.gz", axis="axial")
    coronal = read_nifti_hu(DATA / "nifti" / "ct_abdomen.nii.gz", axis="coronal")
    figures = {
        "window_dicom_ct_small.png": (read_dicom_hu(DATA / "dicom" / "CT_small.dcm")[0],
                                      "dicom/CT_small.dcm (128 px, uncompressed)"),
        "window_dicom_series.png": (read_dicom_hu(middle)[0],
                                    f"dicom/ct_abdomen_series, slice {series.index(middle) + 1} of {len(series)} "
                                    f"(JPEG 2000, decoded by Pillow)"),
        "window_nifti_axial.png": (nifti[int(len(nifti) * 0.45)],
                                   f"nifti/ct_abdomen.nii.gz, axial slice {int(len(nifti) * 0.45)} of {len(nifti)}"),
        "window_nifti_coronal.png": (coronal[len(coronal) // 2],
                                     f"nifti/ct_abdomen.nii.gz, coronal slice {len(coronal) // 2} of {len(coronal)}"),
    }
    for name, (hu, title) in figures.items():
        strip(hu, title).save(OUT / name, optimize=True)
        print(f"{OUT / name}: HU {hu.min():.0f}..{hu.max():.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
