"""The final model of a repeated stage: trained on all non-test data, served by predict / export / the next stage,
never evaluated; its training-image record and predict's warning; lean run folders; resume while it trains."""

import csv
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mltl
from mltl.deploy.predict import load_stage, predict
from mltl.running import chain as chain_module
from mltl.running.rundir import load_weights

pytestmark = pytest.mark.slow

CLASSES = ["normal", "cyst", "calculi"]

CHAIN = """
[run]
name = "final"
seed = 5

[input]
size = 56
channels = 1

[[stages]]
name = "source"
domain = {{ plugin = "fractal", classes = 3, images_per_class = 10, seed = 1, channels = 1 }}
backbone = "gfe-1"
train = {{ epochs = 2, batch_size = 16, optimizer = "adamw", lr = 0.002 }}

[[stages]]
name = "intermediate"
init = "source"
domain = {{ plugin = "ct-phantom", classes = ["normal", "cyst", "calculi"], images_per_class = 10, seed = 11 }}
head = {{ dense = [16], dropout = 0.0 }}
freeze = {{ sweep = ["C1", "none"] }}
split = {{ protocol = "holdout", seeds = 2 }}
train = {{ epochs = 3, batch_size = 8, optimizer = "adamw", lr = 0.002 }}

[[stages]]
name = "target"
init = "intermediate"
domain = {{ plugin = "image-folder", root = "{data}" }}
freeze = "inherited"
split = {{ protocol = "kfold", folds = 3 }}
train = {{ epochs = 3, batch_size = 8, optimizer = "adamw", lr = 0.002 }}
"""


def _save_phantoms(folder: Path, per_class: int, seed: int) -> list[Path]:
    from mltl_ct import phantom

    images, labels = phantom.generate(CLASSES, per_class, size=64, seed=seed)
    paths = []
    for i, (img, lab) in enumerate(zip(images, labels)):
        d = folder / CLASSES[lab]
        d.mkdir(parents=True, exist_ok=True)
        paths.append(d / f"slice{i:03d}.png")
        Image.fromarray(img).save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """source (holdout) -> intermediate (holdout, 2 seeds, a freeze sweep) -> target (3-fold, PNG files); the
    Predictions the chain makes are logged (split, number of images)."""
    tmp = tmp_path_factory.mktemp("final")
    _save_phantoms(tmp / "data", 8, seed=77)
    cfg = tmp / "c.toml"
    cfg.write_text(CHAIN.format(data=tmp / "data"))
    made = []
    real = chain_module.Predictions

    def spying(**kw):
        made.append((kw["split"], len(kw["ids"])))
        return real(**kw)

    mp = pytest.MonkeyPatch()
    mp.setattr(chain_module, "Predictions", spying)
    try:
        result = mltl.run(cfg, out=tmp / "run", device="cpu")
    finally:
        mp.undo()
    return result, tmp / "data", made


def _ids(path: Path, splits=("train", "val", "test")) -> set[str]:
    with open(path) as f:
        return {r["id"] for r in csv.DictReader(f) if r["split"] in splits}


def _json(path: Path):
    return json.loads(path.read_text())


def test_kfold_final_model_trained_on_every_image_and_differs_from_every_fold(run):
    result, data, _ = run
    d = result.run_dir / "target"
    record = _json(d / "final" / "model.json")
    every = {p.relative_to(data).as_posix() for p in data.rglob("*.png")}
    assert record["model"] == "final" and record["trained_on"] == len(every) == 24
    assert _ids(d / "final" / "splits.csv", ("train",)) == every  # every image: each was tested once by a fold
    tested = set().union(*(_ids(d / "repeats" / f"fold-{k}" / "splits.csv", ("test",)) for k in (1, 2, 3)))
    assert tested == every
    # epochs: the median of the folds' best epochs (on validation), rounded up; recorded with its rule
    folds = [_json(d / "repeats" / f"fold-{k}" / "metrics.json")["best_epoch"] for k in (1, 2, 3)]
    assert record["best_epochs"] == folds and record["epochs"] == int(np.ceil(np.median(folds)))
    assert "median" in record["epochs_rule"] and len(_json(d / "final" / "history.json")) == record["epochs"]
    final, _ = load_weights(d / "final" / "model.safetensors")
    for k in (1, 2, 3):
        fold, _ = load_weights(d / "repeats" / f"fold-{k}" / "model.safetensors")
        assert any(not torch.equal(final[n], fold[n]) for n in final), f"fold-{k}"
    # the stage's model.json and metrics.json say which model is served, for predict and the report
    served = _json(d / "model.json")["final_model"]
    assert served["folder"] == "final" and served["trained_on"] == 24
    assert _json(d / "metrics.json")["final_model"] == served


def test_holdout_seeds_final_model_trained_on_train_and_val(run):
    result, _, _ = run
    d = result.run_dir / "intermediate"
    record = _json(d / "final" / "model.json")
    rep = d / "repeats" / "seed-1"
    n = _json(rep / "metrics.json")["n_images"]
    assert record["trained_on"] == n["train"] + n["val"]
    assert _ids(d / "final" / "splits.csv") == _ids(rep / "splits.csv", ("train", "val"))
    assert not _ids(d / "final" / "splits.csv") & _ids(rep / "splits.csv", ("test",))
    # the variant the seeds' selections chose most often
    chosen = [_json(d / "repeats" / f"seed-{k}" / "metrics.json")["selected_variant"] for k in (1, 2)]
    assert record["variant"] == max(["freeze=C1", "freeze=none"], key=lambda v: (chosen.count(v), v == "freeze=C1"))


def test_the_final_model_is_never_evaluated_and_the_numbers_are_the_repeats(run):
    result, _, made = run
    # one test prediction per repeat, none of a final model: 1 (source) + 2 seeds + 3 folds
    assert [s for s, _ in made].count("test") == 6
    for stage, rep in (("intermediate", "seed-1"), ("target", "fold-1")):
        d = result.run_dir / stage
        assert not (d / "final" / "metrics.json").exists() and not (d / "final" / "predictions.csv").exists()
        history = _json(d / "final" / "history.json")
        assert all(r["val_loss"] is None and r["val_auc"] is None for r in history)  # no validation data
        m, r = _json(d / "metrics.json"), _json(d / "repeats" / rep / "metrics.json")
        assert (m["auc_macro"], m["accuracy"], m["n_test"]) == (r["auc_macro"], r["accuracy"], r["n_test"])
        assert (d / "predictions.csv").read_text() == (d / "repeats" / rep / "predictions.csv").read_text()
        assert result.stage(stage).metrics["final_model"]["evaluated"] is False


def test_the_next_stage_starts_from_the_final_model(run):
    result, _, _ = run
    d = result.run_dir
    final, _ = load_weights(d / "intermediate" / "final" / "model.safetensors")
    representative, _ = load_weights(d / "intermediate" / "repeats" / "seed-1" / "model.safetensors")
    assert any(not torch.equal(final[k], representative[k]) for k in final)
    # the target froze everything it inherited: its trunk and N layers are the intermediate final model's
    for model in ("final", "repeats/fold-1", "repeats/fold-2"):
        target, _ = load_weights(d / "target" / model / "model.safetensors")
        inherited = [k for k in final if not k.startswith("head.classifier")]
        assert inherited and all(torch.equal(target[k], final[k]) for k in inherited), model


def test_predict_serves_the_final_model_and_a_repeat_when_named(run):
    result, data, _ = run
    d = result.run_dir / "target"
    stage = load_stage(result.run_dir)  # the run's last stage: its final model
    assert stage.path == d / "final" and stage.record["model"] == "final" and stage.name == "target/final"
    assert load_stage(d).path == d / "final"
    final, _ = load_weights(d / "final" / "model.safetensors")
    assert all(torch.equal(v, final[k]) for k, v in stage.network.state_dict().items())
    # a fold's model, named: it reproduces that fold's test predictions
    fold = load_stage(d / "repeats" / "fold-2")
    assert fold.path == d / "repeats" / "fold-2" and fold.name == "target/repeats/fold-2"
    with open(d / "repeats" / "fold-2" / "predictions.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "test"]
    got = dict(predict(fold, [data / r["id"] for r in rows]))
    for r in rows:
        np.testing.assert_allclose(got[data / r["id"]], [float(r[f"p_{c}"]) for c in fold.classes], atol=1e-6)
    # the export's metadata names the model it holds
    from mltl.deploy.export import export_metadata

    meta = export_metadata(stage)
    assert meta["model"]["model"] == "final" and meta["model"]["trained_on"] == 24 and meta["stage"] == "target/final"


def test_predict_warns_about_exactly_the_inputs_the_model_trained_on(run, tmp_path, caplog):
    result, data, _ = run
    trained = sorted(data.rglob("*.png"))[:3]
    unseen = _save_phantoms(tmp_path / "new", 1, seed=4242)[:2]
    copy = tmp_path / "again.bmp"  # other file bytes, the same pixels
    Image.open(trained[0]).save(copy)
    assert copy.read_bytes() != trained[0].read_bytes()
    inputs = [*trained, *unseen, copy]
    with caplog.at_level(logging.WARNING, logger="mltl.deploy.predict"):
        rows = list(predict(load_stage(result.run_dir / "target"), inputs, batch_size=2))
    assert [p for p, _ in rows] == inputs
    lines = [r.getMessage() for r in caplog.records if r.name == "mltl.deploy.predict"]
    per_input = [line for line in lines if "is byte-identical" in line or "is pixel-identical" in line]
    named = [p for p in inputs if any(line.startswith(f"{p} is ") for line in per_input)]
    assert named == [*trained, copy] and len(per_input) == 4
    assert sum("byte-identical" in line for line in per_input) == 3
    assert any(line.startswith(f"{copy} is pixel-identical") for line in per_input)
    assert "4 of 6 inputs are images target/final trained on (listed above)" in lines[-1]
    # a fold model trained on fewer images: a test image of that fold is no warning
    fold = load_stage(result.run_dir / "target" / "repeats" / "fold-1")
    test_ids = _ids(result.run_dir / "target" / "repeats" / "fold-1" / "splits.csv", ("test",))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mltl.deploy.predict"):
        list(predict(fold, [data / i for i in sorted(test_ids)]))
    assert not [r for r in caplog.records if r.name == "mltl.deploy.predict"]


def test_run_folder_is_lean_once_stages_are_written(run):
    result, _, _ = run
    d = result.run_dir
    assert not list(d.rglob("checkpoint.pt"))
    variants = list((d / "intermediate").rglob("variants/*"))
    assert len(variants) == 4  # two seeds x two freeze variants: records kept, weights gone
    for v in variants:
        assert (v / "variant.json").is_file() and (v / "history.json").is_file()
        assert not (v / "model.safetensors").exists()
    # the selected models stay: each stage's, each repeat's, each final model
    for stage, folders in (("source", [""]), ("intermediate", ["", "final", "repeats/seed-1", "repeats/seed-2"]),
                           ("target", ["", "final", "repeats/fold-1", "repeats/fold-2", "repeats/fold-3"])):
        for folder in folders:
            assert (d / stage / folder / "model.safetensors").is_file(), f"{stage}/{folder}"
            assert (d / stage / folder / "training_images.json").is_file(), f"{stage}/{folder}"


# ---------------------------------------------------------------- resume while the final model trains

ONE_STAGE = """
[run]
name = "resume-final"
seed = 2

[input]
size = 56
channels = 1

[[stages]]
name = "only"
domain = { plugin = "fractal", classes = 2, images_per_class = 12, seed = 1, channels = 1 }
backbone = "gfe-1"
split = { protocol = "kfold", folds = 2 }
# validated after the last epoch only: every fold's best epoch is 8, so the final model trains 8 epochs
train = { epochs = 8, batch_size = 8, optimizer = "adamw", lr = 0.002, val_every = 8 }
"""


def _start(cfg: Path, out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "MLTL_CHECKPOINT_SECONDS": "0"}
    return subprocess.Popen([sys.executable, "-m", "mltl", "run", str(cfg), "--out", str(out), "--device", "cpu",
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_a_run_killed_while_training_the_final_model_resumes_to_the_same_result(tmp_path):
    cfg = tmp_path / "one.toml"
    cfg.write_text(ONE_STAGE)
    killed = _start(cfg, tmp_path / "killed")
    checkpoint = tmp_path / "killed" / "only" / "final" / "checkpoint.pt"
    t0 = time.time()
    while not checkpoint.exists() and killed.poll() is None and time.time() - t0 < 600:
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)  # mid-way through the final model's 8 epochs
    _, err = killed.communicate(timeout=60)
    assert checkpoint.exists(), f"the final model's checkpoint never appeared: {err[-2000:]}"
    assert not (tmp_path / "killed" / "only" / "final" / "model.json").exists()
    ref = _start(cfg, tmp_path / "ref")
    _, err = ref.communicate(timeout=600)
    assert ref.returncode == 0, err
    resumed = _start(cfg, tmp_path / "killed", "--resume")
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    a, b = tmp_path / "ref" / "only", tmp_path / "killed" / "only"
    assert (a / "final" / "model.safetensors").read_bytes() == (b / "final" / "model.safetensors").read_bytes()
    assert _json(a / "final" / "model.json")["epochs"] == 8

    def clean(v):  # without the wall-clock times
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items() if k not in {"train_seconds", "seconds", "train_seconds_total"}}
        return [clean(x) for x in v] if isinstance(v, list) else v

    def same(path):
        return clean(_json(path))

    for name in ("final/history.json", "final/model.json", "metrics.json", "model.json"):
        assert same(a / name) == same(b / name), name
    assert not checkpoint.exists()
    shutil.rmtree(tmp_path / "ref")


def test_a_damaged_final_model_is_trained_again_by_resume(run, tmp_path):
    result, _, _ = run
    copy = tmp_path / "run"
    shutil.copytree(result.run_dir, copy)
    weights = copy / "intermediate" / "final" / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])  # cut off, as by a full disk
    again = mltl.run(copy / "config.toml", out=copy, device="cpu", resume=True)
    assert weights.read_bytes() == good  # trained again, to the same weights (CPU)
    assert (copy / "target" / "metrics.json").read_bytes() == (result.run_dir / "target" / "metrics.json").read_bytes()
    before, after = _json(result.run_dir / "intermediate" / "metrics.json"), _json(copy / "intermediate" / "metrics.json")
    for m in (before, after):
        m["final_model"].pop("train_seconds")
    assert before == after == again.stage("intermediate").metrics | {"final_model": after["final_model"]}
