"""Issue 16, configs and the command line: hostile configs and arguments give one line (exit 2) before any data
is read; only a bug in mltl exits 1, with its traceback and a request to report it (docs/errors.md,
"Hardening: configs and the command line")."""

from __future__ import annotations

import errno
import tomllib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mltl.cli import commands as cli
from mltl.config import dump_toml, load_config, parse_config

BASE = """
[run]
name = "h"
seed = 1
[input]
size = 32
[[stages]]
name = "source"
domain = { plugin = "fractal", classes = 2, images_per_class = 6, seed = 1 }
backbone = "gfe-1"
train = { epochs = 1, batch_size = 4 }
"""


def one_line_error(capsys, argv) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mltl: error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "c.toml"
    path.write_text(BASE)
    return path


# ---------------------------------------------------------------- defect 7: dump_toml escapes every string


def test_dump_toml_escapes_del_and_control_characters():
    raw = {"run": {"name": "a\x7fb", "note": "\x00\x01\x1f\x7f\x80\x9f\t\n\r\"\\é😀"},
           "stages": [{"name": "s", "x\x7fkey😀": ["\x7f", {"k\n": "\x08"}]}]}
    text = dump_toml(raw)
    assert "\x7f" not in text
    assert tomllib.loads(text) == raw


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(st.text(), st.text())
def test_dump_toml_round_trips_arbitrary_text(key, value):
    raw = {key: value, "t": {key: [value, {key: value}]}, "stages": [{key: value}]}
    assert tomllib.loads(dump_toml(raw)) == raw


def test_a_del_character_in_a_config_string_survives_the_run_config(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(BASE.replace('name = "h"', 'name = "h\\u007f"'))
    with pytest.raises(Exception, match="run name"):  # a DEL in a run name: refused, it becomes a folder
        load_config(path)
    path.write_text(BASE.replace("seed = 1\n[input]", 'seed = 1\nreporter_options = {}\n[input]').replace(
        'backbone = "gfe-1"', 'backbone = { name = "gfe-1" }\nfreeze = "none\\u007f"'))
    raw = tomllib.loads(path.read_text())
    assert tomllib.loads(dump_toml(raw)) == raw


# ---------------------------------------------------------------- names


@pytest.mark.parametrize("name, words", [
    ("report.html", "a run writes"), ("config.toml", "a run writes"), ("State.json", "a run writes"),
    ("environment.json", "a run writes"), ("reused.json", "a run writes"), ("tensorboard", "a run writes"),
    ("environment-resume-2024.json", "a run writes"), ("nul", "device"), ("a/b", "letters, digits"),
    ("..", "letters, digits"), ("a..b", "'..'"), ("x" * 65, "too long"), ("a b", "letters, digits"),
    ("é", "letters, digits"),
])
def test_stage_names_that_are_run_files_or_unsafe_are_refused(config, capsys, name, words):
    line = one_line_error(capsys, ["validate", str(config), f"--set=stages.source.name={name}"])
    assert "stages[0].name" in line and words in line, line


@pytest.mark.parametrize("name", ["../x", "/abs", "a/b", "a\\b", "C:x", "..", ".", " ", "a\nb", "x" * 101])
def test_a_run_name_that_escapes_runs_is_refused(config, capsys, name):
    config.write_text(BASE.replace('name = "h"', f"name = {dump_toml({'v': name}).split('=', 1)[1].strip()}"))
    line = one_line_error(capsys, ["validate", str(config)])
    assert "run.name" in line and "run name" in line, line
    assert not (config.parent / "runs").exists() and not (config.parent.parent / "x").exists()


def test_a_run_name_with_spaces_and_quotes_is_still_fine(config):
    config.write_text(BASE.replace('name = "h"', 'name = "a \\"quoted\\" name"'))
    assert load_config(config).run.name == 'a "quoted" name'


# ---------------------------------------------------------------- the file itself


def test_a_byte_order_mark_is_accepted(config, capsys):
    config.write_bytes(b"\xef\xbb\xbf" + BASE.encode())
    assert cli.main(["validate", str(config)]) == 0
    assert ": OK (1 stages" in capsys.readouterr().out


def test_deeply_nested_toml_is_one_line(config, capsys):
    config.write_text(BASE + "x = " + "[" * 5000 + "]" * 5000 + "\n")
    assert "nested too deeply" in one_line_error(capsys, ["validate", str(config)])
    config.write_text(BASE.replace("seed = 1\n[input]", "seed = 1\nx = " + "[" * 40 + "]" * 40 + "\n[input]"))  # parses
    assert "nested too deeply" in one_line_error(capsys, ["validate", str(config)])
    config.write_text(BASE)
    assert "nested too deeply" in one_line_error(capsys, ["validate", str(config), "--set=run.x=" + "[" * 3000])


def test_a_config_that_is_a_folder_or_not_utf8_is_one_line(config, capsys, tmp_path):
    assert "is a folder" in one_line_error(capsys, ["validate", str(tmp_path)])
    config.write_bytes(BASE.encode().replace(b'"h"', b'"h\xff"'))
    assert "not UTF-8" in one_line_error(capsys, ["validate", str(config)])


def test_nul_and_undecodable_bytes_in_strings_are_one_line(config, capsys):
    assert "NUL" in one_line_error(capsys, ["validate", str(config), '--set=stages.source.domain.root="a\\u0000"'])
    assert "not valid UTF-8" in one_line_error(capsys, ["validate", str(config), "--set=run.name=\udcff"])


# ---------------------------------------------------------------- numbers


@pytest.mark.parametrize("key, value, words", [
    ("run.seed", "-1", "run.seed: -1 must be a seed from 0 to 4294967295"),
    ("run.seed", str(2**32), "run.seed: 4294967296 must be a seed"),
    ("run.seed", str(10**30), "must be a seed"),
    ("stages.source.split.seed", "-5", "stages[0].split.seed: -5 must be a seed"),
    ("stages.source.domain.seed", "-1", "stages[0].domain.seed: -1 must be a seed"),
    ("input.size", "100000", "input.size: 100000 must be from 1 to 4096"),
    ("stages.source.head", "{ dense = [70000] }", "a dense layer may have at most 65536 units"),
    ("stages.source.head", "{ dense = [" + ", ".join(["8"] * 65) + "] }", "at most 64"),
    ("stages.source.split.seeds", "1000000", "must be at most 1000"),
    ("stages.source.split.draws", "1000000", "must be at most 1000"),
    ("stages.source.split.folds", "1000000", "must be at most 1000"),
    ("stages.source.train.lr", "{ sweep = [" + ", ".join(str(i + 1) for i in range(40)) + "] }", None),
])
def test_negative_or_huge_numbers_are_refused_before_any_data_is_read(config, capsys, monkeypatch, key, value, words):
    from mltl.running import preflight

    def no_data(*args, **kwargs):
        raise AssertionError("data was read")

    monkeypatch.setattr(preflight, "load_domains", no_data)
    sets = [f"--set={key}={value}"]
    if words is None:  # 40 x 40 variants: over the limit of 1000
        sets.append("--set=stages.source.train.momentum={ sweep = [" + ", ".join(f"0.{i:02d}" for i in range(40)) + "] }")
        words = "the sweeps make 1600 variants of this stage; at most 1000"
    line = one_line_error(capsys, ["validate", str(config), *sets])
    assert words in line, line


def test_a_network_too_large_for_this_machine_is_refused_before_it_is_built(config, capsys, monkeypatch):
    from mltl.running import preflight

    monkeypatch.setattr(preflight, "memory_bytes", lambda: 10**9)  # a 1 GB machine
    line = one_line_error(capsys, ["validate", str(config), "--set=stages.source.head={ dense = [65536, 8192] }"])
    assert "stages[0]: the network has" in line and "more than this machine's 1 GB" in line, line


# ---------------------------------------------------------------- --set


@pytest.mark.parametrize("override, words", [
    ("run=5", "run: expected a table"),
    ("stages.²=1", 'no stage "²"'),
    ("stages.source.train.epochs.x=1", "is a value, not a table"),
])
def test_odd_overrides_are_one_line(config, capsys, override, words):
    assert words in one_line_error(capsys, ["validate", str(config), f"--set={override}"])


def test_a_set_value_with_more_toml_after_it_is_a_string(config):
    cfg = load_config(config, ['stages.source.freeze=none\nx = 1'])
    assert cfg.stages[0].first.freeze == "none\nx = 1"  # a string, refused later as a freeze policy


def test_a_swept_key_holding_a_dot_is_not_split(config, capsys):
    config.write_text(BASE.replace('backbone = "gfe-1"', 'backbone = { name = "gfe-1", "a.b" = { sweep = [1, 2] } }'))
    cfg = load_config(config)
    assert [label for label, _ in cfg.stages[0].variants] == ["backbone.a.b=1", "backbone.a.b=2"]
    assert "a.b" in one_line_error(capsys, ["validate", str(config)])  # an unknown gfe-1 option


def test_parse_config_refuses_a_run_that_is_not_a_table():
    with pytest.raises(Exception, match="run: expected a table"):
        parse_config({"run": 5, "stages": []})


# ---------------------------------------------------------------- command-line arguments


def test_compare_resamples_and_data_check_seed_are_checked(config, capsys, tmp_path):
    assert "--resamples must be a whole number from 1 to 100,000, got -5" in one_line_error(
        capsys, ["compare", str(config), "--resamples", "-5"])
    assert "--resamples" in one_line_error(capsys, ["compare", str(config), "--resamples", "1000000000"])
    (tmp_path / "imgs").mkdir()
    assert "--seed must be from 0 to 4294967295" in one_line_error(
        capsys, ["data", "check", str(tmp_path / "imgs"), "--seed", "-3"])
    assert "--batch-size must be 1 or more" in one_line_error(
        capsys, ["predict", str(tmp_path), "x.png", "--batch-size", "0"])


# ---------------------------------------------------------------- the top-level guard


@pytest.mark.parametrize("exc, words", [
    (PermissionError(errno.EACCES, "Permission denied", "/ro/run"), "/ro/run: Permission denied; check the permissions"),
    (OSError(errno.EROFS, "Read-only file system", "/ro/run"), "Read-only file system; choose a folder on a writable"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "runs/x/gone.png"), "runs/x/gone.png: No such file"),
    (OSError(errno.ENOSPC, "No space left on device", "runs/x/m"), "disk full while writing runs/x/m"),
    (MemoryError(), "out of memory"),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory"), "out of memory"),
])
def test_the_guard_makes_os_errors_a_user_causes_one_line(monkeypatch, capsys, exc, words):
    def fail(args):
        raise exc

    monkeypatch.setattr(cli, "_validate", fail)
    assert words in one_line_error(capsys, ["validate", "x.toml"])


def test_a_user_error_with_a_line_break_is_still_one_line(monkeypatch, capsys):
    from mltl.errors import UserError

    def fail(args):
        raise UserError("first\nsecond " + "x" * 5000)

    monkeypatch.setattr(cli, "_validate", fail)
    line = one_line_error(capsys, ["validate", "x.toml"])
    assert "first\\nsecond" in line and len(line) < 2100


@pytest.mark.parametrize("exc", [KeyError("spec"), TypeError("unsupported operand"), RecursionError(),
                                 ValueError("a bug"), OSError("no errno: a bug")])
def test_a_bug_in_mltl_exits_1_with_the_traceback_and_a_request_to_report_it(monkeypatch, capsys, exc):
    def fail(args):
        raise exc

    monkeypatch.setattr(cli, "_validate", fail)
    assert cli.main(["validate", "x.toml"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and type(exc).__name__ in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("mltl: internal error: ") and "please report it" in last
