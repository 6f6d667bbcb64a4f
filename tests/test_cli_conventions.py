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
