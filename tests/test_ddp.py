"""DistributedDataParallel through torchrun: 2 gloo processes on the CPU train the same model as 1 process.

With a global batch of B images split into two local batches and DDP's gradient average of each rank's
share of the global batch's mean (mltl.training.distributed), two processes compute the same updates as one process
with batch B, up to the order of float additions -- when nothing depends on the local batch: GFE-I without
BatchNorm and without dropout. Augmentation (per-image flips and rotations drawn per position of the
epoch's order) is on, so its distributed handling is checked too; the last global batch (4 of 36 training
images) is split 2 + 2.
Tolerance: 1e-5 on every probability, loss and metric after 2 epochs. The float32 reordering differences
measured here were about 1e-7; training one process with the local batch size (8) instead of the global
one differs by 1e-3 to 1e-2, so a wrong split or gradient average cannot pass.
"""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5

CONFIG = """
[run]
name = "ddp"
seed = 5

[input]
size = 32
channels = 1

[[stages]]
name = "source"
domain = { plugin = "fractal", classes = 3, images_per_class = 20, seed = 2, channels = 1 }
backbone = "gfe-1"
split = { protocol = "holdout" }
train = { epochs = 2, batch_size = 16, optimizer = "sgd", lr = 0.01, augment = ["hflip", "rotate:10"] }
"""


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "MLTL_QUIET": "1", "OMP_NUM_THREADS": "1", "MLTL_CHECKPOINT_SECONDS": "0",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "MLTL_TEST_WATCH": str(tmp_path / "ddp"), "MLTL_TEST_WRITES": str(tmp_path / "writes")}


def _probs(run: Path) -> list[list[float]]:
    with open(run / "source" / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return [[r["id"], r["split"]] + [float(v) for k, v in r.items() if k.startswith("p_")] for r in rows]


def test_two_gloo_processes_train_what_one_process_trains(tmp_path):
    cfg = tmp_path / "ddp.toml"
    cfg.write_text(CONFIG)
    env = _env(tmp_path)
    ddp = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(ROOT / "tests" / "ddp_worker.py"), "run", str(cfg), "--out", str(tmp_path / "ddp"), "--device", "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    one = subprocess.run([sys.executable, "-m", "mltl", "run", str(cfg), "--out", str(tmp_path / "one"),
                          "--device", "cpu"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    out, err = ddp.communicate(timeout=300)
    assert ddp.returncode == 0, err[-3000:]
    assert one.returncode == 0, one.stderr[-3000:]
    assert out.strip() == str(tmp_path / "ddp")  # rank 0 prints the run directory, rank 1 prints nothing

    a = json.loads((tmp_path / "ddp" / "source" / "history.json").read_text())
    b = json.loads((tmp_path / "one" / "source" / "history.json").read_text())
    assert len(a) == len(b) == 2
    for ra, rb in zip(a, b):
        for k in ("loss", "val_loss", "val_auc", "val_accuracy"):
            assert abs(ra[k] - rb[k]) <= TOL, (k, ra, rb)
    ma = json.loads((tmp_path / "ddp" / "source" / "metrics.json").read_text())
    mb = json.loads((tmp_path / "one" / "source" / "metrics.json").read_text())
    assert ma["best_epoch"] == mb["best_epoch"] and ma["n_images"] == mb["n_images"]
    for k in ("auc_macro", "accuracy", "loss"):
        assert abs(ma[k] - mb[k]) <= TOL, k
    pa, pb = _probs(tmp_path / "ddp"), _probs(tmp_path / "one")
    assert [r[:2] for r in pa] == [r[:2] for r in pb]
    assert max(abs(x - y) for ra, rb in zip(pa, pb) for x, y in zip(ra[2:], rb[2:])) <= TOL
    # the model must have learnt something for the comparison to mean anything
    assert b[0]["loss"] != b[1]["loss"]

    env_json = json.loads((tmp_path / "ddp" / "environment.json").read_text())
    assert "ddp_worker.py" in " ".join(env_json["command"])
    rank0 = json.loads((tmp_path / "writes.0").read_text())
    rank1 = json.loads((tmp_path / "writes.1").read_text())
    assert any("metrics.json" in w for w in rank0)  # the audit hook does see rank 0's writes
    assert rank1 == []  # rank 1 wrote nothing under the run directory
    # plugins' run-event hooks fire once per run (on rank 0), like the reporters, not once per process
    events0 = json.loads((tmp_path / "writes.events.0").read_text())
    assert "stage_finished source" in events0 and "epoch_ended source 1" in events0
    assert json.loads((tmp_path / "writes.events.1").read_text()) == []
    assert not (tmp_path / "ddp" / ".lock").exists()


def test_each_rank_takes_a_strided_share_of_every_global_batch(monkeypatch):
    from mltl.training import distributed

    for world, n, b in ((2, 36, 16), (3, 50, 16), (4, 9, 8)):
        shares = []
        for rank in range(world):
            monkeypatch.setattr(distributed, "_info", distributed.DistInfo(rank=rank, world_size=world))
            shares.append(distributed.batches(n, b))
        starts = [(i, j) for i, j, _ in shares[0]]
        assert all([(i, j) for i, j, _ in s] == starts for s in shares)  # every rank steps through the same batches
        for k, (i, j) in enumerate(starts):
            got = sorted(p for s in shares for p in range(n)[s[k][2]])
            assert got == list(range(i, j))  # the ranks' shares make up the global batch, once each
            assert min(len(range(n)[s[k][2]]) for s in shares) >= 2
        kept = {i for i, _ in starts}
        assert all(i in kept for i in range(0, n, b) if (min(i + b, n) - i) // world >= 2)
    monkeypatch.setattr(distributed, "_info", distributed.DistInfo())
    assert [(i, j) for i, j, _ in distributed.batches(33, 16)] == [(0, 16), (16, 32)]  # a last batch of 1 is skipped


def test_sync_batch_norm_round_trip_keeps_parameters_and_frozen_layers():
    import torch

    import mltl
    from mltl.training import distributed
    from mltl.networks.network import HeadSpec, build_network, make_spec

    net = build_network(make_spec("gfe-1", {"batch_norm": True}, 1, 32, HeadSpec(), ("a", "b")), mltl.get_registry())
    net.set_frozen(frozenset({"C1"}))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    params = {n: p for n, p in net.named_parameters()}
    originals = distributed.to_sync_batch_norm(net)
    assert originals and all(isinstance(net.get_submodule(n), torch.nn.SyncBatchNorm) for n in originals)
    assert {n: p for n, p in net.named_parameters()} == params  # the same Parameter objects: the optimizer's
    net.train()
    bns = {n: net.get_submodule(n) for n in originals}
    frozen = [n for n in bns if any(n == p or n.startswith(p + ".") for p in net.groups["C1"])]
    assert frozen and all(not bns[n].training for n in frozen)  # frozen BatchNorm stays in eval mode
    assert any(bns[n].training for n in bns if n not in frozen)
    distributed.from_sync_batch_norm(net, originals)
    assert all(type(net.get_submodule(n)) is cls for n, cls in originals.items())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
