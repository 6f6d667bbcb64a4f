"""The bad-input catalogue (docs/errors.md): each case gives a one-line message naming the file or key."""

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import mltl
from mltl import get_registry

ROOT = Path(__file__).resolve().parents[1]


def folder(tmp_path, spec):
    """spec: {class: [(filename, bytes or None for a valid PNG)]}."""
    root = tmp_path / "data"
    for cls, files in spec.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for name, content in files:
            path = root / cls / name
            if content is None:
                Image.fromarray(np.random.default_rng(len(name)).integers(0, 255, (20, 20), dtype=np.uint8)).save(path)
            else:
                path.write_bytes(content)
    return root


def load(root, **options):
    return get_registry().create("domain", "image-folder", {"root": str(root), **options},
                                 key="stages[2].domain", extra={"image_size": 16})


def good(n):
    return [(f"img{i}.png", None) for i in range(n)]


def test_empty_class_folder(tmp_path):
    with pytest.raises(mltl.UserError, match=r"class folder .*/b holds no images"):
        load(folder(tmp_path, {"a": good(3), "b": []}))


def test_one_class_only(tmp_path):
    with pytest.raises(mltl.UserError, match=r"has 1 class sub-folder\(s\); a classifier needs at least 2"):
        load(folder(tmp_path, {"a": good(3)}))


def test_zero_byte_file(tmp_path):
    with pytest.raises(mltl.UserError, match=r"cannot read image .*b/empty.png"):
        load(folder(tmp_path, {"a": good(3), "b": good(2) + [("empty.png", b"")]}))


def test_truncated_jpeg(tmp_path):
    import io

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(buf, "JPEG")
    with pytest.raises(mltl.UserError, match=r"cannot read image .*b/cut.jpg"):
        load(folder(tmp_path, {"a": good(3), "b": good(2) + [("cut.jpg", buf.getvalue()[:300])]}))


def test_non_image_file_with_an_image_name(tmp_path):
    with pytest.raises(mltl.UserError, match=r"cannot read image .*a/notes.png"):
        load(folder(tmp_path, {"a": good(2) + [("notes.png", b"patient list, not an image\n")], "b": good(3)}))


def test_mixed_modes_and_sizes_are_converted(tmp_path):
    root = folder(tmp_path, {"a": good(3), "b": good(3)})
    Image.new("RGBA", (40, 30), (200, 10, 10, 128)).save(root / "a" / "rgba.png")
    Image.new("P", (7, 9)).save(root / "b" / "palette.png")
    Image.fromarray(np.full((12, 12), 40000, dtype=np.uint16)).save(root / "b" / "sixteen.png")
    dom = load(root)
    assert dom.images.shape == (9, 16, 16)


def test_too_few_images_for_a_split():
    from mltl.data.domain import Domain, make_splits

    dom = Domain(classes=("a", "b"), images=np.zeros((7, 4, 4), np.uint8), labels=[0] * 5 + [1] * 2,
                 ids=[str(i) for i in range(7)])
    with pytest.raises(mltl.UserError, match=r'class "b" has 2 image group\(s\); a train/validation/test split needs at least 3'):
        make_splits(dom, val=0.2, test=0.2, seed=0, where="x.toml: stages[2]: ")


def test_split_fractions_leave_no_training_images():
    from mltl.data.domain import Domain, make_splits

    dom = Domain(classes=("a", "b"), images=np.zeros((8, 4, 4), np.uint8), labels=[0] * 4 + [1] * 4,
                 ids=[str(i) for i in range(8)])
    with pytest.raises(mltl.UserError, match=r'class "a" has no training images left'):
        make_splits(dom, val=0.5, test=0.5, seed=0)


def test_nan_loss_names_the_epoch_and_a_fix(tmp_path, tiny_config):
    cfg = mltl.load_config(tiny_config(), ["stages.source.backbone=gfe-1", "stages.source.train.optimizer=sgd",
                                           "stages.source.train.lr=1e12"])
    with pytest.raises(mltl.UserError, match=r"training loss became (nan|inf) in epoch 1: lower train.lr"):
        mltl.run(cfg, out=tmp_path / "r", device="cpu")
    import json

    state = json.loads((tmp_path / "r" / "state.json").read_text())
    assert state["state"] == "failed" and "lower train.lr" in state["reason"]
    assert not (tmp_path / "r" / "source" / "metrics.json").exists()  # nothing a later run would trust


def test_every_layer_frozen(tmp_path, tiny_config):
    cfg = mltl.load_config(tiny_config("C1-classifier"), ["stages.source.backbone=gfe-1",
                                                           "stages.intermediate.freeze=C1"])
    with pytest.raises(mltl.UserError, match="every layer is frozen: nothing to train"):
        mltl.run(cfg, out=tmp_path / "r", device="cpu")


def test_malicious_training_checkpoint_is_refused(tmp_path):
    import pickle

    from mltl.training.train import load_checkpoint

    class Boom:
        def __reduce__(self):
            return (exec, (f"open({str(tmp_path / 'pwned')!r}, 'w').write('x')",))

    path = tmp_path / "checkpoint.pt"
    path.write_bytes(pickle.dumps({"version": 1, "model": Boom()}))
    with pytest.raises(mltl.UserError, match=r"checkpoint.pt: damaged or unsafe training checkpoint"):
        load_checkpoint(path)
    assert not (tmp_path / "pwned").exists()


def test_truncated_training_checkpoint(tmp_path):
    import io

    import torch

    from mltl.training.train import load_checkpoint

    buf = io.BytesIO()
    torch.save({"version": 1, "model": {"w": torch.ones(1000)}}, buf)
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(buf.getvalue()[:500])
    with pytest.raises(mltl.UserError, match="delete it to restart this stage"):
        load_checkpoint(path)


def test_weights_of_another_architecture(tmp_path):
    import json

    from mltl.running.rundir import load_network
    from mltl.networks.network import HeadSpec, build_network, make_spec
    from mltl.running.rundir import save_weights_atomic

    small = build_network(make_spec("gfe-1", {}, 1, 56, HeadSpec(), ("a", "b")), get_registry())
    other_spec = make_spec("gfe-2", {}, 1, 56, HeadSpec(), ("a", "b"))
    save_weights_atomic(tmp_path / "model.safetensors", small.state_dict(), {"spec": json.dumps(other_spec)})
    with pytest.raises(mltl.UserError, match=r"model.safetensors: weights do not match the network they describe"):
        load_network(tmp_path / "model.safetensors", get_registry())


def test_cuda_asked_for_without_cuda():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(mltl.UserError, match='device "cuda" was asked for but CUDA is not available'):
        mltl.running.preflight.resolve_device("cuda")


def test_every_catalogue_entry_has_a_test():
    text = (ROOT / "docs" / "errors.md").read_text()
    names = re.findall(r"`((?:plugins/[\w-]+/)?tests/test_\w+\.py)::(\w+)`", text)  # a plugin's tests too
    assert len(names) >= 25
    for file, func in names:
        source = (ROOT / file).read_text()
        assert f"def {func}(" in source, f"docs/errors.md names {file}::{func}, which does not exist"


def test_disk_full_and_out_of_memory_are_one_line(monkeypatch, capsys):
    import errno

    from mltl.cli import commands as cli

    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device", "runs/x/target/model.safetensors")

    monkeypatch.setattr(cli, "_run", full)
    assert cli.main(["run", "x.toml"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "disk full while writing runs/x/target/model.safetensors" in err

    def oom(args):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(cli, "_run", oom)
    assert cli.main(["run", "x.toml"]) == 2
    assert "out of GPU memory: lower stages.<name>.train.batch_size" in capsys.readouterr().err
