"""The ``medmnist`` domain: MedMNIST v2 ``.npz`` files (Yang et al., Scientific Data 10:41, 2023).

The official layout: arrays ``train_images``, ``train_labels``, ``val_images``, ``val_labels``,
``test_images``, ``test_labels``; images uint8 ``(N, H, W)`` (grey) or ``(N, H, W, 3)`` (RGB); labels
``(N,)`` or ``(N, 1)``. The official split becomes the domain's predefined split (``Domain.splits``).

Where the file comes from: ``path`` (a file, used as it is -- no checksum, since copies of the data in the
wild are often re-saved), or ``flag`` (``breastmnist``, ``organamnist``, ...) looked up as
``<root>/<flag>.npz`` (``<flag>_<resolution>.npz`` for the 64/128/224 px editions), where ``root`` is the
option, else ``$MLTL_DATA_DIR``, else ``~/.mltl/data``; when it is not there, ``~/.medmnist/<same name>``
(where the official ``medmnist`` package downloads to) is used if present. When both are missing and
``download`` is true, the official file is fetched from Zenodo (record 10519652, MedMNIST v3.0 / MedMNIST+), its MD5
checked against the value the ``medmnist`` package publishes (``medmnist/info.py``, INFO[flag]["MD5"],
copied below as data), and only then renamed into place; a failed or mismatching download leaves nothing
behind. Offline (or with ``MLTL_OFFLINE=1``, or ``download = false``), the error says which file to put
where. ``max_per_class`` keeps the first N images of each class in each split (quick CPU runs).

Only the single-label 2D flags are offered; ChestMNIST (multi-label) and the 3D sets are not classification
data of the kind mltl trains.
"""

from __future__ import annotations

import hashlib
import math
import os
import socket
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path

import numpy as np

from ..errors import UserError, did_you_mean
from .domain import SPLITS, Domain
from .limits import check_bytes, few, human_bytes

__all__ = ["FLAGS", "medmnist_domain", "data_dir", "medmnist_package_dir", "load_npz", "fetch_file"]

ZENODO = "https://zenodo.org/records/10519652/files/{name}?download=1"
"""MedMNIST+ (v3.0) files, as in the ``medmnist`` package 3.0.2, ``medmnist/info.py``."""

# flag -> (class names in label order, channels, {resolution: MD5}); from the medmnist package's INFO
FLAGS: dict[str, tuple[tuple[str, ...], int, dict[int, str]]] = {
    "pathmnist": (("adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle",
                   "normal colon mucosa", "cancer-associated stroma", "colorectal adenocarcinoma epithelium"), 3,
                  {28: "a8b06965200029087d5bd730944a56c1", 64: "55aa9c1e0525abe5a6b9d8343a507616",
                   128: "ac42d08fb904d92c244187169d1fd1d9", 224: "2c51a510bcdc9cf8ddb2af93af1eadec"}),
    "dermamnist": (("actinic keratoses and intraepithelial carcinoma", "basal cell carcinoma",
                    "benign keratosis-like lesions", "dermatofibroma", "melanoma", "melanocytic nevi",
                    "vascular lesions"), 3,
                   {28: "0744692d530f8e62ec473284d019b0c7", 64: "b70a2f5635c6199aeaa28c31d7202e1f",
                    128: "2defd784463fa5243564e855ed717de1", 224: "8974907d8e169bef5f5b96bc506ae45d"}),
    "octmnist": (("choroidal neovascularization", "diabetic macular edema", "drusen", "normal"), 1,
                 {28: "c68d92d5b585d8d81f7112f81e2d0842", 64: "e229e9440236b774d9f0dfef9d07bdaf",
                  128: "0a97e76651ace45c5d943ee3f65b63ae", 224: "abc493b6d529d5de7569faaef2773ba3"}),
    "pneumoniamnist": (("normal", "pneumonia"), 1,
                       {28: "28209eda62fecd6e6a2d98b1501bb15f", 64: "8f4eceb4ccffa70c672198ea285246c6",
                        128: "05b46931834c231683c68f40c47b2971", 224: "d6a3c71de1b945ea11211b03746c1fe1"}),
    "retinamnist": (("0", "1", "2", "3", "4"), 3,
                    {28: "bd4c0672f1bba3e3a89f0e4e876791e4", 64: "afda852cc34dcda56f86ad2b2457dbcc",
                     128: "e48e916a24454daf90583d4e6efb1a18", 224: "eae7e3b6f3fcbda4ae613ebdcbe35348"}),
    "breastmnist": (("malignant", "normal, benign"), 1,
                    {28: "750601b1f35ba3300ea97c75c52ff8f6", 64: "742edef2a1fd1524b2efff4bd7ba9364",
                     128: "363e4b3f8d712e9b5de15470a2aaadf1", 224: "b56378a6eefa9fed602bb16d192d4c8b"}),
    "bloodmnist": (("basophil", "eosinophil", "erythroblast",
                    "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)", "lymphocyte",
                    "monocyte", "neutrophil", "platelet"), 3,
                   {28: "7053d0359d879ad8a5505303e11de1dc", 64: "2b94928a2ae4916078ca51e05b6b800b",
                    128: "adace1e0ed228fccda1f39692059dd4c", 224: "b718ff6835fcbdb22ba9eacccd7b2601"}),
    "tissuemnist": (("Collecting Duct, Connecting Tubule", "Distal Convoluted Tubule",
                     "Glomerular endothelial cells", "Interstitial endothelial cells", "Leukocytes", "Podocytes",
                     "Proximal Tubule Segments", "Thick Ascending Limb"), 1,
                    {28: "ebe78ee8b05294063de985d821c1c34b", 64: "123ece2eba09d0aa5d698fda57103344",
                     128: "61b955355d7425a89687b06cca3ce0c2", 224: "b077128c4a949f0a4eb01517f9037b9c"}),
    "organamnist": (("bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right", "liver",
                     "lung-left", "lung-right", "pancreas", "spleen"), 1,
                    {28: "68e3f8846a6bd62f0c9bf841c0d9eacc", 64: "2dcccc29b88e6da5a01161ef20cda288",
                     128: "eeae80d0a227a8d099027e1b3cfd3b60", 224: "50747347e05c87dd3aaf92c49f9f3170"}),
    "organcmnist": (("bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right", "liver",
                     "lung-left", "lung-right", "pancreas", "spleen"), 1,
                    {28: "b9ceb9546e10131b32923c5bbeaea2b1", 64: "3ce34a8724ea6f548e6db4744d03b6a9",
                     128: "773c1f009daa3fe5d9a2a201b2a7ed94", 224: "050f5e875dc056f6768abf94ec9995d1"}),
    "organsmnist": (("bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right", "liver",
                     "lung-left", "lung-right", "pancreas", "spleen"), 1,
                    {28: "9ab87b696fb54e2a387ebe992d6ed5f1", 64: "53a6d115339d874c25e309a994ff46d3",
                     128: "ded0c5fa01a95dc4978b956f613e9b8e", 224: "b354719e553fbbb2513d5533f52a4cb1"}),
}
NOT_OFFERED = {"chestmnist": "multi-label (14 findings per image)"} | {
    f: "a 3D set" for f in ("organmnist3d", "nodulemnist3d", "adrenalmnist3d", "fracturemnist3d",
                            "vesselmnist3d", "synapsemnist3d")}
DOWNLOAD_TIMEOUT_S = 30


def data_dir(root: str | None = None) -> Path:
    """Where MedMNIST files are looked for: ``root``, else ``$MLTL_DATA_DIR``, else ``~/.mltl/data``."""
    return Path(root or os.environ.get("MLTL_DATA_DIR") or Path.home() / ".mltl" / "data").expanduser()


def medmnist_package_dir() -> Path:
    """Where the official ``medmnist`` package keeps its files (its default ``root``): ``~/.medmnist``."""
    return Path.home() / ".medmnist"


def _file_name(flag: str, resolution: int) -> str:
    return f"{flag}.npz" if resolution == 28 else f"{flag}_{resolution}.npz"


def fetch_file(url: str, dest: Path, md5: str, *, who: str = "medmnist") -> None:
    """Fetch ``url`` into ``dest`` atomically: a temporary file in the same folder, checked, then renamed."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    digest = hashlib.md5(usedforsecurity=False)
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, open(tmp, "wb") as out:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        if digest.hexdigest() != md5:
            raise UserError(f"{who}: the download of {url} has MD5 {digest.hexdigest()}, expected {md5}; "
                            f"nothing was saved. Try again later, or download {dest.name} yourself and put it "
                            f"at {dest}")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _locate(flag: str, resolution: int, root: str | None, allow_download: bool) -> Path:
    key = flag.lower()
    if key in NOT_OFFERED:
        raise UserError(f'medmnist: flag "{flag}" is {NOT_OFFERED[key]}; mltl reads the single-label 2D sets: '
                        f"{', '.join(FLAGS)}")
    if key not in FLAGS:
        raise UserError(f'medmnist: unknown flag "{flag}"{did_you_mean(key, FLAGS)}')
    md5s = FLAGS[key][2]
    if resolution not in md5s:
        raise UserError(f"medmnist: resolution must be one of {', '.join(map(str, md5s))}, got {resolution}")
    name = _file_name(key, resolution)
    dest = data_dir(root) / name
    if dest.is_file():
        return dest
    official = medmnist_package_dir() / name
    if official.is_file():  # fetched by the medmnist package (its MD5 checked there): no second copy
        return official
    where = (f"put {name} (from https://zenodo.org/records/10519652 or `python -m medmnist download`) at {dest} "
             f"(or in {medmnist_package_dir()}, the medmnist package's folder)")
    if not allow_download:
        raise UserError(f"medmnist: {dest} not found and download = false; {where}")
    if os.environ.get("MLTL_OFFLINE", "").strip() not in ("", "0"):
        raise UserError(f"medmnist: {dest} not found (MLTL_OFFLINE is set, so no download); {where}")
    url = ZENODO.format(name=name)
    try:
        fetch_file(url, dest, md5s[resolution])
    except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UserError(f"medmnist: {dest} not found and it could not be downloaded ({reason}); "
                        f"{where}") from None
    except OSError as exc:
        raise UserError(f"medmnist: cannot save {dest} ({exc.strerror or exc}); {where}") from None
    return dest


def _npy_headers(path: Path, names: list[str], who: str) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of each named array of an ``.npz``, from its ``.npy`` header alone (nothing decoded).

    A header that claims more bytes than its zip member holds is a damaged (or crafted) file."""
    out = {}
    with zipfile.ZipFile(path) as zf:
        members = {info.filename: info for info in zf.infolist()}
        for name in names:
            info = members.get(name + ".npy") or members.get(name)
            if info is None:
                continue
            with zf.open(info) as f:
                version = np.lib.format.read_magic(f)
                reader = getattr(np.lib.format, f"read_array_header_{version[0]}_{version[1]}", None)
                if reader is not None:
                    shape, _, dtype = reader(f)
                else:
                    shape, _, dtype = np.lib.format._read_array_header(f, version)
            shape = tuple(int(d) for d in shape)
            nbytes = math.prod(shape) * dtype.itemsize
            if nbytes > info.file_size:
                raise UserError(f"{who}: {path}: {name} claims shape {few(shape, 4)} ({human_bytes(nbytes)}) but "
                                f"holds {human_bytes(info.file_size)}; the file is damaged, re-download or "
                                f"replace it")
            out[name] = (shape, dtype)
    return out


def _check_pixels(x: np.ndarray, name: str, path: Path, who: str) -> None:
    """Float images: no NaN or infinite pixels (the first bad image is named by its index)."""
    if not np.issubdtype(x.dtype, np.floating):
        return
    for start in range(0, len(x), 1024):
        bad = ~np.isfinite(x[start:start + 1024].reshape(min(1024, len(x) - start), -1)).all(axis=1)
        if bad.any():
            i = start + int(np.flatnonzero(bad)[0])
            kind = "NaN" if np.isnan(x[i]).any() else "infinite"
            raise UserError(f"{who}: {path}: {name}[{i}] has {kind} pixel values; every pixel must be a "
                            f"number (replace or drop that image)")


def load_npz(path: Path, *, who: str = "medmnist") -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """(images uint8 (N, H, W) or (N, 3, H, W), labels int64 (N,), split name per image), official split.

    The arrays' headers are read first and the file refused when they would decode to more than the memory
    limit (:mod:`mltl.data.limits`). Float images whose values all lie in [0, 1] are scaled to 0..255; NaN or
    infinite pixels are refused, naming the array and the image's index."""
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise UserError(f"{who}: cannot read {path} as a .npz file ({str(exc)[:120]}); re-download or replace "
                        f"it") from None
    images, labels, splits, floats = [], [], [], []
    with z:
        missing = [f"{s}_{k}" for s in SPLITS for k in ("images", "labels") if f"{s}_{k}" not in z.files]
        if missing:
            raise UserError(f"{who}: {path} lacks array {missing[0]} (it has {few(z.files) or 'none'}); "
                            f"a MedMNIST file has train_/val_/test_ images and labels")
        wanted = [f"{s}_{k}" for s in SPLITS for k in ("images", "labels")]
        try:
            headers = _npy_headers(path, wanted, who)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
            raise UserError(f"{who}: {path}: cannot read the array headers ({str(exc)[:120]}); the file is "
                            f"damaged") from None
        check_bytes(sum(math.prod(shape) * dtype.itemsize for shape, dtype in headers.values()), f"{who}: ",
                    f"{path} (arrays of {', '.join(f'{k} {few(v[0], 5)}' for k, v in headers.items())})")
        for s in SPLITS:
            try:
                x, y = z[f"{s}_images"], z[f"{s}_labels"]
            except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
                raise UserError(f"{who}: {path}: cannot read {s} arrays ({str(exc)[:120]}); the file is "
                                f"damaged") from None
            if x.ndim == 4 and x.shape[-1] == 1:
                x = x[..., 0]
            if not (x.ndim == 3 or (x.ndim == 4 and x.shape[-1] == 3)):
                raise UserError(f"{who}: {path}: {s}_images has shape {x.shape}; expected (N, H, W) grey "
                                f"or (N, H, W, 3) RGB (3D MedMNIST sets are not supported)")
            if y.ndim == 2 and y.shape[1] == 1:
                y = y[:, 0]
            if y.ndim != 1 or len(y) != len(x):
                raise UserError(f"{who}: {path}: {s}_labels has shape {y.shape} for {len(x)} images; "
                                f"expected ({len(x)},) or ({len(x)}, 1) (multi-label sets are not supported)")
            if x.dtype != np.uint8:
                if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
                    raise UserError(f"{who}: {path}: {s}_images are {x.dtype}; expected uint8")
                _check_pixels(x, f"{s}_images", path, who)
                if x.size and (x.min() < 0 or x.max() > 255):
                    raise UserError(f"{who}: {path}: {s}_images are {x.dtype} outside 0..255; expected uint8")
            if not np.issubdtype(y.dtype, np.integer):
                if not np.issubdtype(y.dtype, np.number) or np.any(y != np.round(y)):
                    raise UserError(f"{who}: {path}: {s}_labels are not integer class indices ({y.dtype})")
            floats.append(np.issubdtype(x.dtype, np.floating))
            images.append(x)
            labels.append(y.astype(np.int64))
            splits += [s] * len(x)
    # float images all within [0, 1] are intensities scaled to one (a cast would make every image black)
    unit = any(floats) and all(not f or not im.size or float(im.max()) <= 1.0 for f, im in zip(floats, images))
    for k, x in enumerate(images):
        if x.dtype != np.uint8:
            x = np.rint(x * 255.0).astype(np.uint8) if unit and floats[k] else x.astype(np.uint8)
        images[k] = x if x.ndim == 3 else x.transpose(0, 3, 1, 2)
    shapes = {im.shape[1:] for im in images}
    if len(shapes) != 1:
        raise UserError(f"{who}: {path}: the splits' images differ in shape ({few(sorted(shapes), 3)})")
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels), tuple(splits)


def medmnist_domain(flag: str | None = None, path: str | None = None, root: str | None = None,
                    resolution: int = 28, classes: list[str] | None = None, download: bool = True,
                    max_per_class: int | None = None) -> Domain:
    """A MedMNIST v2 ``.npz`` file with its official train/val/test split."""
    if max_per_class is not None and max_per_class < 1:
        raise UserError(f"medmnist: max_per_class must be at least 1, got {max_per_class}")
    if (flag is None) == (path is None):
        raise UserError('medmnist: give exactly one of flag (e.g. "breastmnist", looked up in the data folder '
                        'and downloaded when missing) or path (an .npz file)')
    if path is not None:
        file = Path(path).expanduser()
        if not file.is_file():
            raise UserError(f'medmnist: path "{path}" is not a file (resolved to {file.resolve()})')
        known = FLAGS.get(file.name.split(".")[0].split("_")[0].lower())
    else:
        file = _locate(flag, resolution, root, download)
        known = FLAGS[flag.lower()]
    images, labels, splits = load_npz(file)
    n_classes = int(labels.max()) + 1 if len(labels) else 0
    if len(labels) and labels.min() < 0:
        raise UserError(f"medmnist: {file}: negative labels; expected class indices 0..K-1")
    present = np.unique(labels)
    if len(present) < n_classes:  # e.g. one label 30000000: no class names, counts or lists of that size
        absent, expect = [], 0
        for v in present.tolist():  # the first few missing indices, without an array of n_classes entries
            absent += list(range(expect, min(v, expect + 5 - len(absent))))
            expect = v + 1
            if len(absent) >= 5:
                break
        raise UserError(f"medmnist: {file}: labels run up to {n_classes - 1} but only {len(present)} of those "
                        f"{n_classes} class indices have images (no image has label {few(absent)}"
                        f"{' ...' if n_classes - len(present) > len(absent) else ''}); labels must be class "
                        f"indices 0..K-1 with every class present")
    if classes is not None:
        if len(classes) != n_classes or len(set(classes)) != len(classes):
            raise UserError(f"medmnist: classes lists {len(classes)} distinct names but {file} has labels "
                            f"0..{n_classes - 1}; give one name per label, in label order")
        names = tuple(classes)
    elif known is not None and len(known[0]) >= n_classes:
        names = known[0]
    else:
        names = tuple(str(k) for k in range(n_classes))
    if len(names) < 2:
        raise UserError(f"medmnist: {file} has a single class; a classifier needs at least 2")
    counters = {s: 0 for s in SPLITS}
    ids = []
    for s in splits:
        ids.append(f"{file.stem}/{s}/{counters[s]}")
        counters[s] += 1
    if max_per_class is not None:  # the first images of each class in each split, in file order
        keep = np.zeros(len(labels), dtype=bool)
        split_arr = np.asarray(splits)
        for s in SPLITS:
            for c in range(n_classes):
                keep[np.flatnonzero((split_arr == s) & (labels == c))[:max_per_class]] = True
        images, labels = images[keep], labels[keep]
        ids = [i for i, k in zip(ids, keep) if k]
        splits = tuple(s for s, k in zip(splits, keep) if k)
        counters = {s: splits.count(s) for s in SPLITS}
    return Domain(classes=names, images=images, labels=labels, ids=tuple(ids), splits=splits,
                  description=f"MedMNIST {file.name}: " + ", ".join(f"{s} {counters[s]}" for s in SPLITS))
