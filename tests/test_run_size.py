"""Lean run folders: once a stage's record is on disk, sweep variants' weights and checkpoints go
(``[run] keep = "selected"``); ``keep = "all"`` keeps them; ``split.final_model = false`` trains no final model."""

import json

import pytest
import torch

import mltl
from mltl.deploy.predict import load_stage
from mltl.running import rundir
from mltl.running.rundir import StageFiles, copy_stage, link_or_copy_atomic, load_weights, prune_stage, served


def _stage(tmp_path, finished=True):
    """A fake repeated stage with a sweep: root, two repeats with two variants each, a final model."""
    root = StageFiles(tmp_path / "target")
    names = {}
    for folder in (root, root.repeat("seed-1"), root.repeat("seed-2"), root.final):
        folder.root.mkdir(parents=True)
        names[folder.model] = b"selected"
        for label in ("freeze=C1", "freeze=none"):
            v = folder.variant(label)
            v.root.mkdir(parents=True)
            names.update({v.model: b"w", v.history: b"[]", v.variant_record: b"{}", v.checkpoint: b"c"})
    names[root.repeat("seed-1").checkpoint] = b"left over"
    if finished:
        names[root.metrics] = b"{}"
    for path, data in names.items():
        path.write_bytes(data)
    return root


def test_prune_keeps_the_selected_models_and_every_record(tmp_path):
    root = _stage(tmp_path)
    removed = prune_stage(root, "selected")
    assert not list(root.root.rglob("checkpoint.pt"))
    for folder in (root, root.repeat("seed-1"), root.repeat("seed-2"), root.final):
        assert folder.model.read_bytes() == b"selected"
        for v in folder.variants():
            assert not v.model.exists() and v.history.is_file() and v.variant_record.is_file()
    assert len(removed) == 4 * 2 * 2 + 1  # every variant's weights and checkpoint, the left-over checkpoint


def test_prune_waits_for_the_stage_record_and_keep_all_removes_nothing(tmp_path):
    root = _stage(tmp_path / "a", finished=False)
    before = sorted(root.root.rglob("*"))
    assert prune_stage(root, "selected") == [] and sorted(root.root.rglob("*")) == before  # not finished yet
    root = _stage(tmp_path / "b")
    before = sorted(root.root.rglob("*"))
    assert prune_stage(root, "all") == [] and sorted(root.root.rglob("*")) == before


def test_served_is_the_final_model_only_where_model_json_names_it(tmp_path):
    files = StageFiles(tmp_path)
    assert served(files) == files  # no model.json
    files.model_json.write_text(json.dumps({"spec": {}}))
    assert served(files) == files
    files.model_json.write_text(json.dumps({"spec": {}, "final_model": {"folder": "final"}}))
    assert served(files) == files.final


def test_the_stage_copy_of_a_repeat_file_is_a_hard_link_that_a_later_write_separates(tmp_path):
    """A repeated stage's own model is its representative repeat's: one copy on disk, not two (26 MB per
    GFE-I model). Writes replace files, so rewriting one name leaves the other as it was."""
    src, dst = tmp_path / "rep.bin", tmp_path / "stage.bin"
    src.write_bytes(b"weights")
    dst.write_bytes(b"old")
    link_or_copy_atomic(src, dst)
    assert dst.read_bytes() == b"weights" and dst.samefile(src)
    rundir.write_bytes_atomic(dst, b"new")
    assert src.read_bytes() == b"weights" and dst.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep.bin", "stage.bin"]  # no temporary left


def test_without_hard_links_it_copies(tmp_path, monkeypatch):
    def no_links(*_):
        raise OSError("hard links are not supported here")

    monkeypatch.setattr(rundir.os, "link", no_links)
    src, dst = tmp_path / "rep.bin", tmp_path / "stage.bin"
    src.write_bytes(b"weights")
    link_or_copy_atomic(src, dst)
    assert dst.read_bytes() == b"weights" and not dst.samefile(src)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep.bin", "stage.bin"]



def test_a_reused_stage_links_its_weights_and_copies_everything_else(tmp_path):
    """``--reuse`` copies a finished stage: its weights as hard links (no second copy on disk), its records and
    figures as copies, which the reusing run's reporters may rewrite without touching the earlier run."""
    src = tmp_path / "earlier" / "target"
    (src / "repeats" / "fold-1").mkdir(parents=True)
    for rel, data in {"model.safetensors": b"w", "repeats/fold-1/model.safetensors": b"w1", "roc.png": b"png",
                      "metrics.json": b"{}"}.items():
        (src / rel).write_bytes(data)
    dst = tmp_path / "later" / "target"
    dst.parent.mkdir()
    copy_stage(src, dst)
    assert (dst / "model.safetensors").samefile(src / "model.safetensors")
    assert (dst / "repeats/fold-1/model.safetensors").samefile(src / "repeats/fold-1/model.safetensors")
    for name in ("roc.png", "metrics.json"):
        assert (dst / name).read_bytes() == (src / name).read_bytes() and not (dst / name).samefile(src / name)
    (dst / "roc.png").write_bytes(b"redrawn in place")  # as a plugin might
    assert (src / "roc.png").read_bytes() == b"png"


ONE_STAGE = """
[run]
name = "keep-all"
seed = 4
keep = "all"

[input]
size = 56
channels = 1

[[stages]]
name = "only"
domain = { plugin = "fractal", classes = 2, images_per_class = 10, seed = 1, channels = 1 }
backbone = { sweep = ["gfe-1", "gfe-2"] }
split = { protocol = "holdout", seeds = 2, final_model = false }
train = { epochs = 1, batch_size = 8, optimizer = "adamw", lr = 0.002 }
"""


@pytest.mark.slow
def test_keep_all_and_no_final_model_give_the_old_run_folder(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(ONE_STAGE)
    result = mltl.run(cfg, out=tmp_path / "run", device="cpu")
    d = result.run_dir / "only"
    for seed in ("seed-1", "seed-2"):
        for variant in ("backbone=gfe-1", "backbone=gfe-2"):
            assert (d / "repeats" / seed / "variants" / variant / "model.safetensors").is_file()
    assert not (d / "final").exists() and "final_model" not in json.loads((d / "metrics.json").read_text())
    # without a final model the stage serves its representative repeat's model, as before
    stage = load_stage(d)
    assert stage.path == d and stage.record["model"] == "selected (repeat seed-1)"
    rep, _ = load_weights(d / "repeats" / "seed-1" / "model.safetensors")
    assert (d / "model.safetensors").samefile(d / "repeats" / "seed-1" / "model.safetensors")
    assert not (d / "model.json").samefile(d / "repeats" / "seed-1" / "model.json")  # records are copies
    assert all(torch.equal(v, rep[k]) for k, v in stage.network.state_dict().items())
