"""Networks on real tensors: shapes, named groups, freezing (weights and BatchNorm statistics), handing down.
The GFE networks' own sizes and layer names are tested in plugins/mltl-gfe/tests/test_gfe.py."""

import pytest
import torch

from mltl import ConfigError, FreezePolicy, get_registry
from mltl.networks.network import HeadSpec, build_network, derive, make_spec


def net(backbone="gfe-2", size=64, classes=("a", "b", "c"), head=HeadSpec(), **options):
    spec = make_spec(backbone, options, 1, size, head, classes)
    return build_network(spec, get_registry())


def test_freeze_ranges_and_named_policies():
    n = net(head=HeadSpec(dense=(8, 8)))
    reg = get_registry()
    assert FreezePolicy("C1-C3").resolve(n, reg) == {"C1", "C2", "C3"}
    assert FreezePolicy("C1,F2").resolve(n, reg) == {"C1", "F2"}
    assert FreezePolicy("none").resolve(n, reg) == set()
    assert FreezePolicy("all-but-classifier").resolve(n, reg) == set(n.group_names()) - {"classifier"}
    with pytest.raises(ConfigError, match=r'no layer group "C9"'):
        FreezePolicy("C1-C9").resolve(n, reg)
    with pytest.raises(ConfigError, match="runs backwards"):
        FreezePolicy("C3-C1").resolve(n, reg)


def _train_steps(n, steps=3):
    opt = torch.optim.SGD([p for p in n.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        n.train()
        x = torch.randn(8, 1, 64, 64, generator=g) * 2 + 0.5
        y = torch.randint(0, 3, (8,), generator=g)
        loss = torch.nn.functional.cross_entropy(n(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_frozen_weights_and_batchnorm_statistics_do_not_change():
    torch.manual_seed(0)
    n = net("gfe-2", batch_norm=True)
    n.set_frozen(frozenset({"C1", "C2"}))
    before = {k: v.clone() for k, v in n.state_dict().items()}
    _train_steps(n)
    after = n.state_dict()
    for key in before:
        same = torch.equal(before[key], after[key])
        if key.startswith(("trunk.C1.", "trunk.C2.")):
            assert same, f"frozen {key} changed"  # weights, biases, BN running mean/var and counters
        elif key.endswith(("weight", "running_mean")):
            assert not same, f"trainable {key} did not change"
    bn = n.get_submodule("trunk.C1.1")
    assert isinstance(bn, torch.nn.BatchNorm2d) and not bn.training  # still eval after train()
    assert n.get_submodule("trunk.C3.1").training


def test_handing_down_keeps_trunk_and_replaces_head():
    torch.manual_seed(0)
    parent = net("gfe-1", classes=("a", "b", "c", "d", "e"))
    child, note = derive(parent, get_registry(), classes=("x", "y", "z"), head=HeadSpec(dense=(16, 8), dropout=0.5),
                         in_chans=1, image_size=64)
    ps, cs = parent.state_dict(), child.state_dict()
    for k in ps:
        if k.startswith("trunk."):
            assert torch.equal(ps[k], cs[k])
    assert child.group_names() == ["C1", "C2", "F1", "N1", "N2", "classifier"]
    assert child.inherited == {"C1", "C2", "F1"}
    assert FreezePolicy("inherited").resolve(child, get_registry()) == {"C1", "C2", "F1"}
    assert "new head" in note
    # same classes, no head table: everything is inherited, the classifier too
    same, note = derive(child, get_registry(), classes=("x", "y", "z"), head=None, in_chans=1, image_size=64)
    assert all(torch.equal(v, same.state_dict()[k]) for k, v in child.state_dict().items())
    assert note.startswith("whole network")
    # new classes: N layers kept, classifier new
    other, _ = derive(child, get_registry(), classes=("p", "q"), head=None, in_chans=1, image_size=64)
    assert torch.equal(other.state_dict()["head.N1.0.weight"], cs["head.N1.0.weight"])
    assert other.head.classifier.out_features == 2


def test_alexnet_loads_a_local_torchvision_checkpoint(tmp_path):
    import torchvision

    torch.manual_seed(1)
    tv = torchvision.models.alexnet(weights=None)
    path = tmp_path / "alexnet.pth"
    torch.save(tv.state_dict(), path)
    n = build_network(make_spec("alexnet", {"weights": str(path)}, 3, 96, HeadSpec(), ("a", "b")), get_registry())
    assert torch.equal(n.get_submodule("trunk.C5.0").weight, tv.features[10].weight)
    assert torch.equal(n.get_submodule("trunk.F2.1").weight, tv.classifier[4].weight)
    grey = build_network(make_spec("alexnet", {"weights": str(path)}, 1, 96, HeadSpec(), ("a", "b")), get_registry())
    assert torch.allclose(grey.get_submodule("trunk.C1.0").weight, tv.features[0].weight.sum(1, keepdim=True))
    # a grey image replicated to RGB gives the same conv1 response in both
    x = torch.rand(1, 1, 96, 96)
    assert torch.allclose(n.trunk.C1[0](x.expand(-1, 3, -1, -1)), grey.trunk.C1[0](x), atol=1e-5)


def test_alexnet_refuses_a_malicious_pickle(tmp_path):
    import pickle

    class Boom:
        def __reduce__(self):
            return (exec, ("open('%s', 'w').write('pwned')" % (tmp_path / "pwned"),))

    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"features.0.weight": Boom()}))
    with pytest.raises(Exception, match="cannot load weights"):
        build_network(make_spec("alexnet", {"weights": str(path)}, 3, 96, HeadSpec(), ("a", "b")), get_registry())
    assert not (tmp_path / "pwned").exists()


def test_val_every_scores_only_every_nth_epoch():
    import math

    from mltl.config import InputConfig, TrainConfig
    from mltl.training.train import TensorData, fit

    torch.manual_seed(0)
    n = net("gfe-1", size=56, classes=("a", "b"))
    g = torch.Generator().manual_seed(0)
    data = TensorData(torch.randint(0, 255, (20, 1, 56, 56), dtype=torch.uint8, generator=g), torch.arange(20) % 2)
    res = fit(n, data, data, TrainConfig(epochs=5, val_every=2, batch_size=10, optimizer="adamw", lr=1e-3),
              InputConfig(), classes=("a", "b"), seed=0)
    scored = [r["epoch"] for r in res.history if not math.isnan(r["val_loss"])]
    assert scored == [2, 4, 5] and res.best_epoch in scored
