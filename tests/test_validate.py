"""`mltl validate` refuses every config that `mltl run` refuses before training, with the same one line
(docs/errors.md: the config rows, the data rows a config can cause, leakage, fine-tuning and freezing).
Both go through mltl.running.preflight.prepare; these cases keep them from drifting apart again."""

import numpy as np
import pytest
from PIL import Image

from mltl import cli

BASE = """
[run]
name = "v"
seed = 1
[input]
size = 32
[[stages]]
name = "source"
domain = { plugin = "fractal", classes = 3, images_per_class = 8, seed = 1 }
backbone = "gfe-1"
train = { epochs = 1, batch_size = 8 }
[[stages]]
name = "target"
init = "source"
domain = { plugin = "image-folder", root = "FOLDER" }
split = { protocol = "holdout" }
train = { epochs = 1, batch_size = 8 }
"""


def folder(root, classes=("a", "b"), n=10, seed=0, twins=False):
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            img = Image.fromarray(rng.integers(0, 255, (24, 24), dtype=np.uint8))
            img.save(root / c / f"{c}{i}.png")
            if twins:
                img.save(root / c / f"{c}{i}_twin.jpg", quality=95)
    return root


# (catalogue row, edit of the base config, overrides, words the one-line message must hold)
CASES = [
    ("1", lambda t: t.replace("[input]", "[input\n"), [], "invalid TOML"),
    ("3", lambda t: t.replace('init = "source"', 'init = "source"\nfreze = "C1"'), [], 'did you mean "freeze"'),
    ("4", lambda t: t.replace("epochs = 1, batch_size = 8 }\n[[", "epohcs = 1 }\n[["), [], 'did you mean "epochs"'),
    ("5", lambda t: t.replace("epochs = 1, batch_size = 8 }\n[[", "epochs = -1 }\n[["), [], "greater than 0"),
    ("6", lambda t: t.replace('protocol = "holdout"', 'protocol = "holdout", test = 1.5'), [], "fraction"),
    ("7", lambda t: t.replace('init = "source"', 'init = "sorce"'), [], "names no earlier stage"),
    ("8", lambda t: t.replace('init = "source"', 'init = "source"\nbackbone = "gfe-1"'), [], "exactly one of"),
    ("9", lambda t: t.replace('init = "source"', 'init = "source"\nfreeze = { sweep = [] }'), [], "sweep"),
    ("10", lambda t: t, ["stages.taget.train.epochs=5"], 'did you mean "target"'),
    ("11", lambda t: t, ["stages.target.train.epochs=-3"], "greater than 0"),
    ("12", lambda t: t.replace('plugin = "fractal"', 'plugin = "fractl"'), [], 'did you mean "fractal"'),
    ("13", lambda t: t.replace('init = "source"', 'init = "source"\nfreeze = "C1-C9"'), [], "C9"),
    ("14", lambda t: t.replace('backbone = "gfe-1"', 'backbone = "gfe-2"').replace("size = 32", "size = 16"), [],
     "too small"),
    ("15", lambda t: t.replace("classes = 3,", 'classes = "3",'), [], "expected int"),
    ("15a", lambda t: t.replace("epochs = 1, batch_size = 8 }\n[[", 'epochs = 1, augment = ["rotat:10"] }\n[['),
     [], 'did you mean "rotate'),
    ("16", lambda t: t.replace("FOLDER", "FOLDER/nowhere"), [], "is not a folder"),
    ("18", lambda t: t.replace("FOLDER", "FOLDER/a"), [], "at least 2"),
    ("24", lambda t: t.replace("FOLDER", "SMALL"), [], "needs at least 3"),
    ("25", lambda t: t.replace('protocol = "holdout"', 'protocol = "holdout", val = 0.5, test = 0.5'), [],
     "no training images"),
    ("kfold", lambda t: t.replace('protocol = "holdout"', 'protocol = "kfold", folds = 30'), [], "fold"),
    ("L2", lambda t: t.replace("FOLDER", "TWINS"), [], "data leakage"),
    ("T6", lambda t: t.replace("epochs = 1, batch_size = 8 }\n[[", "epochs = 1, group_lr = { C9 = 0.1 } }\n[["),
     [], "C9"),
    ("T7", lambda t: t.replace('init = "source"', 'init = "source"\nfreeze = "classifier"').replace(
        'split = { protocol = "holdout" }\ntrain = { epochs = 1', 'split = { protocol = "holdout" }\ntrain = '
        '{ epochs = 1, probe_epochs = 1'), [], "classifier"),
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("validate")
    return {"FOLDER": folder(root / "ok"), "SMALL": folder(root / "small", n=2, seed=1),
            "TWINS": folder(root / "twins", seed=2, twins=True)}


def write(tmp_path, data, text):
    for key in ("TWINS", "SMALL", "FOLDER"):
        text = text.replace(key, str(data[key]))
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_the_base_config_passes_validate(data, tmp_path, capsys):
    assert cli.main(["validate", str(write(tmp_path, data, BASE))]) == 0
    assert ": OK (2 stages" in capsys.readouterr().out


@pytest.mark.parametrize("row, edit, overrides, words", CASES, ids=[c[0] for c in CASES])
def test_validate_refuses_what_run_refuses_before_training(row, edit, overrides, words, data, tmp_path, capsys):
    cfg = write(tmp_path, data, edit(BASE))
    sets = [x for o in overrides for x in ("--set", o)]
    assert cli.main(["validate", str(cfg), *sets]) == 2
    validate_err = capsys.readouterr().err
    out = tmp_path / "run"
    assert cli.main(["run", str(cfg), *sets, "--out", str(out), "--device", "cpu"]) == 2
    run_err = capsys.readouterr().err
    assert words in validate_err, validate_err
    assert validate_err.strip().splitlines()[-1] == run_err.strip().splitlines()[-1]
    assert "Traceback" not in validate_err + run_err
    assert not out.exists()  # refused before the run directory was made, let alone a stage trained
