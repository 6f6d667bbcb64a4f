"""`mltl plugins NAME`: a plugin's options with their types and defaults, read from its factory's signature."""

from mltl.cli import commands as cli


def test_plugins_name_lists_a_domains_options_with_types_and_defaults(capsys):
    assert cli.main(["plugins", "medmnist"]) == 0
    out = capsys.readouterr().out
    assert "domain medmnist" in out
    for option, kind, default in [("flag", "str | None", "None"), ("max_per_class", "int | None", "None"),
                                  ("resolution", "int", "28"), ("download", "bool", "True")]:
        row = next(line for line in out.splitlines() if f" {option} " in line)
        assert kind in row and default in row, row
    assert "image_size" not in out  # passed by the core, not a config option


def test_plugins_name_leaves_out_what_the_core_passes_to_a_backbone(capsys):
    assert cli.main(["plugins", "gfe-2"]) == 0
    out = capsys.readouterr().out
    assert "backbone gfe-2" in out and "in_chans" not in out and "image_size" not in out


def test_plugins_unknown_name_is_a_one_line_user_error(capsys):
    assert cli.main(["plugins", "medmnistt"]) == 2
    err = capsys.readouterr().err
    assert 'did you mean "medmnist"' in err and "Traceback" not in err
