"""examples/samala_baseline.toml: the AlexNet chain of Samala et al. on the demo data, and its layer groups."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mltl import ConfigError, FreezePolicy, get_registry
from mltl.networks.network import HeadSpec, build_network, make_spec

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "samala_baseline.toml"


def test_alexnet_groups_and_samala_freeze_policies():
    net = build_network(make_spec("alexnet", {}, 1, 64, HeadSpec(), ("a", "b")), get_registry())
    assert net.group_names() == ["C1", "C2", "C3", "C4", "C5", "F1", "F2", "classifier"]
    reg = get_registry()
    assert FreezePolicy("C1-C5").resolve(net, reg) == {f"C{i}" for i in range(1, 6)}
    # Samala's "C1-F4 frozen" (only the output layer trains) is C1-F2 = all-but-classifier here
    assert FreezePolicy("C1-F2").resolve(net, reg) == FreezePolicy("all-but-classifier").resolve(net, reg)
    with pytest.raises(ConfigError, match=r'no layer group "F4".*groups in order: C1, C2, C3, C4, C5, F1, F2'):
        FreezePolicy("C1-F4").resolve(net, reg)


@pytest.mark.slow
def test_samala_baseline_example_runs_on_the_demo_data(tmp_path):
    tiny = ["--set", "stages.source.domain.images_per_class=8", "--set", "stages.source.train.epochs=1",
            "--set", "stages.intermediate.domain.images_per_class=8", "--set", "stages.intermediate.train.epochs=1",
            "--set", "stages.target.domain.images_per_class=8", "--set", "stages.target.train.epochs=1",
            "--set", "stages.target.split.protocol=holdout"]  # one split, not the small target's 5 folds
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "mltl", "run", str(EXAMPLE), "--out", str(out), "--device", "cpu",
                           *tiny], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    inter = json.loads((out / "intermediate" / "selection.json").read_text())
    assert [c["variant"] for c in inter["candidates"]] == ["freeze=C1", "freeze=C1-C3", "freeze=C1-C5"]
    target = json.loads((out / "target" / "metrics.json").read_text())
    assert target["selected_variant"] in ("freeze=C1", "freeze=C1-F2")
    assert 0 <= target["auc_macro"] <= 1
