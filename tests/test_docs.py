from pathlib import Path

from mltl.cli.docgen import render

ROOT = Path(__file__).resolve().parents[1]


def test_config_reference_is_up_to_date():
    current = (ROOT / "docs" / "config.md").read_text()
    assert current == render(), "docs/config.md is out of date: run `python -m mltl.cli.docgen > docs/config.md`"


def test_every_config_field_is_documented():
    import attrs

    from mltl.cli.docgen import SECTIONS

    for _, cls in SECTIONS:
        for f in attrs.fields(cls):
            assert f.metadata.get("doc"), f"{cls.__name__}.{f.name} has no doc"


def test_hook_reference_is_up_to_date():
    from mltl.cli.docgen import render_hooks

    current = (ROOT / "docs" / "hooks.md").read_text()
    assert current == render_hooks(), "docs/hooks.md is out of date: run `python -m mltl.cli.docgen hooks > docs/hooks.md`"


def test_hook_reference_lists_every_hookspec():
    import inspect

    from mltl import hookspecs
    from mltl.cli.docgen import render_hooks

    text = render_hooks()
    specs = [n for n, f in vars(hookspecs).items() if inspect.isfunction(f) and hasattr(f, "mltl_spec")]
    assert len(specs) >= 8
    for name in specs:
        first_words = inspect.getdoc(getattr(hookspecs, name)).split("\n")[0].split("``")[0].split(":")[0]
        assert f"### {name}\n" in text and first_words in text.split(f"### {name}\n")[1]


def test_relative_links_in_the_docs_point_to_files_that_exist():
    import re

    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # not links inside code blocks
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://|#|mailto:", target):
                continue
            if not (page.parent / target.split("#")[0]).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, "broken links: " + ", ".join(broken)
