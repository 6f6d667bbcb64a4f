import csv
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import mltl
from mltl.deploy.predict import load_stage, predict


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """A chain whose target is a folder of PNG files (generated phantom slices)."""
    from mltl_ct import phantom

    tmp = tmp_path_factory.mktemp("predict")
    images, labels = phantom.generate(["normal", "cyst", "calculi"], 12, size=80, seed=77)
    classes = ["normal", "cyst", "calculi"]
    for i, (img, lab) in enumerate(zip(images, labels)):
        d = tmp / "data" / classes[lab]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"slice{i:03d}.png")
    from tests.conftest import TINY

    cfg = tmp / "c.toml"
    cfg.write_text(TINY.format(target_freeze="C1"))
    config = mltl.load_config(cfg, ["stages.source.backbone=gfe-1", "stages.intermediate.freeze=C1",
                                    f'stages.target.domain={{ plugin = "image-folder", root = "{tmp / "data"}" }}'])
    return mltl.run(config, out=tmp / "run", device="cpu"), tmp / "data"


def test_predict_reproduces_the_stage_predictions(folder_run):
    result, data = folder_run
    with open(result.run_dir / "target" / "predictions.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "test"]
    stage = load_stage(result.run_dir / "target")
    got = dict(predict(stage, [data / r["id"] for r in rows]))
    for r in rows:
        expected = np.array([float(r[f"p_{c}"]) for c in stage.classes])
        np.testing.assert_allclose(got[data / r["id"]], expected, rtol=0, atol=1e-6)


def test_a_run_directory_serves_its_last_stage_in_chain_order(folder_run, tmp_path):
    """Not the stage whose files are newest: a resume that repaired an earlier stage, or a copy, changes times."""
    import os
    import shutil

    result, _ = folder_run
    copy = tmp_path / "copied-run"
    shutil.copytree(result.run_dir, copy)
    now = os.path.getmtime(copy / "target" / "model.json")
    os.utime(copy / "source" / "model.json", (now + 100, now + 100))  # the source looks newest
    assert load_stage(copy).path.name == "target"
    shutil.rmtree(copy / "target")  # an interrupted run: the last finished stage
    assert load_stage(copy).path.name == "intermediate"
    (copy / "config.toml").unlink()
    with pytest.raises(mltl.UserError, match="name a stage directory"):
        load_stage(copy)


@pytest.mark.slow
def test_predict_cli_on_a_folder_writes_csv(folder_run, tmp_path):
    result, data = folder_run
    out = tmp_path / "new.csv"
    proc = subprocess.run([sys.executable, "-m", "mltl", "predict", str(result.run_dir), str(data / "cyst"),
                           "--csv", str(out), "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12 and set(rows[0]) == {"path", "predicted", "p_normal", "p_cyst", "p_calculi"}
    assert all(abs(sum(float(r[k]) for k in r if k.startswith("p_")) - 1) < 1e-5 for r in rows)
    bad = subprocess.run([sys.executable, "-m", "mltl", "predict", str(result.run_dir), str(tmp_path / "nope.png")],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "nope.png: no such file or folder" in bad.stderr


@pytest.mark.parametrize("content", ["[]", "not json", '{"input": {"size": 56, "channels": 1}, "domain": "x"}',
                                     '{"input": {"size": 56, "channels": 1}, "domain": {"plugin": 5, "options": 3}}',
                                     '{"input": {"size": "big"}}'])
def test_a_tampered_model_json_is_one_line(folder_run, tmp_path, capsys, content):
    import shutil

    from mltl import cli

    result, data = folder_run
    stage = tmp_path / "target"
    shutil.copytree(result.run_dir / "target", stage)
    (stage / "model.json").write_text(content)
    assert cli.main(["predict", str(stage), str(data / "cyst"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "model.json: damaged" in err and len(err.splitlines()) == 1
