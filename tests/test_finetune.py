"""Fine-tuning methods (docs/finetuning.md): layer-wise / differential learning rates through our schedule,
gradual unfreezing, linear probing then fine-tuning, L2-SP toward the stage's starting weights; frozen
groups (and their BatchNorm statistics) bit-identical throughout; exact resume."""

import math

import pytest
import torch

import mltl
from mltl import ConfigError, FreezePolicy, get_registry
from mltl.training import train as train_mod
from mltl.builtins import fractal_domain
from mltl.config import InputConfig, TrainConfig
from mltl.data.domain import prepare_images
from mltl.networks.finetune import FineTuning
from mltl.networks.network import HeadSpec, build_network, derive, make_spec
from mltl.training.train import TensorData, _lr_factor, fit

SIZE = 56
INP = InputConfig(size=SIZE, channels=1)


@pytest.fixture(scope="module")
def data():
    """Real generated images (fractal categories), 3 classes x 8, grey 56 px."""
    dom = fractal_domain(classes=3, images_per_class=8, seed=5, channels=1, image_size=SIZE)
    x = prepare_images(dom.images, size=SIZE, channels=1)
    y = torch.from_numpy(dom.labels)
    return TensorData(x, y), dom.classes


def gfe2(classes, head=HeadSpec(), seed=0):
    torch.manual_seed(seed)
    return build_network(make_spec("gfe-2", {"batch_norm": True}, 1, SIZE, head, classes), get_registry())


def state(net):
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def changed_groups(net, before, after):
    """Layer groups with any tensor (weights, biases, BatchNorm running statistics) that differs."""
    out = set()
    for g, paths in net.groups.items():
        for k in before:
            if k.startswith(tuple(p + "." for p in paths)) and not torch.equal(before[k], after[k]):
                out.add(g)
    return out


def capture_optimizer(monkeypatch):
    made = []
    real = train_mod.make_optimizer

    def spy(net, cfg, tuning=None):
        opt = real(net, cfg, tuning)
        made.append(opt)
        return opt

    monkeypatch.setattr(train_mod, "make_optimizer", spy)
    return made


def test_layerwise_decay_gives_the_documented_rate_per_group_at_every_scheduler_step(data, monkeypatch):
    train, classes = data
    net = gfe2(classes, head=HeadSpec(dense=(16,)))
    net.set_frozen(FreezePolicy("C1-C2").resolve(net, get_registry()))
    cfg = TrainConfig(val_every=100, epochs=5, batch_size=12, optimizer="sgd", lr=0.02, lr_decay=0.5, group_lr={"C3": 3.0},
                      schedule="cosine", warmup_epochs=1)
    order = net.group_names()  # C1..C5, F1, F2, N1, classifier
    assert order == ["C1", "C2", "C3", "C4", "C5", "F1", "F2", "N1", "classifier"]
    expected_base = {g: 0.02 * 0.5 ** (len(order) - 1 - i) * (3.0 if g == "C3" else 1.0) for i, g in enumerate(order)}
    made = capture_optimizer(monkeypatch)
    seen = []
    res = fit(net, train, train, cfg, INP, classes=classes, seed=1,
              on_epoch=lambda e, row: seen.append({g["group"]: g["lr"] for g in made[0].param_groups}))
    opt = made[0]
    # one optimizer group per trainable layer group, classifier first; the policy-frozen C1, C2 have none
    assert [g["group"] for g in opt.param_groups] == list(reversed(order[2:]))
    assert [g["initial_lr"] for g in opt.param_groups] == pytest.approx([expected_base[g] for g in reversed(order[2:])])
    factor = _lr_factor(cfg)
    for epoch, lrs in enumerate(seen):  # after epoch e's scheduler step: the rates of epoch e + 1
        for g, lr in lrs.items():
            assert lr == pytest.approx(expected_base[g] * factor(epoch + 1), rel=1e-12), (epoch, g)
    # the history's lr is the classifier's rate in that epoch
    for epoch, row in enumerate(res.history):
        assert row["lr"] == pytest.approx(expected_base["classifier"] * factor(epoch))
    # C3's rate is lr * 0.5^6 * 3 whatever the policy: k counts every group in network order
    assert expected_base["C3"] == pytest.approx(0.02 * 0.5 ** 6 * 3)


def test_without_methods_training_is_unchanged_one_param_group(data, monkeypatch):
    train, classes = data
    made = capture_optimizer(monkeypatch)
    fit(gfe2(classes), train, train, TrainConfig(val_every=100, epochs=1, batch_size=12), INP, classes=classes, seed=0)
    assert len(made[0].param_groups) == 1


def test_gradual_unfreezing_groups_join_at_the_right_epochs_and_policy_frozen_never(data):
    train, classes = data
    net = gfe2(classes)
    net.set_frozen(frozenset({"C1"}))
    cfg = TrainConfig(val_every=100, epochs=4, batch_size=12, optimizer="adamw", lr=1e-3, unfreeze_every=1)
    snaps = [state(net)]
    grads = []
    fit(net, train, train, cfg, INP, classes=classes, seed=2,
        on_epoch=lambda e, row: (snaps.append(state(net)),
                                 grads.append({g for g in net.groups if all(p.requires_grad for p in net.group_parameters(g))})))
    # head alone in epoch 0, then F2, F1, C5 join (deepest first), one per epoch
    expected = [{"classifier"}, {"classifier", "F2"}, {"classifier", "F2", "F1"}, {"classifier", "F2", "F1", "C5"}]
    for epoch in range(4):
        assert changed_groups(net, snaps[epoch], snaps[epoch + 1]) == expected[epoch], epoch
        assert grads[epoch] == expected[epoch]
    # C1 (policy) and the groups still waiting (C2-C4) are bit-identical, BatchNorm statistics included
    for k in snaps[0]:
        if k.startswith(("trunk.C1.", "trunk.C2.", "trunk.C3.", "trunk.C4.")):
            assert torch.equal(snaps[0][k], snaps[-1][k]), k
    # after training: back to the policy alone
    assert net.frozen == {"C1"}
    assert all(p.requires_grad for g in net.groups if g != "C1" for p in net.group_parameters(g))
    assert not any(p.requires_grad for p in net.group_parameters("C1"))
    assert not net.get_submodule("trunk.C1.1").training


def test_linear_probe_then_finetune_only_the_head_changes_during_the_probe(data):
    train, classes = data
    net = gfe2(classes, head=HeadSpec(dense=(16,)))
    cfg = TrainConfig(val_every=100, epochs=3, batch_size=12, optimizer="sgd", lr=0.01, probe_epochs=2)
    snaps = [state(net)]
    bn_modes = []
    fit(net, train, train, cfg, INP, classes=classes, seed=3,
        on_epoch=lambda e, row: (snaps.append(state(net)), bn_modes.append(net.get_submodule("trunk.C3.1").training)))
    assert changed_groups(net, snaps[0], snaps[1]) == {"N1", "classifier"}
    assert changed_groups(net, snaps[1], snaps[2]) == {"N1", "classifier"}
    assert changed_groups(net, snaps[2], snaps[3]) == set(net.group_names())  # everything trains in epoch 3


def test_waiting_groups_keep_batchnorm_in_eval_mode(data):
    train, classes = data
    net = gfe2(classes)
    tuning = FineTuning(net, TrainConfig(val_every=100, epochs=3, unfreeze_every=2))
    tuning.begin_epoch(0)
    net.train()
    assert not net.get_submodule("trunk.C5.1").training  # waiting: eval, statistics frozen
    tuning.begin_epoch(2)  # F2 joined at epoch 2; C5 joins at 2 + 2*2 = 6
    net.train()
    assert tuning.joins == {"F2": 2, "F1": 4, "C5": 6, "C4": 8, "C3": 10, "C2": 12, "C1": 14}
    assert not net.get_submodule("trunk.C5.1").training
    tuning.end()
    net.train()
    assert net.get_submodule("trunk.C5.1").training


def _chain_pair(classes):
    """A trained 'earlier stage' and the next stage's network derived from it (new classes)."""
    parent = gfe2(("p", "q", "r", "s"), seed=4)
    with torch.no_grad():  # an earlier stage's weights: anything but the child's fresh initialisation
        for p in parent.parameters():
            p.add_(0.05 * torch.randn_like(p))
    torch.manual_seed(9)
    child, _ = derive(parent, get_registry(), classes=classes, head=None, in_chans=1, image_size=SIZE)
    return parent, child


def test_l2sp_anchor_is_the_earlier_stage_and_pulls_weights_toward_it(data):
    train, classes = data
    distances = {}
    for l2sp in (None, 5.0):
        parent, child = _chain_pair(classes)
        w0 = {k: v.clone() for k, v in parent.state_dict().items() if k.startswith("trunk.")}
        cfg = TrainConfig(val_every=100, epochs=3, batch_size=12, optimizer="sgd", lr=0.05, weight_decay=1e-3, l2sp=l2sp)
        if l2sp:
            tuning = FineTuning(child, cfg)
            anchored = {id(p) for p, _ in tuning.anchored}
            named = dict(child.named_parameters())
            # anchored: exactly the inherited trunk, at the earlier stage's values; the new classifier is not
            assert {n for n, p in named.items() if id(p) in anchored} == {n for n in named if n.startswith("trunk.")}
            for p, a in tuning.anchored:
                name = next(n for n, q in named.items() if q is p)
                assert torch.equal(a, w0[name])
            groups = {g["group"]: g["weight_decay"] for g in tuning.param_groups(cfg.lr, cfg.weight_decay)}
            assert groups["classifier"] == 1e-3 and groups["C1"] == 0.0  # no decay toward 0 on anchored weights
        fit(child, train, train, cfg, INP, classes=classes, seed=5)
        params = dict(child.named_parameters())  # the weights (BatchNorm running statistics are no parameters)
        distances[l2sp] = math.sqrt(sum(float((params[k].detach() - w0[k]).pow(2).sum()) for k in w0 if k in params))
    assert 0 < distances[5.0] < 0.8 * distances[None], distances


def test_l2sp_penalty_value(data):
    _, classes = data
    _, child = _chain_pair(classes)
    cfg = TrainConfig(l2sp=0.3, l2sp_beta=0.1)
    tuning = FineTuning(child, cfg)
    assert float(tuning.penalty()) == pytest.approx(0.05 * sum(float(p.pow(2).sum()) for p in tuning.plain))
    with torch.no_grad():
        child.get_submodule("trunk.C2.0").weight.add_(0.2)
    w = child.get_submodule("trunk.C2.0").weight
    expected = 0.5 * 0.3 * 0.04 * w.numel() + 0.05 * sum(float(p.pow(2).sum()) for p in tuning.plain)
    assert float(tuning.penalty()) == pytest.approx(expected, rel=1e-5)
    # a frozen parameter is a constant: it adds nothing
    child.set_frozen(frozenset({"C2"}))
    assert float(tuning.penalty()) == pytest.approx(0.05 * sum(float(p.pow(2).sum()) for p in tuning.plain))



def _interrupted_after_two_epochs(net, train, classes, cfg, tmp_path):
    """Train ``net`` until a stop request after epoch 2 (as SIGTERM does); the checkpoint it saved."""
    ckpt = tmp_path / "checkpoint.pt"

    def stop_after_two(epoch, row):
        train_mod.stop_requested = epoch == 2

    try:
        with pytest.raises(train_mod.Interrupted):
            fit(net, train, train, cfg, INP, classes=classes, seed=6, on_epoch=stop_after_two, checkpoint=ckpt,
                checkpoint_seconds=1e9)
    finally:
        train_mod.stop_requested = False
    assert ckpt.is_file()
    return ckpt

def test_resume_mid_stage_with_every_method_is_exact(data, tmp_path):
    train, classes = data
    cfg = TrainConfig(val_every=100, epochs=4, batch_size=12, optimizer="sgd", lr=0.02, lr_decay=0.7, unfreeze_every=1,
                      probe_epochs=1, l2sp=0.5, l2sp_beta=0.01)

    def fresh():
        _, child = _chain_pair(classes)
        child.set_frozen(frozenset({"C1"}))
        return child

    ref = fresh()
    fit(ref, train, train, cfg, INP, classes=classes, seed=6)
    ckpt = _interrupted_after_two_epochs(fresh(), train, classes, cfg, tmp_path)
    resumed = fresh()  # as the chain does on --resume: the stage's network anew, then the checkpoint
    fit(resumed, train, train, cfg, INP, classes=classes, seed=6, checkpoint=ckpt)
    for k, v in ref.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_unknown_group_in_group_lr_and_a_frozen_head_are_config_errors(tmp_path):
    from mltl import load_config, validate

    path = tmp_path / "c.toml"
    path.write_text("""
[run]
name = "x"
[input]
size = 56
[[stages]]
name = "s"
domain = { plugin = "fractal", classes = 3, images_per_class = 5 }
backbone = "gfe-2"
train = { group_lr = { C9 = 0.1 } }
""")
    with pytest.raises(ConfigError, match=r'stages\[0\]\.train\.group_lr: no layer group "C9" in this network \(groups in order: C1, C2'):
        validate(load_config(path))
    with pytest.raises(ConfigError, match=r"stages\[0\]\.train\.probe_epochs: the freeze policy froze the whole head"):
        validate(load_config(path, ["stages.s.train.group_lr={}", "stages.s.train.probe_epochs=2",
                                    "stages.s.freeze=classifier"]))


@pytest.mark.parametrize("damage, words", [
    (lambda s: s.pop("optimizer"), "KeyError"),
    (lambda s: s["model"].update({k: torch.zeros(3) for k in list(s["model"])[:1]}), "RuntimeError"),
    (lambda s: s.update(epoch=-1), "epoch -1"),
    (lambda s: s.update(epoch=999), "epoch 999"),
])
def test_a_checkpoint_missing_a_key_or_with_a_wrong_shape_or_epoch_is_one_line(data, tmp_path, damage, words):
    """A checkpoint that loads (no pickle trouble) but does not fit the stage: one line naming it, never a
    traceback and never a silently wrong resume."""
    train, classes = data
    cfg = TrainConfig(val_every=100, epochs=4, batch_size=12, optimizer="sgd", lr=0.02)
    ckpt = _interrupted_after_two_epochs(_chain_pair(classes)[1], train, classes, cfg, tmp_path)
    state = torch.load(ckpt, weights_only=True)
    damage(state)
    torch.save(state, ckpt)
    _, fresh = _chain_pair(classes)
    with pytest.raises(mltl.UserError, match="damaged training checkpoint") as info:
        fit(fresh, train, train, cfg, INP, classes=classes, seed=6, checkpoint=ckpt)
    assert words in str(info.value) and "\n" not in str(info.value) and "delete it" in str(info.value)


def test_adamw_uses_the_fused_kernel_and_takes_the_reference_step(data):
    """AdamW is built with the fused kernel (about twice as fast on CPU for GFE-I, docs/performance.md); its
    steps are the reference implementation's up to float rounding, and they do change the weights."""
    train, classes = data

    def plain():  # no BatchNorm: a conv bias before BatchNorm has a zero gradient, which Adam turns into noise
        torch.manual_seed(0)
        return build_network(make_spec("gfe-2", {}, 1, SIZE, HeadSpec(dense=(16,)), classes), get_registry())

    net, ref = plain(), plain()
    cfg = TrainConfig(epochs=1, batch_size=12, optimizer="adamw", lr=0.01, weight_decay=0.05)
    opt = train_mod.make_optimizer(net, cfg)
    assert opt.defaults["fused"] is True
    ref_opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=0.01, weight_decay=0.05)
    x = train.x[:12].float() / 255
    for _ in range(3):
        for model, o in ((net, opt), (ref, ref_opt)):
            o.zero_grad()
            torch.nn.functional.cross_entropy(model(x), train.y[:12]).backward()
            o.step()
    for (name, a), b in zip(net.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)  # a step moves a weight by ~0.01
    changed = False
    for a, b in zip(net.parameters(), plain().parameters()):
        changed |= not torch.equal(a, b)
    assert changed
