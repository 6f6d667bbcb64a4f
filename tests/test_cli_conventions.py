"""Conventions of the `mltl` command: --help with examples everywhere, --version, -v/-q, NO_COLOR and pipes."""

import io
import os
import pty
import subprocess
import sys

import pytest

from mltl.cli import commands as cli


def _leaf_commands(parser, prefix="mltl"):
    """Every runnable command, with nested ones (`mltl data check`), and its parser."""
    subs = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    if not subs:
        yield prefix, parser
        return
    for name, sub in subs[0].choices.items():
        yield from _leaf_commands(sub, f"{prefix} {name}")


def test_every_command_has_help_with_an_example(capsys):
    commands = dict(_leaf_commands(cli._parser()))
    assert {"mltl run", "mltl compare", "mltl validate", "mltl predict", "mltl export", "mltl new-plugin",
            "mltl plugins"} <= set(commands)
    for name, sub in commands.items():
        text = sub.format_help()
        assert "example" in text and name in text.split("example", 1)[1], f"{name} --help shows no example"
    with pytest.raises(SystemExit) as exc:
        cli.main(["export", "--help"])
    assert exc.value.code == 0 and "mltl export runs/rare-liver/target --format onnx" in capsys.readouterr().out


def test_version_verbose_and_quiet_flags(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--version"])
    assert capsys.readouterr().out.startswith("mltl ")
    for flags in (["-v"], ["-vv"], ["-q"]):
        args = cli._parser().parse_args(flags + ["plugins"])
        assert args.command == "plugins"


def _run_in_terminal(args, env):
    """Run a command with its stdout and stderr on a pseudo-terminal; returns everything it wrote."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(args, stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    proc.wait(timeout=120)
    os.close(master)
    return proc.returncode, out.decode(errors="replace")


@pytest.mark.skipif(sys.platform == "win32", reason="needs a pseudo-terminal")
@pytest.mark.slow
def test_no_escape_codes_with_no_color_or_into_a_pipe():
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR", "MLTL_QUIET")}
    env["TERM"] = "xterm-256color"
    cmd = [sys.executable, "-m", "mltl", "plugins"]
    rc, styled = _run_in_terminal(cmd, env)
    assert rc == 0 and "\x1b[" in styled  # on a terminal, the table is styled...
    rc, plain = _run_in_terminal(cmd, {**env, "NO_COLOR": "1"})
    assert rc == 0 and "mltl.builtins" in plain and "\x1b[" not in plain  # ...but not under NO_COLOR
    piped = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert piped.returncode == 0 and "mltl.builtins" in piped.stdout and "\x1b[" not in piped.stdout + piped.stderr


class _FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_console_reporter_is_plain_under_no_color(monkeypatch, tmp_path):
    from mltl.evaluation.reporting import ConsoleReporter

    monkeypatch.delenv("MLTL_QUIET", raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")
    for no_color, expect_escapes in (("", True), ("1", False)):
        monkeypatch.setenv("NO_COLOR", no_color)
        err = _FakeTerminal()
        monkeypatch.setattr(sys, "stderr", err)
        rep = ConsoleReporter()
        rep.stage_started("target", tmp_path)
        for epoch in (1, 2, 3):
            rep.epoch_ended("target", "", epoch, {"loss": 0.5, "val_auc": 0.7, "epochs": 3})
        if rep._progress is not None:
            rep._progress.stop()
        text = err.getvalue()
        assert ("\x1b[" in text) is expect_escapes, (no_color, text[:200])
        if not expect_escapes:
            assert "target epoch 3/3: loss 0.500 val AUC 0.700" in text


# ---------------------------------------------------------------- issue 17: arguments, devices, names, paths

def _all_parsers(parser, prefix="mltl"):
    """Every parser, the intermediate ones (`mltl data`) included, with its command name."""
    yield prefix, parser
    for action in parser._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            for name, sub in action.choices.items():
                yield from _all_parsers(sub, f"{prefix} {name}")


def _arguments(parser):
    return [a for a in parser._actions
            if a.__class__.__name__ not in ("_HelpAction", "_SubParsersAction", "_VersionAction")]


def test_every_argument_has_help():
    missing = [f"{name} {a.option_strings[0] if a.option_strings else a.dest}"
               for name, parser in _all_parsers(cli._parser()) for a in _arguments(parser)
               if not (a.help or "").strip() or a.help == "==SUPPRESS=="]
    assert not missing, "arguments without help text: " + ", ".join(missing)


def test_one_device_policy_auto_everywhere():
    devices = {name: a for name, parser in _all_parsers(cli._parser()) for a in _arguments(parser)
               if "--device" in a.option_strings}
    assert {"mltl run", "mltl compare", "mltl predict", "mltl rank"} <= set(devices)
    for name, action in devices.items():
        # None: the config's [run] device, which is itself "auto" unless the config sets it
        assert action.default in (None, "auto"), (name, action.default)
        assert "auto (CUDA when present)" in action.help, name


def test_set_always_means_a_config_key():
    for name, parser in _all_parsers(cli._parser()):
        for a in _arguments(parser):
            if "--set" in a.option_strings and name != "mltl report":
                assert a.dest == "overrides" and a.metavar == "KEY=VALUE", name
    report = dict(_all_parsers(cli._parser()))["mltl report"]
    option = next(a for a in _arguments(report) if "--option" in a.option_strings)
    assert option.metavar == "REPORTER.KEY=VALUE"
    deprecated = next(a for a in _arguments(report) if "--set" in a.option_strings)
    assert "deprecated" in deprecated.help


def test_report_option_and_its_deprecated_set_spelling(monkeypatch, capsys, tmp_path):
    from mltl.evaluation import report

    seen = []

    class Done:
        run_dir, finished, unfinished, reporters = tmp_path, ["target"], [], ["evaluation"]

    def fake_regenerate(run_dir, *, reporter_options=None, reporters=None):
        seen.append(reporter_options)
        return Done()

    monkeypatch.setattr(report, "regenerate", fake_regenerate)
    assert cli.main(["report", str(tmp_path), "--option", "evaluation.case_aggregate=max"]) == 0
    assert "deprecated" not in capsys.readouterr().err
    assert cli.main(["report", str(tmp_path), "--set", "roc.n_resamples=2000",
                     "--option", "evaluation.case_aggregate=max"]) == 0
    err = capsys.readouterr().err
    assert "deprecated" in err and "--option REPORTER.KEY=VALUE" in err
    assert seen == [{"evaluation": {"case_aggregate": "max"}},
                    {"roc": {"n_resamples": 2000}, "evaluation": {"case_aggregate": "max"}}]
    assert cli.main(["report", str(tmp_path), "--option", "case_aggregate=max"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("mltl: error: --option 'case_aggregate=max'")


def test_help_names_no_internal_or_absolute_path(capsys):
    import re
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    home = os.path.expanduser("~")
    absolute = re.compile(r"(?:^|[\s\"'=(\[`])(/[\w.-]+|[A-Za-z]:\\)")
    for name, parser in _all_parsers(cli._parser()):
        text = parser.format_help()
        assert "../shared" not in text and "shared/data" not in text, name
        assert root not in text and (home in ("", "/") or home not in text), name
        assert not absolute.search(text), (name, absolute.search(text))


def test_docs_name_no_internal_or_developer_paths():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    bad = ("../shared", "/work/", "/home/", "/Users/", "/tmp/", "/root/")  # a relative .venv/bin/python is fine
    found = [f"{page.relative_to(root)}: {b}" for page in [root / "README.md", *sorted((root / "docs").glob("*.md"))]
             for b in bad if b in page.read_text()]
    assert not found, "internal or developer-machine paths in the docs: " + ", ".join(found)


# ---------------------------------------------------------------- exit codes

def test_exit_code_table_in_docs_matches_the_code():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()
    table = dict(re.findall(r"^\| (\d+) \| ([^|]+) \|", text, flags=re.MULTILINE))
    assert {int(k) for k in table} == {cli.EXIT_OK, cli.EXIT_INTERNAL_ERROR, cli.EXIT_USER_ERROR,
                                      cli.EXIT_FINDINGS, cli.EXIT_INTERRUPTED}
    assert len({cli.EXIT_INTERNAL_ERROR, cli.EXIT_USER_ERROR, cli.EXIT_FINDINGS}) == 3
    assert "data check" in table[str(cli.EXIT_FINDINGS)] and "bug" in table[str(cli.EXIT_INTERNAL_ERROR)]
    for name, _ in _leaf_commands(cli._parser()):
        assert f"`{name}" in text, f"docs/cli.md does not describe {name}"


def test_data_check_problems_exit_3_not_the_crash_code(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    for cls, n in (("a", 6), ("b", 1)):  # a class of one image: a problem
        (tmp_path / cls).mkdir()
        for i in range(n):
            Image.fromarray(np.full((16, 16), 40 * i + 7 * len(cls), np.uint8)).save(tmp_path / cls / f"{i}.png")
    assert cli.main(["data", "check", str(tmp_path)]) == cli.EXIT_FINDINGS == 3
    assert "1 readable" in capsys.readouterr().out


# ---------------------------------------------------------------- shell completion

def _completion(shell, capsys):
    assert cli.main(["completion", shell]) == 0
    return capsys.readouterr().out


def test_bash_completion_is_valid_and_names_every_subcommand(capsys, tmp_path):
    script = _completion("bash", capsys)
    path = tmp_path / "mltl.bash"
    path.write_text(script)
    check = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    for name, _ in _all_parsers(cli._parser()):
        assert name.split()[-1] in script, name
    (tmp_path / "liver.toml").write_text("")

    def complete(*words):
        probe = (f'source {path}; COMP_WORDS=({" ".join(repr(w) for w in words)}); '
                 f'COMP_CWORD={len(words) - 1}; _mltl; printf "%s\\n" "${{COMPREPLY[@]}}"')
        out = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        return out.stdout.split()

    assert {"run", "compare", "data", "config", "completion", "report"} <= set(complete("mltl", ""))
    assert complete("mltl", "data", "") == ["check"]
    assert "--group-near-duplicates" in complete("mltl", "data", "check", "--")
    assert complete("mltl", "rank", "c.toml", "--features", "") == ["classifier-input", "trunk"]
    assert complete("mltl", "config", "show", "liv") == ["liver.toml"]  # config files complete as files
    assert complete("mltl", "run", "--set", "") == []


def test_zsh_and_fish_completion_cover_every_subcommand(capsys):
    import shutil

    zsh = _completion("zsh", capsys)
    fish = _completion("fish", capsys)
    assert "bashcompinit" in zsh and "complete -o filenames -F _mltl mltl" in zsh
    for name, _ in _all_parsers(cli._parser()):
        if name != "mltl":
            assert f"-a {name.split()[-1]} " in fish, name
    assert "-l device" in fish and "-l group-near-duplicates" in fish
    for shell, script in (("zsh", zsh), ("fish", fish)):
        if shutil.which(shell):
            check = subprocess.run([shell, "-n"], input=script, capture_output=True, text=True)
            assert check.returncode == 0, check.stderr
