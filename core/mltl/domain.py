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

from .errors import UserError

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

    def __len__(self) -> int:
        return len(self.images)

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.labels, minlength=len(self.classes))
        return {c: int(k) for c, k in zip(self.classes, counts)}


def make_splits(domain: Domain, *, val: float, test: float, seed: int, min_per_class: int = 1,
                where: str = "") -> dict[str, np.ndarray]:
    """Stratified, group-aware train/val/test indices.

    Each class's groups (patients; each image is its own group when the domain has none) are shuffled and
    dealt to test, then validation, until each split holds its fraction of the class's images, and at
    least ``min_per_class`` images of every class. A predefined ``domain.splits`` is used as it is.
    """
    if domain.splits is not None:
        out = {s: np.flatnonzero(np.asarray(domain.splits) == s) for s in SPLITS}
        _check_split_classes(domain, out, where)
        return out
    rng = np.random.default_rng(seed)
    groups = np.asarray(domain.groups if domain.groups is not None else domain.ids)
    labels = domain.labels
    # a group belongs to the class most of its images have; mixed groups stay whole
    group_names, group_of = np.unique(groups, return_inverse=True)
    group_label = np.array([np.bincount(labels[group_of == g]).argmax() for g in range(len(group_names))])
    assign = np.empty(len(group_names), dtype=object)
    for c, cls in enumerate(domain.classes):
        members = np.flatnonzero(group_label == c)
        rng.shuffle(members)
        sizes = np.bincount(group_of, minlength=len(group_names))[members]
        total = int(sizes.sum())
        if len(members) < 3:
            raise UserError(
                f'{where}class "{cls}" has {len(members)} image group(s); a train/validation/test split '
                f"needs at least 3 (add images, or drop the class)"
            )
        want = {s: max(min_per_class, int(round(frac * total))) for s, frac in (("test", test), ("val", val))}
        filled = {"test": 0, "val": 0}
        for g, size in zip(members, sizes):
            target = next((s for s in ("test", "val") if filled[s] < want[s]), "train")
            assign[g] = target
            if target != "train":
                filled[target] += int(size)
        if not np.any(assign[members] == "train"):
            raise UserError(
                f'{where}class "{cls}" has no training images left after taking validation and test '
                f"({total} images): lower split.val / split.test or add images"
            )
    image_split = assign[group_of]
    out = {s: np.flatnonzero(image_split == s) for s in SPLITS}
    _check_split_classes(domain, out, where)
    return out


def _check_split_classes(domain: Domain, splits: dict[str, np.ndarray], where: str) -> None:
    for s, idx in splits.items():
        present = set(np.unique(domain.labels[idx]).tolist())
        missing = [domain.classes[c] for c in range(len(domain.classes)) if c not in present]
        if missing:
            raise UserError(
                f"{where}the {s} split has no images of class(es) {', '.join(missing)}; "
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
