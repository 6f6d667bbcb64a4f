"""mltl data check and the leakage check of mltl run (docs/data-check.md)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import mltl
from mltl import cli
from mltl.data import datacheck
from mltl.data.domain import Domain, make_splits

ROOT = Path(__file__).resolve().parents[1]


def kidney_subset(shared_data, dest, per_class=40):
    """The first ``per_class`` files (by name) of each ct_kidney class: runs of neighbouring slices."""
    for cls in ("Cyst", "Normal", "Stone", "Tumor"):
        (dest / cls).mkdir(parents=True)
        for f in sorted((shared_data / "ct_kidney" / cls).iterdir())[:per_class]:
            shutil.copy(f, dest / cls / f.name)
    return dest


def check_json(capsys, *args):
    rc = cli.main(["data", "check", *map(str, args), "--json"])
    return rc, json.loads(capsys.readouterr().out)


def test_kidney_copy_reports_counts_and_near_duplicate_groups(shared_data, tmp_path, capsys):
    root = kidney_subset(shared_data, tmp_path / "kidney")
    rc, rep = check_json(capsys, root)
    dom = rep["domains"][0]
    assert dom["classes"] == {"Cyst": 40, "Normal": 40, "Stone": 40, "Tumor": 40}
    assert sum(sum(v.values()) for v in dom["splits"].values()) == 160
    assert dom["near_duplicate_groups"] >= 4 and dom["images_in_duplicate_groups"] >= 40
    assert all(len(g["classes"]) == 1 for g in dom["duplicate_groups"])  # no group mixes two classes
    assert dom["sizes"] == [{"size": "256x256", "mode": "L", "count": 160}]
    # neighbouring slices split at random straddle train and test: exit 3 (problems found), named as leakage
    assert rc == 3 and [p["kind"] for p in rep["problems"]] == ["leak-splits"]
    # split by duplicate groups, nothing straddles; but 40 slices of a class are only 2 or 3 scans here,
    # too few groups for three splits, and that is said too
    rc, rep = check_json(capsys, root, "--group-near-duplicates")
    assert rc == 3 and {p["kind"] for p in rep["problems"]} == {"split"}
    assert "image group(s)" in rep["problems"][0]["message"] or "no training images" in rep["problems"][0]["message"]


@pytest.mark.slow
def test_whole_kidney_folder_grouped_by_near_duplicates(shared_data, capsys):
    """`mltl data check ../shared/data/ct_kidney`: the issue's check, on the real 1,914 slices."""
    rc, rep = check_json(capsys, shared_data / "ct_kidney", "--group-near-duplicates")
    dom = rep["domains"][0]
    assert dom["classes"] == {"Cyst": 420, "Normal": 500, "Stone": 494, "Tumor": 500}
    # 48 groups with Pillow 11-13; each about one scan series, none mixing two classes
    assert 40 <= dom["near_duplicate_groups"] <= 60 and dom["images_in_duplicate_groups"] > 1850
    assert all(len(g["classes"]) == 1 and len(g["splits"]) == 1 for g in dom["duplicate_groups"])
    assert rc == 0 and rep["ok"]


def test_corrupt_zero_byte_and_cross_class_duplicate_are_all_named(shared_data, tmp_path, capsys):
    root = kidney_subset(shared_data, tmp_path / "kidney", per_class=12)
    good = sorted((root / "Normal").iterdir())[0]
    (root / "Cyst" / "cut.jpg").write_bytes(good.read_bytes()[:2000])  # truncated JPEG
    (root / "Stone" / "empty.jpg").write_bytes(b"")
    shutil.copy(good, root / "Tumor" / "copy_of_normal.jpg")
    rc, rep = check_json(capsys, root, "--group-near-duplicates")
    assert rc == 3
    unreadable = {p["file"]: p["message"] for p in rep["problems"] if p["kind"] == "unreadable"}
    assert set(unreadable) == {"Cyst/cut.jpg", "Stone/empty.jpg"}
    assert "truncated" in unreadable["Cyst/cut.jpg"] and "empty (0 bytes)" in unreadable["Stone/empty.jpg"]
    conflicts = [p["message"] for p in rep["problems"] if p["kind"] == "conflicting-labels"]
    assert conflicts and all(f"Normal/{good.name}" in m and "Tumor/copy_of_normal.jpg" in m for m in conflicts)
    assert {e["kind"] for e in rep["exact_duplicates"]} == {"bytes", "pixels"}
    # the table names them too
    assert cli.main(["data", "check", str(root)]) == 3
    out = capsys.readouterr().out
    for name in ("cut.jpg", "empty.jpg", "copy_of_normal.jpg"):
        assert name in out


def test_tiny_classes_and_odd_sizes(tmp_path, capsys):
    rng = np.random.default_rng(1)
    for cls, n in (("a", 30), ("b", 1)):
        (tmp_path / cls).mkdir()
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (24, 24), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "c").mkdir()
    Image.fromarray(rng.integers(0, 255, (90, 50, 3), dtype=np.uint8)).save(tmp_path / "a" / "big.png")
    rc, rep = check_json(capsys, tmp_path)
    assert rc == 3
    small = [p["message"] for p in rep["problems"] if p["kind"] == "small-class"]
    assert any('"b" has 1 readable' in m for m in small) and any('"c" has 0 readable' in m for m in small)
    odd = {w["kind"]: w["message"] for w in rep["warnings"]}
    assert "a/big.png" in odd["odd-size"] and "50x90" in odd["odd-size"] and "RGB" in odd["odd-mode"]


def test_perceptual_hash_and_near_duplicate_rule():
    rng = np.random.default_rng(0)
    base = np.zeros((4, 96, 96), dtype=np.uint8)
    yy, xx = np.mgrid[:96, :96]
    for k in range(4):  # four different smooth "anatomies" with texture
        base[k] = (np.clip(128 + 60 * np.sin(xx / (6 + 3 * k)) * np.cos(yy / (9 + k)), 0, 255)
                   + rng.integers(0, 30, (96, 96))).clip(0, 255)
    twin = np.clip(base[0].astype(int) + rng.integers(-3, 4, (96, 96)) + 10, 0, 255).astype(np.uint8)  # brighter, noisy
    images = np.concatenate([base, twin[None]])
    thumbs = datacheck.thumbnails(images)
    h = datacheck.perceptual_hashes(thumbs)
    assert h.dtype == np.uint64 and int(datacheck.popcount64(h[0] ^ h[4])) <= 2
    pairs = datacheck.near_duplicate_pairs(thumbs)
    assert pairs.tolist() == [[0, 4]]


def test_demo_phantom_has_no_false_near_duplicates():
    """The demos' phantom stages are different images of one synthetic anatomy: no alarm across or within."""
    from mltl_ct import ct_phantom_domain

    inter = ct_phantom_domain(["normal", "cyst", "calculi"], 40, seed=11, image_size=64)
    target = ct_phantom_domain(["normal", "cyst", "tumour"], 40, seed=29, image_size=64)
    thumbs = datacheck.thumbnails(np.concatenate([inter.images, target.images]))
    h = datacheck.perceptual_hashes(thumbs)
    d = datacheck.popcount64(h[:, None] ^ h[None, :])
    assert (d[np.triu_indices(len(h), 1)] <= datacheck.MAX_HAMMING).sum() > 100  # the hash alone would cry wolf
    assert len(datacheck.near_duplicate_pairs(thumbs)) == 0


def test_group_near_duplicates_keeps_twins_in_one_split():
    rng = np.random.default_rng(3)
    imgs = rng.integers(0, 255, (40, 32, 32), dtype=np.uint8)
    imgs[20:] = imgs[:20]  # every image twice
    dom = Domain(classes=("a", "b"), images=imgs, labels=np.arange(40) % 2, ids=[f"i{k}" for k in range(40)])
    grouped = Domain(classes=dom.classes, images=imgs, labels=dom.labels, ids=dom.ids,
                     groups=datacheck.near_duplicate_groups(dom))
    assert len(set(grouped.groups)) == 20
    split = make_splits(grouped, val=0.2, test=0.2, seed=0)
    where = {int(i): s for s, idx in split.items() for i in idx}
    assert all(where[k] == where[k + 20] for k in range(20))


# ---------------------------------------------------------------- the leakage check of mltl run

LEAK = """
[run]
name = "leak"
seed = 1

[input]
size = 32
channels = 1

[[stages]]
name = "intermediate"
domain = {{ plugin = "image-folder", root = "{inter}" }}
backbone = "gfe-1"
train = {{ epochs = 1, batch_size = 16 }}

[[stages]]
name = "target"
init = "intermediate"
domain = {{ plugin = "image-folder", root = "{target}" }}
split = {{ protocol = "holdout"{extra} }}
train = {{ epochs = 1, batch_size = 16 }}
"""


def noise_folder(root, classes, n, seed):
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(root / c / f"{c}{i}.png")
    return root


@pytest.fixture
def leaky(tmp_path):
    inter = noise_folder(tmp_path / "inter", ["x", "y"], 15, 1)
    target = noise_folder(tmp_path / "target", ["a", "b"], 15, 2)
    # every target image of class b is an intermediate image: some are in the target's val/test split
    for i in range(15):
        shutil.copy(inter / "x" / f"x{i}.png", target / "b" / f"b{i}.png")

    def make(extra=""):
        cfg = tmp_path / "leak.toml"
        cfg.write_text(LEAK.format(inter=inter, target=target, extra=extra))
        return cfg

    return make


def test_leakage_across_stages_stops_run(leaky, tmp_path):
    cfg = leaky()
    out = tmp_path / "runs" / "x"
    proc = subprocess.run([sys.executable, "-m", "mltl", "run", str(cfg), "--out", str(out)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert "\n" not in err and "Traceback" not in err
    assert "data leakage" in err and "stage target" in err and "intermediate" in err
    assert "allow_leakage" in err and "group_near_duplicates" in err
    assert not out.exists()  # stopped before the run directory was made
    rc = cli.main(["data", "check", str(cfg)])
    assert rc == 3


@pytest.mark.slow
def test_leakage_allowed_when_the_config_says_so(leaky, tmp_path):
    cfg = leaky(extra=", allow_leakage = true")
    out = tmp_path / "runs" / "ok"
    result = mltl.run(cfg, out=out)
    assert result.stage("target").metrics["n_test"] > 0
    # the audit's split is the one the run made (same function, same arguments)
    config = mltl.load_config(cfg)
    from mltl.running.plan import domain_key, load_domains

    domains = load_domains(config, mltl.get_registry())
    stage_cfg = config.stages[1].first
    part, protocol = datacheck.stage_partition(config, 1, stage_cfg, domains[domain_key(stage_cfg)])
    dom = domains[domain_key(stage_cfg)]
    saved = dict(line.split(",")[0::2] for line in (out / "target" / "splits.csv").read_text().splitlines()[1:])
    assert protocol == "holdout" and {dom.ids[i]: str(part[i]) for i in range(len(dom))} == saved


def test_duplicates_within_a_stage_stop_run_unless_grouped(tmp_path):
    root = noise_folder(tmp_path / "data", ["a", "b"], 12, 5)
    for i in range(6):  # near-identical twins (re-saved as JPEG) inside each class
        for c in ("a", "b"):
            Image.open(root / c / f"{c}{i}.png").save(root / c / f"{c}{i}_twin.jpg", quality=95)
    cfg = tmp_path / "c.toml"
    cfg.write_text(f"""
[run]
name = "dups"
[input]
size = 32
[[stages]]
name = "only"
domain = {{ plugin = "image-folder", root = "{root}" }}
backbone = "gfe-1"
split = {{ protocol = "holdout", seed = 4 }}
train = {{ epochs = 1 }}
""")
    config = mltl.load_config(cfg)
    from mltl.running.plan import load_domains

    domains = load_domains(config, mltl.get_registry())
    with pytest.raises(mltl.UserError, match=r"data leakage: stage only: \d+ duplicate group\(s\) .* straddle"):
        datacheck.audit_leakage(config, domains)
    grouped = mltl.load_config(cfg, ["stages.only.split.group_near_duplicates=true"])
    out = datacheck.audit_leakage(grouped, domains)
    dom = next(iter(out.values()))
    assert len(dom) == 36 and len(set(dom.groups)) == 24  # each twin pair one group
    assert dom.groups[dom.ids.index("a/a3.png")] == dom.groups[dom.ids.index("a/a3_twin.jpg")]


@pytest.mark.slow
def test_kidney_example_runs_end_to_end(shared_data, tmp_path):
    kidney = shared_data / "ct_kidney"
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "mltl", "-q", "run", str(ROOT / "examples" / "kidney_ct.toml"), "--out", str(out),
         "--set", f"stages.intermediate.domain.root={kidney}", "--set", f"stages.target.domain.root={kidney}",
         "--set", "input.size=48", "--set", "stages.source.backbone=gfe-1",
         "--set", "stages.source.domain.images_per_class=10", "--set", "stages.intermediate.freeze=C1",
         "--set", "stages.target.split.protocol=holdout",
         *(a for s in ("source", "intermediate", "target") for a in ("--set", f"stages.{s}.train.epochs=1"))],
        capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((out / "target" / "metrics.json").read_text())
    assert metrics["classes"] == ["Normal", "Tumor"] and metrics["n_test"] > 50
    rows = (out / "target" / "splits.csv").read_text().splitlines()[1:]
    assert len(rows) == 1000 and all(r.split(",")[0].split("/")[0] in ("Normal", "Tumor") for r in rows)


def test_every_finding_says_how_to_fix_it(leaky, tmp_path, capsys):
    rc, rep = check_json(capsys, leaky())
    assert rc == 3
    fixes = {p["kind"]: p["fix"] for p in rep["problems"]}
    assert "stages.target.split.allow_leakage = true" in fixes["leak-stages"]
    assert "stage intermediate" in fixes["leak-stages"]
    assert cli.main(["data", "check", str(leaky())]) == 3
    out = capsys.readouterr().out
    assert "how to fix:" in out and "allow_leakage" in out
    # a folder: duplicates across classes and a class too small, each with its remedy
    folder = noise_folder(tmp_path / "folder", ["a", "b"], 6, 3)
    shutil.copy(folder / "a" / "a0.png", folder / "b" / "copy.png")
    (folder / "c").mkdir()
    rc, rep = check_json(capsys, folder)
    fixes = {p["kind"]: p["fix"] for p in rep["problems"]}
    assert "delete the other" in fixes["conflicting-labels"] and "add images" in fixes["small-class"]
