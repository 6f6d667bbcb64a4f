"""Generate the config reference (docs/config.md) from the config classes, so it cannot drift.

    python -m mltl.docgen > docs/config.md

A test compares the file with this output.
"""

from __future__ import annotations

import typing

import attrs

from .config import BackboneRef, DomainRef, InputConfig, RunSection, SplitConfig, StageConfig, TrainConfig
from .network import HeadSpec

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

Generated from the config classes by `python -m mltl.docgen > docs/config.md`; a test fails when this
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
    for old, new in (("typing.", ""), ("mltl.network.", ""), ("mltl.config.", ""), ("NoneType", "none")):
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


if __name__ == "__main__":  # pragma: no cover
    print(render(), end="")
