import os
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    os.environ["MLTL_CACHE_DIR"] = str(tmp_path_factory.mktemp("mltl-cache"))
    os.environ["MLTL_QUIET"] = "1"
    yield


@pytest.fixture
def shared_data() -> Path:
    """../shared/data: skipped where absent (a user's fresh clone), a failure under CI=true."""
    if not SHARED_DATA.is_dir():
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but the shared test data is missing at {SHARED_DATA}")
        pytest.skip(f"shared test data not found at {SHARED_DATA} (only present beside the project checkout)")
    return SHARED_DATA


@pytest.fixture
def fresh_plugins():
    """A plugin manager loaded anew for the test, and forgotten after it."""
    from mltl import plugins

    plugins.reset()
    yield plugins
    plugins.reset()


TINY = """
[run]
name = "tiny"
seed = 3

[input]
size = 56
channels = 1

[[stages]]
name = "source"
domain = {{ plugin = "fractal", classes = 3, images_per_class = 15, seed = 1, channels = 1 }}
backbone = {{ sweep = ["gfe-1", "gfe-2"] }}
select_by = "accuracy"
train = {{ epochs = 2, batch_size = 16, optimizer = "adamw", lr = 0.002 }}

[[stages]]
name = "intermediate"
init = "source"
domain = {{ plugin = "ct-phantom", classes = ["normal", "cyst", "calculi"], images_per_class = 15, seed = 11 }}
head = {{ dense = [32, 16], dropout = 0.5 }}
freeze = {{ sweep = ["C1", "C1-C2", "inherited"], select_by = "auc" }}
train = {{ epochs = 2, batch_size = 16, optimizer = "adamw", lr = 0.002 }}

[[stages]]
name = "target"
init = "intermediate"
domain = {{ plugin = "ct-phantom", classes = ["normal", "caroli-focal", "caroli-diffuse"], images_per_class = 12, seed = 23 }}
freeze = "{target_freeze}"
split = {{ protocol = "holdout" }}  # the default for a small last stage is 5-fold (tests/test_protocols.py)
train = {{ epochs = 3, batch_size = 8, optimizer = "adamw", lr = 0.001 }}
"""


@pytest.fixture
def tiny_config(tmp_path):
    def make(target_freeze: str = "none") -> Path:
        path = tmp_path / "tiny.toml"
        path.write_text(TINY.format(target_freeze=target_freeze))
        return path

    return make


def fake_predictions(n, n_classes, separation=1.5, seed=0, decimals=None):
    """Labels and softmax probabilities of a model that is better than chance by ``separation``."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_classes, size=n)
    logits = rng.normal(size=(n, n_classes))
    logits[np.arange(n), labels] += separation
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    if decimals is not None:  # coarse scores: many ties
        probs = np.round(probs, decimals)
    return labels, probs
