"""The GFE networks of mltl-gfe (gfe-1, gfe-2): their sizes and layer names at the paper's 150 px, and the
error for an input too small for them. The core's network, freezing and handing-down tests are in
tests/test_network.py."""

import pytest
import torch

from mltl import get_registry
from mltl.networks.network import HeadSpec, build_network, make_spec


def net(backbone="gfe-2", size=64, classes=("a", "b", "c"), head=HeadSpec(), **options):
    spec = make_spec(backbone, options, 1, size, head, classes)
    return build_network(spec, get_registry())


@pytest.mark.parametrize("name, flat", [("gfe-1", 36 * 36 * 64), ("gfe-2", 13 * 13 * 256)])
def test_gfe_matches_the_paper_at_150(name, flat):
    n = build_network(make_spec(name, {}, 3, 150, HeadSpec(), tuple("abcde")), get_registry())
    first_dense = n.get_submodule(n.groups["F1"][0])[1]
    assert first_dense.in_features == flat  # 82,944 and 43,264 (the table's 43,294 is a typo)
    assert n(torch.zeros(2, 3, 150, 150)).shape == (2, 5)
    expected = ["C1", "C2", "F1"] if name == "gfe-1" else ["C1", "C2", "C3", "C4", "C5", "F1", "F2"]
    assert n.group_names() == expected + ["classifier"]


def test_gfe_too_small_input_is_a_clear_error():
    with pytest.raises(Exception, match=r"too small for layer C\d; use \[input\] size >= "):
        net("gfe-2", size=16)
