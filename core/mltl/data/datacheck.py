"""The data audit (``mltl data check``) and the leakage check ``mltl run`` makes before training.

What is checked (docs/data-check.md has the user's view):

* **class counts** per split, for the splits a run would make;
* **unreadable files** (folder check: every bad file is listed with the reason, the scan goes on);
* **tiny classes**: empty, or fewer than 2 images;
* **sizes and modes**: a histogram of (width x height, Pillow mode); sizes or modes held by few images
  while one size or mode dominates are flagged as outliers;
* **exact duplicates**: equal file bytes (BLAKE2b), and equal decoded pixels (the same picture saved twice,
  or in two formats);
* **near duplicates**: two images whose 64-bit DCT perceptual hashes differ in at most
  :data:`MAX_HAMMING` bits *and* whose fine detail correlates at least :data:`MIN_DETAIL_CORRELATION`.
  Duplicates are joined into groups (connected components), which approximate one patient's series when
  the data has no patient ids.

**Leakage** is a duplicate group that straddles two splits of one stage (an image in training, its twin
in test), or one whose images an earlier stage trained or selected on (train/val; every image under
k-fold) and a later stage evaluates (val/test; every image under k-fold). Leakage, corrupt files, a class
with fewer than 2 images and an exact duplicate filed under two classes are *problems* (``mltl data
check`` exits 3); the rest are warnings.

The near-duplicate rule, and why (measured on ``../shared/data/ct_kidney``, 1,914 real CT slices without
patient ids, and on the CT phantom the demos generate):

1. **Candidates: perceptual hash.** The image is turned grey (BT.601 luma), resized to 64 x 64
   (antialiased bilinear), averaged to 32 x 32; the 8 x 8 lowest frequencies of its 2-D DCT-II give 64 bits
   (coefficient above the median of the 63 non-DC ones). Hamming distances of all pairs are computed with
   XOR and popcount on packed ``uint64`` (1,914 images: 3.7 M pairs in well under a second). On ct_kidney
   no pair of images from two different classes (surely two different scans) is within 2 bits, 1 of
   1.37 M such pairs is within 4 and 424 within 8, while same-class pairs within 8 bits number 31,668.
   So the hash alone is not enough: it sees only the coarse layout, and CT slices at the same level of two
   patients share it (the phantom's slices, all one synthetic anatomy, do even more: hundreds of pairs of
   different phantom images are within 4 bits).
2. **Confirmation: fine detail.** A candidate pair is a near duplicate when the Pearson correlation of its
   high-pass images (the 64 x 64 grey image minus its Gaussian blur, sigma 1.5 px) is at least
   :data:`MIN_DETAIL_CORRELATION` (0.8). On ct_kidney the largest value for a candidate pair from two
   different classes is 0.27; between different phantom images (at input sizes 28 to 224) it is 0.66; near-
   identical neighbouring slices are at 0.9 to 1.0. With 0.8, ct_kidney's 1,914 images fall into 48
   near-duplicate groups holding 1,912 of them (the largest 182 images), none mixing two classes; the demo
   chains (``examples/rare_liver.toml``, ``rare_kidney.toml``) have none.

Not detected: mirrored or rotated copies, crops, and heavy re-windowing (a different HU window changes the
detail); they are rarer in practice than neighbouring slices and re-saved copies.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter, defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from ..errors import UserError
from ..running.plan import domain_key, partition, plan_stage
from .domain import SPLITS, Domain, make_splits

MAX_HAMMING = 8
"""Candidate near duplicates: perceptual hashes at most this many bits apart (of 64)."""

MIN_DETAIL_CORRELATION = 0.8
"""Confirmed near duplicates: correlation of the high-pass 64 x 64 images at least this."""

THUMB = 64
DETAIL_SIGMA = 1.5
ODD_SHARE = 0.05  # a size or mode held by fewer than this share of images is odd ...
DOMINANT_SHARE = 0.5  # ... when the most common one holds at least this share

__all__ = ["check_folder", "check_config", "audit_leakage", "near_duplicate_groups", "perceptual_hashes",
           "render", "MAX_HAMMING", "MIN_DETAIL_CORRELATION"]


# ---------------------------------------------------------------- features


def thumbnails(images: np.ndarray) -> np.ndarray:
    """uint8 ``(N, 64, 64)`` grey thumbnails of a domain's images ``(N, H, W)`` or ``(N, C, H, W)``."""
    import torch
    import torch.nn.functional as F

    out = np.empty((len(images), THUMB, THUMB), dtype=np.uint8)
    for s in range(0, len(images), 512):
        x = torch.from_numpy(np.ascontiguousarray(images[s:s + 512])).float()
        if x.ndim == 4:
            x = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1) if x.shape[1] == 3 else x[:, 0]
        if x.shape[-2:] != (THUMB, THUMB):
            x = F.interpolate(x[:, None], size=(THUMB, THUMB), mode="bilinear", antialias=True,
                              align_corners=False)[:, 0]
        out[s:s + 512] = x.round().clamp(0, 255).to(torch.uint8).numpy()
    return out


def perceptual_hashes(thumbs: np.ndarray) -> np.ndarray:
    """64-bit DCT perceptual hash of each 64 x 64 thumbnail, packed as ``uint64``."""
    import scipy.fft

    x = thumbs.astype(np.float32).reshape(len(thumbs), 32, 2, 32, 2).mean(axis=(2, 4))
    d = scipy.fft.dctn(x, axes=(1, 2), norm="ortho")[:, :8, :8].reshape(len(x), 64)
    bits = d > np.median(d[:, 1:], axis=1, keepdims=True)
    return np.packbits(bits, axis=1).view(">u8").ravel().astype(np.uint64)


def _detail(thumbs: np.ndarray) -> np.ndarray:
    """Unit-norm, zero-mean high-pass vectors (float32) of thumbnails."""
    import scipy.ndimage

    x = thumbs.astype(np.float32)
    x = x - scipy.ndimage.gaussian_filter(x, sigma=(0, DETAIL_SIGMA, DETAIL_SIGMA))
    x = x.reshape(len(x), -1)
    x -= x.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 1e-6)


_BYTE_BITS = np.array([bin(v).count("1") for v in range(256)], dtype=np.uint8)


def popcount64(x: np.ndarray) -> np.ndarray:
    """The number of set bits of each ``uint64`` (``uint8``, same shape): ``np.bitwise_count`` on NumPy 2,
    a byte lookup table on NumPy 1.x (which lacks it). Both give identical results."""
    x = np.asarray(x, dtype=np.uint64)
    fast = getattr(np, "bitwise_count", None)
    if fast is not None:
        return fast(x)
    octets = np.ascontiguousarray(x).reshape(-1).view(np.uint8)  # 8 bytes per value, whatever the byte order
    return _BYTE_BITS[octets].reshape(x.shape + (8,)).sum(axis=-1, dtype=np.uint8)


def near_duplicate_pairs(thumbs: np.ndarray, hashes: np.ndarray | None = None) -> np.ndarray:
    """``(K, 2)`` index pairs ``i < j`` of near duplicates among the thumbnails (see the module docstring)."""
    n = len(thumbs)
    if n < 2:
        return np.empty((0, 2), dtype=np.int64)
    hashes = perceptual_hashes(thumbs) if hashes is None else hashes
    block = max(1, min(n, (1 << 24) // n))  # about 16 M pairs (128 MB of XORs) at a time
    cand_i, cand_j = [], []
    for s in range(0, n, block):
        d = popcount64(hashes[s:s + block, None] ^ hashes[None, s:])
        i, j = np.nonzero(d <= MAX_HAMMING)
        i, j = i + s, j + s
        keep = j > i
        cand_i.append(i[keep])
        cand_j.append(j[keep])
    ci, cj = np.concatenate(cand_i), np.concatenate(cand_j)
    if not len(ci):
        return np.empty((0, 2), dtype=np.int64)
    involved = np.unique(np.concatenate([ci, cj]))
    where = np.full(n, -1, dtype=np.int64)
    where[involved] = np.arange(len(involved))
    detail = _detail(thumbs[involved])
    corr = np.empty(len(ci), dtype=np.float32)
    for s in range(0, len(ci), 4096):
        a, b = detail[where[ci[s:s + 4096]]], detail[where[cj[s:s + 4096]]]
        corr[s:s + 4096] = np.einsum("ij,ij->i", a, b)
    keep = corr >= MIN_DETAIL_CORRELATION
    return np.stack([ci[keep], cj[keep]], axis=1).astype(np.int64)


def _components(n: int, pairs: np.ndarray) -> np.ndarray:
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if not len(pairs):
        return np.arange(n)
    graph = coo_matrix((np.ones(len(pairs), dtype=np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def _pixel_hash(arr: np.ndarray) -> str:
    h = hashlib.blake2b(repr((arr.shape, str(arr.dtype))).encode(), digest_size=16)
    h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def near_duplicate_groups(domain: Domain) -> tuple[str, ...]:
    """One group name per image: images joined by exact or near duplicates share one (``dup-<k>``), and
    existing ``Domain.groups`` (patients) are merged in, so neither kind of group is ever split."""
    thumbs = thumbnails(domain.images)
    pairs = [near_duplicate_pairs(thumbs)]
    by_pixels: dict[str, int] = {}
    for i, img in enumerate(domain.images):
        first = by_pixels.setdefault(_pixel_hash(img), i)
        if first != i:
            pairs.append(np.array([[first, i]]))
    if domain.groups is not None:
        first_of: dict[str, int] = {}
        for i, g in enumerate(domain.groups):
            first = first_of.setdefault(g, i)
            if first != i:
                pairs.append(np.array([[first, i]]))
    labels = _components(len(domain), np.concatenate(pairs).reshape(-1, 2))
    return tuple(f"dup-{k}" for k in labels)


# ---------------------------------------------------------------- the units audited


@attrs.define
class _Unit:
    """One domain as one stage uses it: images, features, and the split partition a run would make."""

    stage: str  # stage name ("" for a folder)
    index: int  # stage index (0 for a folder)
    key: str  # "stages[2]" or the folder
    classes: tuple[str, ...]
    labels: np.ndarray
    ids: tuple[str, ...]
    thumbs: np.ndarray
    pixel_hashes: list[str]
    byte_hashes: list[str] | None = None
    partition: np.ndarray | None = None  # per image: "train"/"val"/"test" or "fold-k"
    protocol: str = "holdout"
    split_error: str | None = None
    allow_leakage: bool = False

    def seen(self) -> np.ndarray:  # trained or selected on: the weights handed on depend on them
        if self.partition is None:
            return np.ones(len(self.ids), dtype=bool)
        return self.partition != "test"

    def evaluated(self) -> np.ndarray:
        if self.partition is None:
            return np.ones(len(self.ids), dtype=bool)
        return self.partition != "train"


def stage_partition(config: Any, index: int, cfg: Any, domain: Domain) -> tuple[np.ndarray, str]:
    """The split a run makes for stage ``index`` (variant ``cfg``) on ``domain`` (:func:`mltl.running.plan.partition`),
    and the stage's protocol."""
    plan = plan_stage(config, index, domain, cfg)
    return partition(plan, domain, cfg), plan.protocol


def _domain_unit(domain: Domain, *, stage: str, index: int, key: str) -> _Unit:
    return _Unit(stage=stage, index=index, key=key, classes=tuple(domain.classes), labels=domain.labels,
                 ids=tuple(domain.ids), thumbs=thumbnails(domain.images),
                 pixel_hashes=[_pixel_hash(img) for img in domain.images])


def apply_duplicate_groups(config: Any, domains: dict[str, Domain]) -> dict[str, Domain]:
    """Domains of stages with ``split.group_near_duplicates``: Domain.groups merged with duplicate groups."""
    out = dict(domains)
    done: set[str] = set()
    for stage in config.stages:
        for _, cfg in stage.variants:
            k = domain_key(cfg)
            if getattr(cfg.split, "group_near_duplicates", False) and k not in done and k in out:
                out[k] = attrs.evolve(out[k], groups=near_duplicate_groups(out[k]))
                done.add(k)
    return out


def _config_units(config: Any, domains: dict[str, Domain]) -> tuple[list[_Unit], list[dict[str, Any]]]:
    """One unit per stage (and per distinct domain of a swept domain), with the run's partition."""
    units, problems = [], []
    features: dict[str, _Unit] = {}
    for i, stage in enumerate(config.stages):
        seen_keys: set[str] = set()
        for _, cfg in stage.variants:
            k = domain_key(cfg)
            if k in seen_keys or k not in domains:
                continue
            seen_keys.add(k)
            dom = domains[k]
            base = features.get(k) or _domain_unit(dom, stage=stage.name, index=i, key=f"stages[{i}]")
            features[k] = base
            unit = attrs.evolve(base, stage=stage.name, index=i, key=f"stages[{i}]",
                                allow_leakage=bool(getattr(cfg.split, "allow_leakage", False)))
            try:
                unit.partition, unit.protocol = stage_partition(config, i, cfg, dom)
            except UserError as exc:
                unit.split_error = str(exc)
                problems.append({"kind": "split", "stage": stage.name, "message": str(exc)})
            units.append(unit)
    return units, problems


# ---------------------------------------------------------------- analysis


def _analyse(units: list[_Unit]) -> dict[str, Any]:
    """Exact and near duplicates over all units, their groups, and which of them leak."""
    offsets = np.cumsum([0] + [len(u.ids) for u in units])
    n = int(offsets[-1])
    unit_of = np.repeat(np.arange(len(units)), [len(u.ids) for u in units])
    local = np.arange(n) - offsets[unit_of]
    thumbs = np.concatenate([u.thumbs for u in units]) if units else np.empty((0, THUMB, THUMB), np.uint8)
    near = near_duplicate_pairs(thumbs)
    exact_groups: list[dict[str, Any]] = []
    exact_pairs = []
    for kind, per_unit in (("pixels", [u.pixel_hashes for u in units]),
                           ("bytes", [u.byte_hashes for u in units])):
        if any(h is None for h in per_unit):
            continue
        members: dict[str, list[int]] = defaultdict(list)
        for g, h in enumerate(x for hs in per_unit for x in hs):
            if h:
                members[h].append(g)
        for h, m in members.items():
            if len(m) > 1:
                exact_groups.append({"kind": kind, "members": m})
                exact_pairs.extend([m[0], x] for x in m[1:])
    pairs = np.concatenate([near, np.asarray(exact_pairs, dtype=np.int64).reshape(-1, 2)])

    def member(g: int) -> dict[str, Any]:
        u = units[unit_of[g]]
        return {"stage": u.stage, "id": u.ids[local[g]], "class": u.classes[u.labels[local[g]]],
                "split": None if u.partition is None else str(u.partition[local[g]])}

    # within each unit: components of its own duplicate edges (what group_near_duplicates groups by)
    per_unit = []
    for ui, u in enumerate(units):
        m = (unit_of[pairs[:, 0]] == ui) & (unit_of[pairs[:, 1]] == ui) if len(pairs) else np.zeros(0, bool)
        lp = pairs[m] - offsets[ui]
        labels = _components(len(u.ids), lp)
        sizes = np.bincount(labels)
        groups = []
        for g in np.flatnonzero(sizes > 1):
            idx = np.flatnonzero(labels == g)
            classes = sorted({u.classes[c] for c in u.labels[idx]})
            splits = sorted({str(u.partition[i]) for i in idx}) if u.partition is not None else []
            groups.append({"size": int(len(idx)), "classes": classes, "splits": splits,
                           "leaks": len(splits) > 1, "ids": [u.ids[i] for i in idx]})
        groups.sort(key=lambda g: (-g["leaks"], -g["size"]))
        per_unit.append({"near_pairs": int(m.sum()), "groups": groups})
    # across units (stages): global components with a seen image of an earlier stage and an evaluated
    # image of a later one
    labels = _components(n, pairs)
    seen = np.concatenate([u.seen() for u in units]) if units else np.zeros(0, bool)
    evaluated = np.concatenate([u.evaluated() for u in units]) if units else np.zeros(0, bool)
    stage_idx = np.array([units[k].index for k in unit_of])
    cross = []
    sizes = np.bincount(labels) if n else np.zeros(0, int)
    for g in np.flatnonzero(sizes > 1):
        idx = np.flatnonzero(labels == g)
        if len(set(stage_idx[idx])) < 2:
            continue
        leaks = []
        for a in sorted(set(stage_idx[idx])):
            for b in sorted(set(stage_idx[idx])):
                if a < b and np.any(seen[idx] & (stage_idx[idx] == a)) and np.any(evaluated[idx] & (stage_idx[idx] == b)):
                    leaks.append((int(a), int(b)))
        cross.append({"size": int(len(idx)), "leaks": leaks, "members": [member(int(i)) for i in idx]})
    exact = [{"kind": e["kind"], "members": [member(int(i)) for i in e["members"]]} for e in exact_groups]
    return {"per_unit": per_unit, "cross": cross, "exact": exact, "near_pairs": int(len(near))}


def _unit_summary(u: _Unit) -> dict[str, Any]:
    counts = {c: int(k) for c, k in zip(u.classes, np.bincount(u.labels, minlength=len(u.classes)))}
    out: dict[str, Any] = {"stage": u.stage, "key": u.key, "images": len(u.ids), "classes": counts,
                           "protocol": u.protocol}
    if u.partition is not None:
        parts = sorted(set(u.partition.tolist()), key=lambda s: (SPLITS.index(s) if s in SPLITS else 9, s))
        out["splits"] = {p: {c: int(np.sum((u.partition == p) & (u.labels == k))) for k, c in enumerate(u.classes)}
                         for p in parts}
    if u.split_error:
        out["split_error"] = u.split_error
    return out


def _leak_problems(units: list[_Unit], analysis: dict[str, Any]) -> list[dict[str, Any]]:
    problems = []
    for u, pu in zip(units, analysis["per_unit"]):
        leaking = [g for g in pu["groups"] if g["leaks"]]
        if leaking:
            n_img = sum(g["size"] for g in leaking)
            g = leaking[0]
            problems.append({
                "kind": "leak-splits", "stage": u.stage, "allowed": u.allow_leakage, "groups": len(leaking),
                "images": n_img,
                "message": f"{len(leaking)} duplicate group(s) ({n_img} images) straddle the {u.protocol} "
                           f"splits{' of stage ' + u.stage if u.stage else ''}, e.g. {g['ids'][0]} and "
                           f"{g['ids'][1]} ({' / '.join(g['splits'])})"})
    by_pair: dict[tuple[int, int], list[dict[str, Any]]] = defaultdict(list)
    for c in analysis["cross"]:
        for ab in c["leaks"]:
            by_pair[ab].append(c)
    stage_names = {u.index: u.stage for u in units}
    allowed = {u.index: u.allow_leakage for u in units}
    for (a, b), groups in sorted(by_pair.items()):
        ex = groups[0]["members"]
        ea = next(m for m in ex if m["stage"] == stage_names[a])
        eb = next(m for m in ex if m["stage"] == stage_names[b])
        problems.append({
            "kind": "leak-stages", "stage": stage_names[b], "earlier": stage_names[a], "allowed": allowed[b],
            "groups": len(groups),
            "message": f"{len(groups)} duplicate group(s) join images stage {stage_names[a]} trains on with "
                       f"images stage {stage_names[b]} evaluates, e.g. {stage_names[a]}:{ea['id']} ({ea['split']}) "
                       f"and {stage_names[b]}:{eb['id']} ({eb['split']})"})
    return problems


def _exact_problems(analysis: dict[str, Any]) -> list[dict[str, Any]]:
    problems, warnings = [], []
    for e in analysis["exact"]:
        by_stage: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for m in e["members"]:
            by_stage[m["stage"]].append(m)
        for stage, ms in by_stage.items():
            if len(ms) < 2:
                continue
            names = ", ".join(f"{m['id']} ({m['class']})" for m in ms)
            if len({m["class"] for m in ms}) > 1:
                problems.append({"kind": "conflicting-labels", "stage": stage,
                                 "message": f"identical {e['kind']} filed under different classes: {names}"})
            else:
                warnings.append({"kind": "exact-duplicate", "stage": stage,
                                 "message": f"identical {e['kind']}: {names}"})
    return problems + warnings


# ---------------------------------------------------------------- folder check


@attrs.define
class _FileInfo:
    path: Path
    rel: str
    label: int
    size: tuple[int, int] | None = None
    mode: str | None = None
    byte_hash: str = ""
    pixel_hash: str = ""
    thumb: np.ndarray | None = None
    error: str | None = None


def _scan_file(path: Path, base: Path, label: int) -> _FileInfo:
    from PIL import Image

    from .images import decode_image

    info = _FileInfo(path=path, rel=path.relative_to(base).as_posix(), label=label)
    try:
        data = path.read_bytes()
    except OSError as exc:
        info.error = f"cannot open the file ({exc.strerror or exc})"
        return info
    info.byte_hash = hashlib.blake2b(data, digest_size=16).hexdigest()
    try:
        with Image.open(path) as im:
            info.size, info.mode = im.size, im.mode
    except Exception:  # noqa: BLE001 - the decode below names the reason
        pass
    try:
        rgb = decode_image(path, channels=3, who="data check")
    except UserError as exc:
        msg = str(exc)
        marker = f"cannot read image {path}: "
        reason = msg.split(marker, 1)[1] if marker in msg else msg
        info.error = reason.removesuffix("; remove or replace the file")
        return info
    info.pixel_hash = _pixel_hash(rgb)
    grey = Image.fromarray(rgb, "RGB").convert("L")  # BT.601 luma
    info.thumb = np.asarray(grey.resize((THUMB, THUMB), Image.Resampling.BILINEAR), dtype=np.uint8)
    return info


def check_folder(root: str | Path, *, classes: Sequence[str] | None = None, val: float = 0.2, test: float = 0.2,
                 seed: int = 0, group_near_duplicates: bool = False) -> dict[str, Any]:
    """Audit an image folder (one sub-folder per class) as a run would split it (holdout, these fractions)."""
    from .images import IMAGE_SUFFIXES

    base = Path(root).expanduser()
    if not base.is_dir():
        raise UserError(f'data check: "{root}" is neither a folder nor a config file')
    found = sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    names = list(classes) if classes else found
    missing = [c for c in names if c not in found]
    if missing:
        raise UserError(f'data check: no sub-folder "{missing[0]}" in {base}; sub-folders: {", ".join(found) or "none"}')
    if not names:
        raise UserError(f"data check: {base} has no class sub-folders (expected one sub-folder of images per class)")
    jobs = []
    for c, name in enumerate(names):
        for p in sorted((base / name).rglob("*")):
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."):
                jobs.append((p, c))
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        infos = list(pool.map(lambda job: _scan_file(job[0], base, job[1]), jobs))
    good = [f for f in infos if f.error is None]
    problems: list[dict[str, Any]] = []
    warnings: list[dict[str, Any]] = []
    for f in infos:
        if f.error is not None:
            problems.append({"kind": "unreadable", "stage": "", "file": f.rel, "message": f"{f.rel}: {f.error}"})
    counts = Counter(f.label for f in good)
    for c, name in enumerate(names):
        if counts[c] < 2:
            problems.append({"kind": "small-class", "stage": "", "class": name,
                             "message": f'class "{name}" has {counts[c]} readable image(s); a class needs at least 2 '
                                        f"(at least 3 for a train/validation/test split)"})
    sizes = Counter((f.size, f.mode) for f in good if f.size is not None)
    histogram = [{"size": f"{s[0]}x{s[1]}", "mode": m, "count": k} for (s, m), k in sizes.most_common()]
    warnings += _odd_sizes(good)
    unit = _Unit(stage="", index=0, key=str(base), classes=tuple(names),
                 labels=np.array([f.label for f in good], dtype=np.int64), ids=tuple(f.rel for f in good),
                 thumbs=np.stack([f.thumb for f in good]) if good else np.empty((0, THUMB, THUMB), np.uint8),
                 pixel_hashes=[f.pixel_hash for f in good], byte_hashes=[f.byte_hash for f in good])
    if len(good) and len(set(unit.labels.tolist())) >= 2:
        stub = Domain(classes=tuple(names), images=np.zeros((len(good), 1, 1), np.uint8), labels=unit.labels,
                      ids=unit.ids)  # make_splits reads labels, ids and groups only
        if group_near_duplicates:
            stub = attrs.evolve(stub, groups=_groups_from_unit(unit))
        try:
            splits = make_splits(stub, val=val, test=test, seed=seed, min_per_class=1, where=f"{base}: ")
            unit.partition = np.full(len(stub), "", dtype=object)
            for split, idx in splits.items():
                unit.partition[idx] = split
        except UserError as exc:
            unit.split_error = str(exc)
            problems.append({"kind": "split", "stage": "", "message": str(exc)})
    analysis = _analyse([unit])
    problems += _leak_problems([unit], analysis)
    for item in _exact_problems(analysis):
        (problems if item["kind"] == "conflicting-labels" else warnings).append(item)
    summary = _unit_summary(unit)
    summary["files"] = len(infos)
    summary["unreadable"] = len(infos) - len(good)
    summary["sizes"] = histogram
    return _report("folder", str(base), [summary], [unit], analysis, problems, warnings,
                   settings={"val": val, "test": test, "seed": seed, "group_near_duplicates": group_near_duplicates})


def _groups_from_unit(unit: _Unit) -> tuple[str, ...]:
    pairs = [near_duplicate_pairs(unit.thumbs)]
    first: dict[str, int] = {}
    for i, h in enumerate(unit.pixel_hashes):
        j = first.setdefault(h, i)
        if j != i:
            pairs.append(np.array([[j, i]]))
    labels = _components(len(unit.ids), np.concatenate(pairs).reshape(-1, 2))
    return tuple(f"dup-{k}" for k in labels)


def _odd_sizes(files: list[_FileInfo]) -> list[dict[str, Any]]:
    out = []
    n = len(files)
    for attr, what in (("size", "size"), ("mode", "mode")):
        counts = Counter(getattr(f, attr) for f in files if getattr(f, attr) is not None)
        if not counts or n == 0:
            continue
        common, top = counts.most_common(1)[0]
        if top / n < DOMINANT_SHARE:
            continue
        for value, k in counts.items():
            if value != common and k / n < ODD_SHARE:
                shown = f"{value[0]}x{value[1]}" if attr == "size" else value
                usual = f"{common[0]}x{common[1]}" if attr == "size" else common
                ex = [f.rel for f in files if getattr(f, attr) == value][:3]
                out.append({"kind": f"odd-{what}", "stage": "",
                            "message": f"{k} image(s) of {what} {shown} (most are {usual}): {', '.join(ex)}"
                                       + (" ..." if k > 3 else "")})
    return out


# ---------------------------------------------------------------- config check and the run's audit


def check_config(config: Any, registry: Any, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Audit every stage's domain of a config (already checked by :func:`mltl.running.preflight.validate`), with the
    splits the run would make (:mod:`mltl.running.plan`); ``overrides`` are recorded in the report."""
    domains: dict[str, Domain] = {}
    problems: list[dict[str, Any]] = []
    for i, stage in enumerate(config.stages):
        for _, cfg in stage.variants:
            k = domain_key(cfg)
            if k in domains:
                continue
            try:
                domains[k] = registry.create("domain", cfg.domain.plugin, cfg.domain.options,
                                             key=f"stages[{i}].domain", source=config.source,
                                             extra={"image_size": config.input.size})
            except UserError as exc:
                problems.append({"kind": "unreadable", "stage": stage.name, "message": str(exc)})
    domains = apply_duplicate_groups(config, domains)
    units, split_problems = _config_units(config, domains)
    problems += split_problems
    warnings: list[dict[str, Any]] = []
    for u in units:
        for c, k in zip(u.classes, np.bincount(u.labels, minlength=len(u.classes))):
            if k < 2:
                problems.append({"kind": "small-class", "stage": u.stage,
                                 "message": f'stage {u.stage}: class "{c}" has {k} image(s); a class needs at least 2'})
    analysis = _analyse(units)
    problems += [p for p in _leak_problems(units, analysis)]
    for item in _exact_problems(analysis):
        (problems if item["kind"] == "conflicting-labels" else warnings).append(item)
    return _report("config", config.source, [_unit_summary(u) for u in units], units, analysis, problems, warnings,
                   settings={"overrides": list(overrides)})


def audit_leakage(config: Any, domains: dict[str, Domain]) -> dict[str, Domain]:
    """The leakage check ``mltl run`` makes after loading its domains and before training.

    Returns the domains, with near-duplicate groups merged into ``Domain.groups`` for stages whose
    ``split.group_near_duplicates`` is true. Raises :class:`UserError` when a duplicate group straddles a
    stage's splits, or joins an earlier stage's training images with a later stage's evaluated ones,
    unless that (later) stage's ``split.allow_leakage`` is true.
    """
    domains = apply_duplicate_groups(config, domains)
    units, _ = _config_units(config, domains)  # a split that cannot be made fails later, with its own message
    units = [u for u in units if u.partition is not None]
    analysis = _analyse(units)
    leaks = [p for p in _leak_problems(units, analysis) if not p["allowed"]]
    if leaks:
        stages = {u.stage: u.index for u in units}
        parts = "; ".join(f"stage {p['stage']}: {p['message']}" for p in leaks)
        first = leaks[0]["stage"]
        raise UserError(
            f"{config.source}: data leakage: {parts}. Split duplicates together with "
            f"stages.{first}.split.group_near_duplicates = true (and keep each image in one stage), or run anyway "
            f"with stages.{first}.split.allow_leakage = true; `mltl data check {config.source}` lists every "
            f"group (stages[{stages[first]}])")
    return domains


# ---------------------------------------------------------------- the report


def how_to_fix(finding: dict[str, Any], kind: str) -> str:
    """One sentence telling the user how to resolve a finding; ``kind`` is "config" or "folder" (what was checked)."""
    stage = finding.get("stage") or ""
    key = f"stages.{stage}.split" if stage and kind == "config" else "split (in the stage's config)"
    return {
        "leak-splits": f"keep each duplicate group in one split with {key}.group_near_duplicates = true (needs no "
                       f"patient ids), or delete the extra copies from the data; {key}.allow_leakage = true runs "
                       f"anyway, with an optimistic evaluation",
        "leak-stages": f"remove the shared images from one of the two stages' data (an image stage "
                       f"{finding.get('earlier', 'an earlier stage')} trained on must not be evaluated by stage "
                       f"{stage or 'this stage'}), or run anyway with {key}.allow_leakage = true",
        "conflicting-labels": "one image filed under two classes: keep the copy in its correct class folder (or "
                              "manifest row) and delete the other",
        "exact-duplicate": "harmless to the evaluation (the copies sit in one split), but each weighs twice in "
                           "training: delete the extra copies",
        "unreadable": "re-export the file (or delete it); `mltl run` refuses a domain with unreadable images",
        "small-class": "add images of that class, drop it with the domain's classes option, or merge it into "
                       "another class",
        "split": f"change {key} (smaller val / test fractions, fewer folds, or a lower min_per_class), or add images",
    }.get(finding.get("kind", ""), "see the finding")


def _report(kind: str, target: str, summaries: list[dict[str, Any]], units: list[_Unit], analysis: dict[str, Any],
            problems: list[dict[str, Any]], warnings: list[dict[str, Any]], settings: dict[str, Any]) -> dict[str, Any]:
    for finding in (*problems, *warnings):
        finding.setdefault("fix", how_to_fix(finding, kind))
    for s, pu in zip(summaries, analysis["per_unit"]):
        s["near_duplicate_groups"] = len(pu["groups"])
        s["images_in_duplicate_groups"] = sum(g["size"] for g in pu["groups"])
        s["largest_group"] = max((g["size"] for g in pu["groups"]), default=0)
        s["leaking_groups"] = sum(g["leaks"] for g in pu["groups"])
        s["duplicate_groups"] = pu["groups"]
    return {
        "kind": kind, "target": target, "settings": settings,
        "rule": {"perceptual_hash_bits": 64, "max_hamming": MAX_HAMMING,
                 "min_detail_correlation": MIN_DETAIL_CORRELATION, "thumbnail": THUMB, "detail_sigma": DETAIL_SIGMA},
        "domains": summaries,
        "exact_duplicates": analysis["exact"],
        "cross_stage_groups": [c for c in analysis["cross"]],
        "problems": problems, "warnings": warnings,
        "ok": not problems,
    }


def _with_fix(finding: dict[str, Any]) -> Any:
    from rich.text import Text  # plain text: a file name or fix with [brackets] is not rich markup

    return Text(finding["message"] + (f"\nhow to fix: {finding['fix']}" if finding.get("fix") else ""))


def render(report: dict[str, Any], console: Any = None, *, max_rows: int = 15) -> None:
    """The report as rich tables."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    for d in report["domains"]:
        title = f"{report['target']}" if not d["stage"] else f"stage {d['stage']} ({d['key']})"
        table = Table(title=f"{title}: {d['images']} images, {d['protocol']} split")
        splits = list(d.get("splits", {}))
        table.add_column("class")
        table.add_column("images", justify="right")
        for s in splits:
            table.add_column(s, justify="right")
        for c, k in d["classes"].items():
            table.add_row(c, str(k), *(str(d["splits"][s][c]) for s in splits))
        console.print(table)
        if d.get("sizes"):
            sizes = Table(title="sizes and modes")
            for col in ("size", "mode", "images"):
                sizes.add_column(col)
            for row in d["sizes"][:max_rows]:
                sizes.add_row(row["size"], row["mode"], str(row["count"]))
            console.print(sizes)
        groups = d["duplicate_groups"]
        console.print(f"near/exact duplicate groups: {d['near_duplicate_groups']} holding "
                      f"{d['images_in_duplicate_groups']} images (largest {d['largest_group']}); "
                      f"straddling splits: {d['leaking_groups']}")
        if groups:
            gt = Table(title="duplicate groups (leaking first)")
            for col in ("size", "classes", "splits", "leaks", "examples"):
                gt.add_column(col)
            for g in groups[:max_rows]:
                gt.add_row(str(g["size"]), ", ".join(g["classes"]), ", ".join(g["splits"]),
                           "yes" if g["leaks"] else "", ", ".join(g["ids"][:3]) + (" ..." if g["size"] > 3 else ""))
            console.print(gt)
            if len(groups) > max_rows:
                console.print(f"... {len(groups) - max_rows} more groups (--json lists them all)")
    cross = [c for c in report["cross_stage_groups"]]
    if cross:
        ct = Table(title="duplicates across stages")
        for col in ("size", "leaks", "examples"):
            ct.add_column(col)
        for c in cross[:max_rows]:
            ct.add_row(str(c["size"]), "yes" if c["leaks"] else "",
                       ", ".join(f"{m['stage']}:{m['id']} ({m['split']})" for m in c["members"][:3]))
        console.print(ct)
    if report["problems"] or report["warnings"]:
        pt = Table(title="findings")
        pt.add_column("")
        pt.add_column("kind")
        pt.add_column("stage")
        pt.add_column("finding, and how to fix it", overflow="fold")
        for p in report["problems"]:
            pt.add_row("[red]problem[/red]", p["kind"], p.get("stage", ""), _with_fix(p))
        for w in report["warnings"]:
            pt.add_row("[yellow]warning[/yellow]", w["kind"], w.get("stage", ""), _with_fix(w))
        console.print(pt)
    verdict = ("[green]OK[/green]: nothing found that would corrupt an evaluation" if report["ok"] else
               f"[red]{len(report['problems'])} problem(s)[/red] that would corrupt an evaluation")
    console.print(verdict)
