"""Streaming a domain that does not fit the device budget: the same training, batch by batch from the host.

A domain backed by a memory-mapped .npy file (as a plugin or the decode cache provides it) is trained once
resident (the default budget) and once streamed (a budget of a few kilobytes forces it to stay on the host
and be gathered, resized from 48 to 32 px and converted from RGB to grey per batch, by the loader
thread). With augmentation (per-image geometry, intensity and noise) and the balanced sampler on, both
runs must give exactly the same history and predictions on the CPU.
"""

import logging

import numpy as np
import pytest
import torch

import mltl
from mltl import Domain, hookimpl
from mltl.data.domain import prepare_images
from mltl.data.stream import HostImages, load_images

CONFIG = """
[run]
name = "stream"
seed = 4
{budget}

[input]
size = 32
channels = 1

[[stages]]
name = "source"
domain = {{ plugin = "mm-fractal", folder = "{folder}" }}
backbone = "gfe-1"
split = {{ protocol = "holdout" }}
train = {{ epochs = 2, batch_size = 8, optimizer = "adamw", lr = 0.002, sampler = "balanced", augment = ["hflip", "rotate:15", "crop:0.7", "intensity:0.2", "noise:0.03"] }}
"""


@pytest.fixture
def memmap_plugin(fresh_plugins, tmp_path):
    from mltl.builtins import fractal_domain

    def mm_fractal(folder: str) -> Domain:
        """Images in a .npy file opened with mmap_mode="r": never read whole by mltl when streaming."""
        dom = fractal_domain(classes=3, images_per_class=12, seed=9, channels=3, size=48)
        path = tmp_path / "images.npy"
        if not path.exists():
            np.save(path, dom.images)
        images = np.load(path, mmap_mode="r")
        return Domain(classes=dom.classes, images=images, labels=dom.labels, ids=dom.ids)

    class Plugin:
        @hookimpl
        def register_domains(self, register):
            register("mm-fractal", mm_fractal)

    mltl.register_plugin(Plugin(), name="mm-plugin")
    return fresh_plugins


def _run(tmp_path, name, budget, monkeypatch):
    from mltl.running import chain

    seen = []
    real = chain.load_images

    def spy(images, **kw):
        out = real(images, **kw)
        seen.append((type(images), out))
        return out

    monkeypatch.setattr(chain, "load_images", spy)
    cfg = tmp_path / f"{name}.toml"
    cfg.write_text(CONFIG.format(budget=budget, folder=tmp_path))
    # beside the domain's folder, not inside it (mltl refuses a run directory inside a folder a domain reads)
    result = mltl.run(cfg, out=tmp_path.parent / f"{tmp_path.name}-{name}", device="cpu")
    return result.run_dir, seen


@pytest.mark.slow
def test_streamed_run_equals_resident_run(memmap_plugin, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="mltl.data.stream")
    resident, seen_r = _run(tmp_path, "resident", "", monkeypatch)
    streamed, seen_s = _run(tmp_path, "streamed", "device_memory_budget_gb = 0.00001", monkeypatch)
    assert isinstance(seen_r[0][1], torch.Tensor)
    assert seen_s[0][0] is np.memmap and isinstance(seen_s[0][1], HostImages)
    assert seen_s[0][1].source is not None and isinstance(seen_s[0][1].source, np.memmap)
    assert any("streaming 36 images" in r.message for r in caplog.records)
    for f in ("history.json", "predictions.csv"):
        a = (resident / "source" / f).read_text()
        b = (streamed / "source" / f).read_text()
        if f == "history.json":  # equal but for the seconds each epoch took
            import json

            a = [{k: v for k, v in r.items() if k != "seconds"} for r in json.loads(a)]
            b = [{k: v for k, v in r.items() if k != "seconds"} for r in json.loads(b)]
        assert a == b, f


def test_host_images_read_equals_prepare_images(tmp_path):
    rng = np.random.default_rng(0)
    src = rng.integers(0, 256, (10, 3, 40, 40), dtype=np.uint8)
    np.save(tmp_path / "x.npy", src)
    mm = np.load(tmp_path / "x.npy", mmap_mode="r")
    full = prepare_images(src, size=24, channels=1)
    view = load_images(mm, size=24, channels=1, device=torch.device("cpu"), device_budget_gb=1e-9)
    assert isinstance(view, HostImages) and not view.prepared
    sub = view[np.array([7, 2, 5, 3])]
    assert torch.equal(sub.read(np.array([3, 0, 1])), full[[3, 7, 2]])
    batches = list(sub.batches([np.array([0, 1]), np.array([3, 2])]))
    assert torch.equal(torch.cat(batches), full[[7, 2, 3, 5]])
    assert torch.equal(torch.cat(list(view.chunks(4))), full)
    resident = load_images(mm, size=24, channels=1, device=torch.device("cpu"))  # fits: a tensor
    assert isinstance(resident, torch.Tensor) and torch.equal(resident, full)


def test_loader_errors_reach_the_training_loop():
    src = np.zeros((4, 1, 8, 8), np.uint8)
    view = HostImages(src, np.arange(4), size=8, channels=1, device=torch.device("cpu"), prepared=True)
    it = view.batches([np.array([0, 1]), np.array([9])])  # position 9 does not exist
    assert next(it).shape == (2, 1, 8, 8)
    with pytest.raises(IndexError):
        next(it)


def test_sources_already_at_the_input_size_are_only_gathered(tmp_path):
    rng = np.random.default_rng(1)
    src = rng.integers(0, 256, (9, 1, 16, 16), dtype=np.uint8)
    np.save(tmp_path / "y.npy", src)
    mm = np.load(tmp_path / "y.npy", mmap_mode="r")
    view = load_images(mm, size=16, channels=1, device=torch.device("cpu"), device_budget_gb=1e-9)
    assert view.prepared and torch.equal(view.read(np.array([8, 0, 4])), torch.from_numpy(src[[8, 0, 4]]))
    # what CUDA streaming uses when the prepared images fit the host budget: a host tensor, gathered by index
    host = HostImages(torch.from_numpy(src), np.arange(9), size=16, channels=1, device=torch.device("cpu"),
                      prepared=True)[np.array([3, 5])]
    assert torch.equal(torch.cat(list(host.chunks(1))), torch.from_numpy(src[[3, 5]]))
