"""One plan per stage (mltl.running.plan): `mltl rank`, `mltl data check` and `mltl validate` see the very split and
the very checks that `mltl run` makes, with near-duplicate grouping and with a saved split file."""

import csv

import numpy as np
import pytest
from PIL import Image

import mltl
from mltl import cli
from mltl.data import datacheck
from mltl.running.plan import domain_key, load_domains
from mltl.evaluation.rank import training_split


def twin_folder(root, n=12, seed=5):
    """Two classes of noise images, each image with a near-identical JPEG twin (one scan's neighbours)."""
    rng = np.random.default_rng(seed)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(n):
            img = Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8))
            img.save(root / c / f"{c}{i}.png")
            img.save(root / c / f"{c}{i}_twin.jpg", quality=95)
    return root


CONFIG = """
[run]
name = "plan"
seed = 3
[input]
size = 32
[[stages]]
name = "only"
domain = {{ plugin = "image-folder", root = "{root}" }}
backbone = "gfe-1"
split = {{ protocol = "holdout", val = 0.25, test = 0.25{extra} }}
train = {{ epochs = 1, batch_size = 8 }}
"""


def saved_split(path):
    with open(path, newline="") as f:
        return {r["id"]: r["split"] for r in csv.DictReader(f)}


@pytest.fixture
def folder(tmp_path):
    return twin_folder(tmp_path / "data")


def test_rank_and_data_check_use_the_runs_split_with_near_duplicate_groups(folder, tmp_path):
    cfg = tmp_path / "grouped.toml"
    cfg.write_text(CONFIG.format(root=folder, extra=", group_near_duplicates = true"))
    result = mltl.run(cfg, out=tmp_path / "run", device="cpu")
    made = saved_split(result.run_dir / "only" / "splits.csv")
    assert all(made[f"{c}/{c}{i}.png"] == made[f"{c}/{c}{i}_twin.jpg"] for c in "ab" for i in range(12))

    config = mltl.load_config(cfg)
    _, domain, idx, protocol = training_split(config)
    assert protocol == "holdout"
    assert {domain.ids[i] for i in idx} == {k for k, v in made.items() if v == "train"}

    domains = datacheck.apply_duplicate_groups(config, load_domains(config, mltl.get_registry()))
    stage_cfg = config.stages[0].first
    dom = domains[domain_key(stage_cfg)]
    part, _ = datacheck.stage_partition(config, 0, stage_cfg, dom)
    assert {dom.ids[i]: str(part[i]) for i in range(len(dom))} == made


def test_rank_and_data_check_use_a_saved_split_file(folder, tmp_path):
    # a split file that the stratified dealer would never make: the first images of each class are the test
    split_file = tmp_path / "fixed.csv"
    rows = [("id", "label", "split")]
    for c in "ab":
        names = [f"{c}/{c}{i}{s}" for i in range(12) for s in (".png", "_twin.jpg")]
        rows += [(n, c, "test" if k < 6 else "val" if k < 12 else "train") for k, n in enumerate(names)]
    split_file.write_text("".join(",".join(r) + "\n" for r in rows))
    wanted = {r[0]: r[2] for r in rows[1:]}
    cfg = tmp_path / "file.toml"
    cfg.write_text(CONFIG.format(root=folder, extra=f', file = "{split_file}"'))
    config = mltl.load_config(cfg)

    _, domain, idx, _ = training_split(config)
    assert {domain.ids[i] for i in idx} == {k for k, v in wanted.items() if v == "train"}

    dom = load_domains(config, mltl.get_registry())[domain_key(config.stages[0].first)]
    part, _ = datacheck.stage_partition(config, 0, config.stages[0].first, dom)
    assert {dom.ids[i]: str(part[i]) for i in range(len(dom))} == wanted

    report = datacheck.check_config(config, mltl.get_registry())
    counts = report["domains"][0]["splits"]
    assert {s: sum(counts[s].values()) for s in counts} == {"train": 24, "val": 12, "test": 12}


def test_validate_refuses_what_run_refuses_before_training(folder, tmp_path, capsys):
    """Leakage and a split the data cannot make stop `mltl run` before training; `mltl validate` says so too."""
    leaky = tmp_path / "leaky.toml"
    leaky.write_text(CONFIG.format(root=folder, extra=""))  # twins straddle the splits
    assert cli.main(["validate", str(leaky)]) == 2
    assert "data leakage" in capsys.readouterr().err
    with pytest.raises(mltl.UserError, match="data leakage"):
        mltl.run(leaky, out=tmp_path / "never", device="cpu")
    assert not (tmp_path / "never").exists()

    too_many_folds = tmp_path / "folds.toml"
    too_many_folds.write_text(CONFIG.format(root=folder, extra=", group_near_duplicates = true").replace(
        'protocol = "holdout"', 'protocol = "kfold", folds = 20'))
    assert cli.main(["validate", str(too_many_folds)]) == 2
    err = capsys.readouterr().err
    assert "fold" in err and "Traceback" not in err
    with pytest.raises(mltl.UserError):
        mltl.run(too_many_folds, out=tmp_path / "never", device="cpu")
