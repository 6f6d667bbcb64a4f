"""Transferability ranking (docs/rank.md): LogME against a direct computation of the evidence, its sanity on
features that do and do not separate the labels, and `mltl rank` on trained stages."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from mltl.evaluation.rank import log_evidence_direct, logme


def onehot(y):
    return (y[:, None] == np.unique(y)[None, :]).astype(float)


@pytest.mark.parametrize("n, d", [(40, 6), (12, 30)])  # more images than features, and fewer
def test_logme_equals_the_evidence_computed_from_its_definition(n, d):
    rng = np.random.default_rng(n + d)
    f = rng.normal(size=(n, d)) @ rng.normal(size=(d, d))  # correlated features
    y = np.argmax(f @ rng.normal(size=(d, 3)) + rng.normal(scale=2.0, size=(n, 3)), axis=1)  # noisy labels
    score, alpha, beta = logme(f, y, return_params=True)
    t = onehot(y)
    # the marginal likelihood y ~ N(0, F F^T / alpha + I / beta), evaluated directly (no SVD, no fixed point)
    direct = [log_evidence_direct(f, t[:, c], alpha[c], beta[c]) / n for c in range(t.shape[1])]
    assert score == pytest.approx(float(np.mean(direct)), rel=1e-9, abs=1e-9)
    # alpha, beta maximise it: any nearby (alpha, beta) gives less evidence. A column the features do not
    # explain at all has its maximum at alpha -> infinity (w = 0): there the evidence only flattens out.
    interior = 0
    for c in range(t.shape[1]):
        best = log_evidence_direct(f, t[:, c], alpha[c], beta[c])
        if alpha[c] > 1e6:
            assert log_evidence_direct(f, t[:, c], alpha[c] / 1.2, beta[c]) <= best + 1e-9
            continue
        interior += 1
        for fa, fb in ((1.2, 1), (1 / 1.2, 1), (1, 1.2), (1, 1 / 1.2), (1.2, 1.2)):
            assert log_evidence_direct(f, t[:, c], alpha[c] * fa, beta[c] * fb) < best - 1e-9
    assert interior >= 1


def test_features_that_separate_the_labels_score_higher_than_random_ones():
    rng = np.random.default_rng(1)
    n = 90
    y = np.repeat(np.arange(3), 30)
    separating = np.concatenate([3 * onehot(y) + rng.normal(scale=0.5, size=(n, 3)), rng.normal(size=(n, 13))], 1)
    weak = np.concatenate([1.0 * onehot(y) + rng.normal(scale=0.5, size=(n, 3)), rng.normal(size=(n, 13))], 1)
    random = rng.normal(size=(n, 16))
    s_sep, s_weak, s_rand = logme(separating, y), logme(weak, y), logme(random, y)
    assert s_sep > s_weak > s_rand
    # permuting the labels destroys what the features know
    assert logme(separating, rng.permutation(y)) < s_sep - 0.3
    assert all(math.isfinite(s) for s in (s_sep, s_weak, s_rand))


RANK_CHAIN = """
[run]
name = "rank-tiny"
seed = 2

[input]
size = 56
channels = 1

[[stages]]
name = "source"
domain = { plugin = "fractal", classes = 3, images_per_class = 12, seed = 1, channels = 1 }
backbone = "gfe-1"
train = { epochs = 2, batch_size = 12, optimizer = "adamw", lr = 0.002 }

[[stages]]
name = "target"
init = "source"
domain = { plugin = "ct-phantom", classes = ["normal", "cyst", "calculi"], images_per_class = 12, seed = 11 }
head = { dense = [16] }
split = { protocol = "holdout" }
train = { epochs = 4, batch_size = 12, optimizer = "adamw", lr = 0.003 }
"""


@pytest.mark.slow
def test_mltl_rank_scores_the_finished_stages_of_a_run(tmp_path):
    import mltl

    cfg = tmp_path / "c.toml"
    cfg.write_text(RANK_CHAIN)
    run_dir = mltl.run(cfg, out=tmp_path / "run", device="cpu").run_dir
    out = tmp_path / "rank.json"
    proc = subprocess.run([sys.executable, "-m", "mltl", "rank", str(cfg), str(run_dir), "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "LogME on target (ct-phantom)" in proc.stdout
    result = json.loads(out.read_text())
    names = [r["candidate"] for r in result["ranking"]]
    assert sorted(names) == sorted([str(run_dir / "source"), str(run_dir / "target")])
    assert result["images"] == len([1 for line in (run_dir / "target" / "splits.csv").read_text().splitlines()
                                    if line.endswith(",train")])
    dims = {r["candidate"]: r["feature_dim"] for r in result["ranking"]}
    assert dims[str(run_dir / "target")] == 16 and dims[str(run_dir / "source")] == 512  # classifier inputs
    scores = [r["logme"] for r in result["ranking"]]
    assert scores == sorted(scores, reverse=True)
    # the stage trained on these very labels represents them better than the fractal source does
    assert names[0] == str(run_dir / "target")
    # a candidate from another input size is a one-line error
    bad = subprocess.run([sys.executable, "-m", "mltl", "rank", str(cfg), str(run_dir), "--set", "input.size=64"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "was trained on 1-channel 56 px images" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
