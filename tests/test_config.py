import tomllib

import pytest

from mltl import ConfigError, UserError, load_config
from mltl.config import apply_overrides, dump_toml, parse_config

BASE = """
[run]
name = "t"

[[stages]]
name = "source"
domain = { plugin = "fractal" }
backbone = "gfe-1"

[[stages]]
name = "target"
init = "source"
domain = { plugin = "ct-phantom" }
"""


def write(tmp_path, text):
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_typo_in_stage_key_names_file_key_and_suggestion(tmp_path):
    p = write(tmp_path, BASE.replace('init = "source"', 'init = "source"\nfreze = "C1"'))
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value) == f'{p}: stages[1].freze: unknown key, did you mean "freeze"?'


def test_typo_in_nested_table_and_top_level(tmp_path):
    p = write(tmp_path, BASE + 'train = { epohcs = 3 }\n')
    with pytest.raises(ConfigError, match=r'stages\[1\]\.train\.epohcs: unknown key, did you mean "epochs"'):
        load_config(p)
    p = write(tmp_path, "[rnu]\nname='x'\n" + BASE)
    with pytest.raises(ConfigError, match=r'rnu: unknown key, did you mean "run"'):
        load_config(p)


@pytest.mark.parametrize("train, message", [
    ("{ epochs = -1 }", r"stages\[1\]\.train\.epochs: -1 must be greater than 0"),
    ('{ epochs = "ten" }', r"stages\[1\]\.train\.epochs: expected an integer, got a string 'ten'"),
    ("{ lr = true }", r"stages\[1\]\.train\.lr: expected a number"),
    ('{ optimizer = "adam" }', r"train\.optimizer: 'adam' is not one of 'sgd', 'adamw', did you mean \"adamw\""),
])
def test_wrong_values(tmp_path, train, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, BASE + f"train = {train}\n"))


def test_split_fraction_outside_unit_interval(tmp_path):
    with pytest.raises(ConfigError, match=r"stages\[1\]\.split\.test: 1\.5 must be a fraction"):
        load_config(write(tmp_path, BASE + "split = { test = 1.5 }\n"))


def test_init_must_name_an_earlier_stage(tmp_path):
    with pytest.raises(ConfigError, match=r'stages\[1\]\.init: "sorce" names no earlier stage; earlier stages: source'):
        load_config(write(tmp_path, BASE.replace('init = "source"', 'init = "sorce"')))
    text = BASE.replace('init = "source"', 'init = "target"')
    with pytest.raises(ConfigError, match=r'"target" is this stage itself'):
        load_config(write(tmp_path, text))


def test_backbone_xor_init(tmp_path):
    with pytest.raises(ConfigError, match="exactly one of backbone"):
        load_config(write(tmp_path, BASE.replace('init = "source"', 'init = "source"\nbackbone = "gfe-2"')))


def test_bad_toml_gives_line(tmp_path):
    with pytest.raises(UserError, match=r"invalid TOML: .*line 3"):
        load_config(write(tmp_path, "[run]\nname = 't'\nseed = = 3\n"))


def test_missing_file():
    with pytest.raises(UserError, match="nope.toml: config file not found"):
        load_config("nope.toml")


def test_overrides_by_stage_name_index_and_types(tmp_path):
    p = write(tmp_path, BASE)
    c = load_config(p, ["stages.target.train.epochs=5", "stages.0.train.lr=0.1", "run.seed=9",
                        "stages.target.freeze=C1-C2", 'stages.target.train.augment=["hflip"]'])
    target = c.stage("target").first
    assert target.train.epochs == 5 and target.freeze == "C1-C2" and target.train.augment == ("hflip",)
    assert c.stage("source").first.train.lr == 0.1 and c.run.seed == 9


def test_override_errors_are_checked_like_the_file(tmp_path):
    p = write(tmp_path, BASE)
    with pytest.raises(UserError, match=r'no stage "taget", did you mean "target"'):
        load_config(p, ["stages.taget.train.epochs=5"])
    with pytest.raises(ConfigError, match=r'stages\[1\]\.epochs: unknown key'):
        load_config(p, ["stages.target.epochs=5"])
    with pytest.raises(UserError, match="expected KEY=VALUE"):
        load_config(p, ["stages.target.train.epochs"])


def test_sweeps_expand_to_cartesian_product_with_labels(tmp_path):
    text = BASE + 'freeze = { sweep = ["C1", "C1-C2"], select_by = "accuracy" }\ntrain = { lr = { sweep = [0.1, 0.01] } }\n'
    c = load_config(write(tmp_path, text))
    stage = c.stage("target")
    assert stage.select_by == "accuracy"
    assert [label for label, _ in stage.variants] == [
        "freeze=C1,train.lr=0.1", "freeze=C1,train.lr=0.01", "freeze=C1-C2,train.lr=0.1", "freeze=C1-C2,train.lr=0.01"]
    assert stage.variants[3][1].freeze == "C1-C2" and stage.variants[3][1].train.lr == 0.01
    assert stage.swept == ("freeze", "train.lr")


def test_backbone_sweep_and_options(tmp_path):
    text = BASE.replace('backbone = "gfe-1"', 'backbone = { sweep = ["gfe-1", { name = "gfe-2", batch_norm = true }] }')
    stage = load_config(write(tmp_path, text)).stage("source")
    assert [v.backbone.name for _, v in stage.variants] == ["gfe-1", "gfe-2"]
    assert stage.variants[1][1].backbone.options == {"batch_norm": True}


def test_bad_sweep_tables(tmp_path):
    with pytest.raises(ConfigError, match="sweep must be a non-empty list"):
        load_config(write(tmp_path, BASE + "freeze = { sweep = [] }\n"))
    with pytest.raises(ConfigError, match=r'unknown metric "accuraccy", did you mean "accuracy"'):
        load_config(write(tmp_path, BASE + 'freeze = { sweep = ["C1"], select_by = "accuraccy" }\n'))


def test_dump_toml_round_trips(tmp_path):
    text = BASE + 'freeze = { sweep = ["C1", "C1-C2"] }\nhead = { dense = [384, 512], dropout = 0.5 }\n'
    raw = tomllib.loads(text)
    raw = apply_overrides(raw, ['stages.target.train.lr=1e-3', 'run.name="a \\"quoted\\" name"'], "x")
    again = tomllib.loads(dump_toml(raw))
    assert again == raw
    parse_config(again)
