"""The skin-lesions domain, as mltl sees it through the installed plugin's hooks."""

import csv
import shutil

import numpy as np
import pytest

import mltl
from mltl import get_registry
from mltl_dermoscopy.preprocess import read_dermoscopy, shades_of_grey


def _create(**options):
    return get_registry().create("domain", "skin-lesions", options, key="stages[0].domain",
                                 extra={"image_size": 32})


def test_registered_through_the_entry_point():
    domain = get_registry().get("domain", "skin-lesions")
    assert domain.plugin == "dermoscopy"
    assert domain.read_file is read_dermoscopy and domain.suffixes == {".jpg", ".jpeg", ".png"}  # mltl predict
    assert get_registry().get("reporter", "lesion-level").plugin == "dermoscopy"


def test_loads_classes_groups_and_rgb_images(ham_folder):
    dom = _create(root=str(ham_folder), classes=["nv", "mel", "bkl"])
    with open(ham_folder / "metadata.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(dom) == len(rows) and dom.classes == ("nv", "mel", "bkl")
    assert dom.images.shape == (len(rows), 3, 32, 32) and dom.images.dtype == np.uint8
    assert dom.groups == tuple(r["lesion_id"] for r in rows)
    assert dom.ids[0] == f"{rows[0]['lesion_id']}/{rows[0]['image_id']}"
    # the lesion is darker than the skin around it in every class
    centre = dom.images[:, :, 12:20, 12:20].mean(axis=(1, 2, 3))
    corner = dom.images[:, :, :4, :4].mean(axis=(1, 2, 3))
    assert np.all(centre < corner)


def test_a_lesion_never_straddles_two_splits(ham_folder):
    dom = _create(root=str(ham_folder))
    splits = mltl.make_splits(dom, val=0.25, test=0.25, seed=1)
    where = {}
    for split, idx in splits.items():
        for i in idx:
            assert where.setdefault(dom.groups[i], split) == split


def test_class_subset(ham_folder):
    dom = _create(root=str(ham_folder), classes=["mel", "nv"])
    assert dom.classes == ("mel", "nv") and set(dom.class_counts()) == {"mel", "nv"}


def test_colour_constancy_removes_a_colour_cast():
    rng = np.random.default_rng(0)
    scene = rng.integers(60, 200, (32, 32, 3)).astype(np.float64)
    a = shades_of_grey(np.clip(scene * [1.2, 1.0, 0.8], 0, 255).astype(np.uint8)).astype(float)
    b = shades_of_grey(np.clip(scene * [0.85, 1.0, 1.15], 0, 255).astype(np.uint8)).astype(float)
    assert np.abs(a - b).mean() < 3  # two casts of one scene look alike after correction
    assert np.abs(a.mean(axis=(0, 1)) - a.mean()).max() < 10  # and neutral on average


def test_predict_reader_is_the_training_preprocessing(ham_folder):
    dom = _create(root=str(ham_folder))
    first = sorted((ham_folder / "images").glob("*.jpg"))[0]
    assert np.array_equal(read_dermoscopy(first, image_size=32), dom.images[dom.ids.index(f"{dom.groups[0]}/{first.stem}")])


def test_user_errors_name_the_problem(ham_folder, tmp_path):
    with pytest.raises(mltl.UserError, match="is not a folder"):
        _create(root=str(tmp_path / "nowhere"))
    with pytest.raises(mltl.UserError, match='class "akiec" .* does not occur in column "dx"'):
        _create(root=str(ham_folder), classes=["nv", "akiec"])
    with pytest.raises(mltl.UserError, match='no column "diagnosis"'):
        _create(root=str(ham_folder), label_column="diagnosis")
    with pytest.raises(mltl.ConfigError, match='stages\\[0\\].domain.colour_constancy: expected bool'):
        _create(root=str(ham_folder), colour_constancy="yes")
    broken = tmp_path / "broken"
    shutil.copytree(ham_folder, broken)
    victim = sorted((broken / "images").glob("*.jpg"))[2]
    victim.unlink()
    with pytest.raises(mltl.UserError, match=f"line 4: no image {victim.stem}.jpg"):
        _create(root=str(broken))
