"""Synthetic dermoscopy photographs in the HAM10000 layout, for the plugin's tests and for trying the config.

    python -m mltl_dermoscopy.synthetic OUT_DIR [--lesions-per-class 12] [--seed 0]

writes ``OUT_DIR/metadata.csv`` and ``OUT_DIR/images/*.jpg`` (4:3 photographs). Three classes with the
HAM10000 codes: ``nv`` (naevus: round, one even brown, sharp border), ``mel`` (melanoma: irregular border,
several colours including blue-grey, asymmetric), ``bkl`` (benign keratosis: light brown with bright
milia-like dots). Each lesion is photographed one to three times (rotated, rescaled), and every photograph
has its own illumination colour cast, which the domain's colour constancy removes. These are not medical
data: they only exercise the plugin's code paths.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("nv", "mel", "bkl")
WIDTH, HEIGHT = 96, 72


def _photograph(kind: str, rng: np.random.Generator, angle: float, scale: float) -> np.ndarray:
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float64)
    cx, cy = WIDTH / 2 + rng.normal(0, 2), HEIGHT / 2 + rng.normal(0, 2)
    dx, dy = xx - cx, yy - cy
    theta = np.arctan2(dy, dx) - angle
    r = np.hypot(dx, dy) / scale
    skin = np.array([225.0, 180.0, 160.0]) + rng.normal(0, 6, 3)
    img = np.broadcast_to(skin, (HEIGHT, WIDTH, 3)).copy()
    img += rng.normal(0, 4, (HEIGHT, WIDTH, 1))  # skin texture
    if kind == "nv":
        radius = 17 + rng.normal(0, 1.5)
        inside = r < radius
        img[inside] = np.array([120.0, 75.0, 50.0]) + rng.normal(0, 5, 3)
    elif kind == "mel":
        k = rng.integers(3, 7)
        radius = 19 + 5 * np.sin(k * theta + rng.uniform(0, 6)) + 3 * np.sin((k + 2) * theta)
        inside = r < radius
        zone = (np.sin(dx / 5 + rng.uniform(0, 6)) + np.cos(dy / 4)) * (1 + 0.3 * np.cos(theta))
        dark, blue, brown = np.array([45.0, 30.0, 30.0]), np.array([95.0, 100.0, 125.0]), np.array([110.0, 65.0, 40.0])
        colour = np.where((zone > 0.6)[..., None], dark, np.where((zone < -0.6)[..., None], blue, brown))
        img[inside] = colour[inside]
    else:  # bkl
        radius = 16 + rng.normal(0, 2)
        inside = np.hypot(dx / 1.3, dy) / scale < radius  # oval
        img[inside] = np.array([175.0, 130.0, 95.0]) + rng.normal(0, 5, 3)
        for _ in range(rng.integers(4, 9)):
            px, py = rng.uniform(-10, 10, 2) * scale
            img[(np.hypot(dx - px, dy - py) < 1.6) & inside] = 245.0
    img += rng.normal(0, 5, img.shape)
    cast = np.array([1.0, 1.0, 1.0]) + rng.normal(0, 0.12, 3)  # the clinic's illumination
    return np.clip(img * cast, 0, 255).astype(np.uint8)


def generate(out: str | Path, lesions_per_class: int = 12, seed: int = 0) -> Path:
    """Write the synthetic set to ``out``; returns ``out``."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    n = 0
    for kind in CLASSES:
        for lesion in range(lesions_per_class):
            lesion_id = f"HAM_{CLASSES.index(kind)}{lesion:06d}"
            for _ in range(int(rng.integers(1, 4))):
                image_id = f"ISIC_{n:07d}"
                n += 1
                pixels = _photograph(kind, rng, angle=rng.uniform(0, 2 * np.pi), scale=rng.uniform(0.85, 1.15))
                Image.fromarray(pixels).save(out / "images" / f"{image_id}.jpg", quality=95)
                rows.append({"lesion_id": lesion_id, "image_id": image_id, "dx": kind, "dx_type": "synthetic",
                             "age": str(int(rng.integers(20, 80))), "sex": str(rng.choice(["male", "female"])),
                             "localization": str(rng.choice(["back", "trunk", "lower extremity"]))})
    with open(out / "metadata.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mltl_dermoscopy.synthetic", description=__doc__.split("\n")[0])
    p.add_argument("out")
    p.add_argument("--lesions-per-class", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print(generate(args.out, args.lesions_per_class, args.seed))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
