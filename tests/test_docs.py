from pathlib import Path

from mltl.docgen import render

ROOT = Path(__file__).resolve().parents[1]


def test_config_reference_is_up_to_date():
    current = (ROOT / "docs" / "config.md").read_text()
    assert current == render(), "docs/config.md is out of date: run `python -m mltl.docgen > docs/config.md`"


def test_every_config_field_is_documented():
    import attrs

    from mltl.docgen import SECTIONS

    for _, cls in SECTIONS:
        for f in attrs.fields(cls):
            assert f.metadata.get("doc"), f"{cls.__name__}.{f.name} has no doc"
