"""Generate the references in docs/ from the code, so they cannot drift.

    python -m mltl.cli.docgen > docs/config.md          # the config reference, from the config classes
    python -m mltl.cli.docgen hooks > docs/hooks.md     # the hook reference, from mltl/hookspecs.py

Tests compare the files with this output.
"""

from __future__ import annotations

import typing

import attrs

from ..config import BackboneRef, DomainRef, InputConfig, RunSection, SplitConfig, StageConfig, TrainConfig
from ..networks.network import HeadSpec

SECTIONS = [
    ("[run]", RunSection),
    ("[input]", InputConfig),
    ("[[stages]]", StageConfig),
    ("stages[].domain", DomainRef),
    ("stages[].backbone", BackboneRef),
    ("stages[].head", HeadSpec),
    ("stages[].split", SplitConfig),
    ("stages[].train", TrainConfig),
]

INTRO = """# Config reference

Generated from the config classes by `python -m mltl.cli.docgen > docs/config.md`; a test fails when this
file is out of date. A config is a TOML file with a `[run]` table, an optional `[input]` table and one
`[[stages]]` table per stage, in chain order. Any key can be overridden from the command line with
`--set KEY=VALUE` (stages by name or index: `--set stages.target.train.epochs=50`).

**Sweeps.** Any value of a stage can be replaced by `{ sweep = [v1, v2, ...], select_by = "auc" }`: the
stage trains one variant per value (the cartesian product when several keys are swept), selects the
best on its validation split by `select_by`, and hands only the winner to later stages. The test split is
evaluated once, for the winner. A swept freeze policy that names layers the inherited network does not
have (e.g. `C1-C3` after a source sweep picked GFE Structure-I) is skipped and recorded in `selection.json`.
"""


def _type(tp: typing.Any) -> str:
    text = str(tp) if not isinstance(tp, type) else tp.__name__
    for old, new in (("typing.", ""), ("mltl.networks.network.", ""), ("mltl.config.", ""), ("NoneType", "none")):
        text = text.replace(old, new)
    return text.replace("|", "\\|")  # a pipe would end the table cell


def _default(f: attrs.Attribute) -> str:
    if f.default is attrs.NOTHING:
        return "required"
    if isinstance(f.default, attrs.Factory):  # type: ignore[arg-type]
        return "see below" if attrs.has(f.type) else "`{}`"
    if f.default is None:
        return "none"
    if isinstance(f.default, bool):
        return f"`{str(f.default).lower()}`"
    if isinstance(f.default, str):
        return f'`"{f.default}"`'
    if isinstance(f.default, tuple):
        return "`[]`" if not f.default else f"`{list(f.default)}`"
    return f"`{f.default}`"


def render() -> str:
    out = [INTRO]
    for title, cls in SECTIONS:
        out.append(f"\n## `{title}`\n")
        if cls.__doc__ and cls not in (RunSection, InputConfig):
            out.append(" ".join(cls.__doc__.split()) + "\n")
        out.append("| key | type | default | meaning |\n|---|---|---|---|")
        for f in attrs.fields(attrs.resolve_types(cls)):
            meaning = f.metadata.get("doc", "").replace("|", "\\|")
            out.append(f"| `{f.name}` | `{_type(f.type)}` | {_default(f)} | {meaning} |")
    out.append("")
    return "\n".join(out)


HOOKS_INTRO = """# Hook reference

Generated from the docstrings in `core/mltl/hookspecs.py` by `python -m mltl.cli.docgen hooks > docs/hooks.md`;
a test fails when this file is out of date. How to write and package a plugin: [plugins.md](plugins.md).
"""


def _dedent_doc(obj: typing.Any) -> str:
    import inspect

    return inspect.cleandoc(obj.__doc__ or "")


def _rst_to_md(text: str) -> str:
    """The little reStructuredText the hookspecs use: ``code`` and :role:`name`, ``::`` code blocks."""
    import re

    text = re.sub(r":(?:class|func|data|mod|meth|attr):`~?([^`]+)`", r"`\1`", text)
    text = text.replace("``", "`")
    out, code = [], False
    for line in text.split("\n"):
        if code and line and not line.startswith("    "):
            while out and not out[-1].strip():
                out.pop()
            out.append("```")
            out.append("")
            code = False
        if line.endswith("::") and not code:
            out.append(line[:-1] if not line.endswith(" ::") else line[:-3])
            out.append("")
            out.append("```python")
            code = True
            continue
        out.append(line[4:] if code and line.startswith("    ") else line)
    if code:
        while out and not out[-1].strip():
            out.pop()
        out.append("```")
    text = "\n".join(out)
    return re.sub(r"```python\n\n+", "```python\n", text)


def render_hooks() -> str:
    """docs/hooks.md: the module's overview, then every hook's signature, kind and docstring."""
    import inspect

    from .. import hookspecs

    out = [HOOKS_INTRO, "## Overview\n", _rst_to_md(_dedent_doc(hookspecs)), ""]
    specs = [(name, fn) for name, fn in vars(hookspecs).items()
             if inspect.isfunction(fn) and hasattr(fn, "mltl_spec")]
    specs.sort(key=lambda item: inspect.getsourcelines(item[1])[1])  # in the order of the module
    out.append("## Hooks\n")
    out.append("| hook | called |\n|---|---|")
    for name, fn in specs:
        when = ("once, when the registry is built" if name.startswith("register_") else
                "when a comparison is written, in every plugin" if name == "mltl_comparison_figures" else
                "when a report is written (after a run, and by `mltl report`), in every plugin"
                if name.startswith("mltl_report_") else "during a run, in every plugin")
        out.append(f"| [`{name}`](#{name}) | {when} |")
    out.append("")
    for name, fn in specs:
        params = ", ".join(inspect.signature(fn).parameters)
        opts = getattr(fn, "mltl_spec", {}) or {}
        flags = [k for k in ("firstresult", "historic") if opts.get(k)]
        out.append(f"### {name}\n")
        out.append("```python\n@mltl.hookimpl\ndef " + f"{name}({params}): ...\n```\n")
        if flags:
            out.append("Options: " + ", ".join(f"`{f}`" for f in flags) + ".\n")
        out.append(_rst_to_md(_dedent_doc(fn)) + "\n")
    return "\n".join(out).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    import sys

    args = sys.argv[1:] if argv is None else argv
    if args in ([], ["config"]):
        print(render(), end="")
    elif args == ["hooks"]:
        print(render_hooks(), end="")
    else:
        print("usage: python -m mltl.cli.docgen [config|hooks] > docs/FILE.md", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
