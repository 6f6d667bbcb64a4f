"""The image-folder domain and a short chain on real kidney CT slices from ../shared/data."""

import json

import numpy as np
import pytest

import mltl
from mltl import get_registry


def test_image_folder_reads_the_kidney_ct_set(shared_data):
    dom = get_registry().create("domain", "image-folder",
                                {"root": str(shared_data / "ct_kidney"), "classes": ["Normal", "Cyst", "Stone"]},
                                extra={"image_size": 48})
    counts = dom.class_counts()
    assert counts == {"Normal": 500, "Cyst": 420, "Stone": 494}
    assert dom.images.shape == (1414, 48, 48) and dom.images.dtype == np.uint8
    assert dom.images.std() > 10  # real pixel content, not blank decodes
    assert all(i.startswith(("Normal/", "Cyst/", "Stone/")) for i in dom.ids)


def test_image_folder_errors_name_the_file(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(b"not a png at all")
    (tmp_path / "b" / "y.png").write_bytes(b"")
    with pytest.raises(mltl.UserError, match=r"cannot read image .*a/x.png"):
        get_registry().create("domain", "image-folder", {"root": str(tmp_path)})
    with pytest.raises(mltl.UserError, match=r'no sub-folder "c"'):
        get_registry().create("domain", "image-folder", {"root": str(tmp_path), "classes": ["a", "c"]})


@pytest.mark.slow
def test_chain_onto_a_real_folder_target(shared_data, tmp_path, tiny_config):
    cfg = mltl.load_config(tiny_config(), [
        "stages.source.backbone=gfe-1", "stages.intermediate.freeze=C1",
        f'stages.target.domain={{ plugin = "image-folder", root = "{shared_data / "ct_kidney"}", classes = ["Normal", "Cyst", "Tumor"] }}',
        "stages.target.train.epochs=2",
        # the folder's neighbouring slices are near-duplicates: without grouping them the run refuses to start
        "stages.target.split.group_near_duplicates=true",
    ])
    result = mltl.run(cfg, out=tmp_path / "run", device="cpu")
    m = json.loads((result.run_dir / "target" / "metrics.json").read_text())
    assert m["classes"] == ["Normal", "Cyst", "Tumor"]
    assert m["n_test"] == sum(m["class_counts"]["test"].values()) > 150
    split_of = {}
    with open(result.run_dir / "target" / "splits.csv") as f:
        next(f)
        for line in f:
            image, _, split = line.rstrip("\n").rsplit(",", 2)
            split_of[image] = split
    from mltl.builtins import image_folder_domain
    from mltl.data.datacheck import near_duplicate_groups

    dom = image_folder_domain(str(shared_data / "ct_kidney"), classes=["Normal", "Cyst", "Tumor"], image_size=56)
    groups: dict[str, set[str]] = {}
    for image, group in zip(dom.ids, near_duplicate_groups(dom)):
        groups.setdefault(group, set()).add(split_of[image])
    assert all(len(s) == 1 for s in groups.values())  # no near-duplicate group straddles two splits
