"""Domains: labelled image sources, and how a stage splits and prepares them.

A domain plugin's factory returns a :class:`Domain`: decoded images in memory with their labels, class
names, stable ids, and optionally patient/study groups (so that one patient's images never straddle two
splits) and a predefined split. mltl makes the train/validation/test split (:func:`make_splits`) and
converts the images to the chain's input size and channels (:func:`prepare_images`).
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserError
from .limits import few

SPLITS = ("train", "val", "test")


def _check_images(instance, attribute, value) -> None:
    if not isinstance(value, np.ndarray) or value.dtype != np.uint8 or value.ndim not in (3, 4):
        raise ValueError("Domain.images must be a uint8 numpy array shaped (N, H, W) or (N, C, H, W)")
    if value.ndim == 4 and value.shape[1] not in (1, 3):
        raise ValueError(f"Domain.images has {value.shape[1]} channels; expected 1 or 3")


@attrs.frozen(eq=False)
class Domain:
    """A labelled image set, decoded.

    ``images``: uint8, ``(N, H, W)`` grey or ``(N, C, H, W)`` with C = 1 or 3. ``labels``: int64 ``(N,)``,
    indices into ``classes``. ``ids``: one stable, unique string per image (a file path, a generator index).
    ``groups``: optional patient/study id per image; images sharing one are kept in one split.
    ``splits``: optional predefined ``"train"``/``"val"``/``"test"`` per image (e.g. MedMNIST's official
    split), used instead of a random split.
    """

    classes: tuple[str, ...] = attrs.field(converter=tuple)
    images: np.ndarray = attrs.field(validator=_check_images)
    labels: np.ndarray = attrs.field(converter=lambda a: np.asarray(a, dtype=np.int64))
    ids: tuple[str, ...] = attrs.field(converter=tuple)
    groups: tuple[str, ...] | None = attrs.field(default=None, converter=attrs.converters.optional(tuple))
    splits: tuple[str, ...] | None = attrs.field(default=None, converter=attrs.converters.optional(tuple))
    description: str = ""

    def __attrs_post_init__(self) -> None:
        n = len(self.images)
        if len(self.classes) < 2:
            raise ValueError("a Domain needs at least two classes")
        for name, seq in (("labels", self.labels), ("ids", self.ids), ("groups", self.groups),
                          ("splits", self.splits)):
            if seq is not None and len(seq) != n:
                raise ValueError(f"Domain.{name} has {len(seq)} entries for {n} images")
        if n and (self.labels.min() < 0 or self.labels.max() >= len(self.classes)):
            raise ValueError("Domain.labels must index into Domain.classes")
        if len(set(self.ids)) != n:
            raise ValueError("Domain.ids must be unique")
        if self.splits is not None and not set(self.splits) <= set(SPLITS):
            raise ValueError(f"Domain.splits values must be among {SPLITS}")
        folded: dict[str, str] = {}
        for name in self.classes:  # "Cyst" and "cyst": one class spelled twice would be learnt as two
            other = folded.setdefault(str(name).casefold(), str(name))
            if other != name:
                raise UserError(f'{self.description or "domain"}: classes "{few([other])}" and "{few([name])}" '
                                f"differ only in letter case (one class spelled two ways?); rename one so that "
                                f"each class has one name, or choose the classes with the domain's classes option")

    def __len__(self) -> int:
        return len(self.images)

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.labels, minlength=len(self.classes))
        return {c: int(k) for c, k in zip(self.classes, counts)}


def _groups(domain: Domain) -> tuple[np.ndarray, np.ndarray]:
    """Per image its group index; per group the class most of its images have (mixed groups stay whole)."""
    groups = np.asarray(domain.groups if domain.groups is not None else domain.ids)
    group_names, group_of = np.unique(groups, return_inverse=True)
    group_label = np.array([np.bincount(domain.labels[group_of == g]).argmax() for g in range(len(group_names))])
    return group_of, group_label


_SPLIT_WORDS = {"train": "training", "val": "validation", "test": "test"}


def deal_groups(domain: Domain, pool: np.ndarray, fractions: dict[str, float], *, seed: int, min_per_class: int,
                where: str, rest: str = "train") -> dict[str, np.ndarray]:
    """Split the images ``pool`` (indices) by whole groups, stratified by class.

    Each class's groups are shuffled and dealt to the named splits in order until each holds its fraction
    of the class's images in the pool (and at least ``min_per_class`` images); the rest go to ``rest``.
    """
    rng = np.random.default_rng(seed)
    group_of, group_label = _groups(domain)
    in_pool = np.zeros(len(domain), dtype=bool)
    in_pool[pool] = True
    pool_groups = np.unique(group_of[pool])
    sizes_all = np.bincount(group_of[pool], minlength=len(group_label))
    assign: dict[int, str] = {}
    for c, cls in enumerate(domain.classes):
        members = pool_groups[group_label[pool_groups] == c]
        rng.shuffle(members)
        sizes = sizes_all[members]
        total = int(sizes.sum())
        if len(members) < len(fractions) + 1:
            split_names = "/".join([rest, *(_SPLIT_WORDS.get(x, x) for x in reversed(fractions))])
            raise UserError(
                f'{where}class "{cls}" has {len(members)} image group(s); a {split_names} split needs at least '
                f"{len(fractions) + 1} (add images, or drop the class)"
            )
        want = {s: max(min_per_class, int(round(frac * total))) for s, frac in fractions.items()}
        filled = dict.fromkeys(fractions, 0)
        for g, size in zip(members, sizes):
            target = next((s for s in fractions if filled[s] < want[s]), rest)
            assign[int(g)] = target
            if target != rest:
                filled[target] += int(size)
        if not any(assign[int(g)] == rest for g in members):
            taken = " and ".join(_SPLIT_WORDS.get(x, x) for x in reversed(fractions))
            raise UserError(
                f'{where}class "{cls}" has no {_SPLIT_WORDS.get(rest, rest)} images left after taking {taken} '
                f"({total} images): lower split.val / split.test or add images"
            )
    names = [*fractions, rest]
    image_split = np.array([assign.get(int(g), "") for g in group_of])
    return {s: np.flatnonzero((image_split == s) & in_pool) for s in names}


def make_splits(domain: Domain, *, val: float, test: float, seed: int, min_per_class: int = 1,
                where: str = "") -> dict[str, np.ndarray]:
    """Stratified, group-aware train/val/test indices.

    Each class's groups (patients; each image is its own group when the domain has none) are shuffled and
    dealt to test, then validation, until each split holds its fraction of the class's images, and at
    least ``min_per_class`` images of every class. A predefined ``domain.splits`` is used as it is.
    """
    if domain.splits is not None:
        out = {s: np.flatnonzero(np.asarray(domain.splits) == s) for s in SPLITS}
        check_split_classes(domain, out, where)
        return out
    dealt = deal_groups(domain, np.arange(len(domain)), {"test": test, "val": val}, seed=seed,
                        min_per_class=min_per_class, where=where)
    out = {s: dealt[s] for s in SPLITS}
    check_split_classes(domain, out, where)
    return out


def kfold_assignment(domain: Domain, folds: int, *, seed: int, where: str = "") -> np.ndarray:
    """Per image its test fold (0..folds-1): stratified by class, whole groups, folds balanced in images."""
    rng = np.random.default_rng(seed)
    group_of, group_label = _groups(domain)
    sizes = np.bincount(group_of, minlength=len(group_label))
    fold_of_group = np.empty(len(group_label), dtype=np.int64)
    total = np.zeros(folds, dtype=np.int64)
    for c, cls in enumerate(domain.classes):
        members = np.flatnonzero(group_label == c)
        if len(members) < folds:
            raise UserError(f'{where}class "{cls}" has {len(members)} image group(s); {folds}-fold '
                            f"cross-validation needs at least {folds} (lower split.folds or add images)")
        rng.shuffle(members)
        members = members[np.argsort(-sizes[members], kind="stable")]  # big groups first, ties shuffled
        filled = np.zeros(folds, dtype=np.int64)
        for g in members:
            # the emptiest fold of this class; ties: the emptiest fold overall, then the lowest
            f = int(np.lexsort((np.arange(folds), total, filled))[0])
            fold_of_group[g] = f
            filled[f] += sizes[g]
            total[f] += sizes[g]
    return fold_of_group[group_of]


def subsample(domain: Domain, pool: np.ndarray, fraction: float, *, seed: int) -> np.ndarray:
    """About ``fraction`` of each class's images in ``pool``, drawn as whole groups (at least one per class)."""
    if fraction >= 1:
        return np.sort(pool)
    rng = np.random.default_rng(seed)
    group_of, group_label = _groups(domain)
    sizes = np.bincount(group_of[pool], minlength=len(group_label))
    keep = []
    for c in range(len(domain.classes)):
        members = np.unique(group_of[pool][domain.labels[pool] == c])
        rng.shuffle(members)
        want = max(1, int(round(fraction * int(sizes[members].sum()))))
        taken = 0
        for g in members:
            if taken >= want:
                break
            keep.append(g)
            taken += int(sizes[g])
    chosen = np.isin(group_of[pool], np.asarray(keep, dtype=np.int64))
    return np.sort(pool[chosen])


def check_split_classes(domain: Domain, splits: dict[str, np.ndarray], where: str) -> None:
    for s, idx in splits.items():
        present = set(np.unique(domain.labels[idx]).tolist())
        missing = [domain.classes[c] for c in range(len(domain.classes)) if c not in present]
        if missing:
            raise UserError(
                f"{where}the {s} split has no images of class(es) {few(missing)}; "
                f"add images or change the split fractions"
            )


def prepare_images(images: np.ndarray, *, size: int, channels: int) -> torch.Tensor:
    """uint8 ``(N, channels, size, size)``: resized (antialiased bilinear) and converted grey <-> RGB."""
    x = torch.from_numpy(np.ascontiguousarray(images))
    if x.ndim == 3:
        x = x[:, None]
    if x.shape[1] != channels:
        if channels == 3:
            x = x.expand(-1, 3, -1, -1)
        else:  # ITU-R BT.601 luma
            w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
            x = (x.float() * w).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
    if x.shape[-2:] != (size, size):
        out = []
        for chunk in x.split(1024):
            y = F.interpolate(chunk.float(), size=(size, size), mode="bilinear", antialias=True,
                              align_corners=False)
            out.append(y.round().clamp(0, 255).to(torch.uint8))
        x = torch.cat(out)
    return x.contiguous()


def split_counts(domain: Domain, splits: dict[str, np.ndarray]) -> dict[str, dict[str, int]]:
    out = {}
    for s, idx in splits.items():
        counts = np.bincount(domain.labels[idx], minlength=len(domain.classes))
        out[s] = {c: int(k) for c, k in zip(domain.classes, counts)}
    return out


def class_index(classes: Sequence[str]) -> dict[str, int]:
    return {c: i for i, c in enumerate(classes)}
