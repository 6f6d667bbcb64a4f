"""train.compile: torch.compile of the training forward, with a fallback to eager and one warning."""

import shutil
import warnings

import numpy as np
import pytest
import torch

import mltl
from mltl.config import InputConfig, TrainConfig
from mltl.networks.network import HeadSpec, build_network, make_spec
from mltl.training.train import TensorData, fit, predict_proba

INP = InputConfig(size=24, channels=1)
CLASSES = ("a", "b", "c")


def _train(**cfg):
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(48, 1, 24, 24, generator=g) * 255).to(torch.uint8)
    y = torch.arange(48) % 3
    torch.manual_seed(0)
    net = build_network(make_spec("gfe-1", {}, 1, 24, HeadSpec(), CLASSES), mltl.get_registry())
    result = fit(net, TensorData(x[:36], y[:36]), TensorData(x[36:], y[36:]),
                 TrainConfig(epochs=2, batch_size=12, schedule="constant", augment=("hflip",), **cfg), INP,
                 classes=CLASSES, seed=1)
    return result, predict_proba(net, x, INP)


def test_a_failing_compile_falls_back_to_eager_with_one_warning(monkeypatch):
    from mltl.training import train

    calls = []

    def broken(model, cfg):
        def run(*a, **k):
            calls.append(1)
            raise RuntimeError("simulated inductor failure: no C compiler\nsecond line")
        return run

    monkeypatch.setattr(train, "_compile", broken)
    eager, p_eager = _train()
    with pytest.warns(RuntimeWarning, match=r"torch.compile failed \(RuntimeError: simulated inductor failure: "
                                            r"no C compiler\); training continues without compiling") as rec:
        fell_back, p_fell = _train(compile=True)
    assert len([w for w in rec if "torch.compile" in str(w.message)]) == 1 and calls == [1]
    assert [r["loss"] for r in fell_back.history] == [r["loss"] for r in eager.history]
    assert np.array_equal(p_fell, p_eager)


def test_errors_after_the_first_step_are_not_swallowed(monkeypatch):
    from mltl.training import train

    def flaky(model, cfg):
        n = []

        def run(x):
            n.append(1)
            if len(n) > 1:
                raise ValueError("a real bug in step 2")
            return model(x)
        return run

    monkeypatch.setattr(train, "_compile", flaky)
    with pytest.raises(ValueError, match="a real bug in step 2"):
        _train(compile=True)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                    reason="torch.compile (inductor) on the CPU needs a C compiler")
def test_compiled_training_matches_eager_on_cpu():
    eager, p_eager = _train()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback: compilation must work here
        compiled, p_comp = _train(compile=True)
    for a, b in zip(eager.history, compiled.history):
        assert abs(a["loss"] - b["loss"]) < 1e-4 and abs(a["val_loss"] - b["val_loss"]) < 1e-4
    assert np.abs(p_comp - p_eager).max() < 1e-4
