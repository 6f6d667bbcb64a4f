"""Fuzzing `mltl validate` (issue 16): generated configs, `--set` values and damaged config text.

Every example runs ``mltl validate`` in-process (``mltl.cli.commands.main``) in a fresh folder and checks:
exit 0 or 2, never 1 (a traceback: a bug in mltl); on 2, exactly one line on stderr, starting with
``mltl: error: ``; nothing written outside the test's temporary folder (the working folder holds only the
config afterwards; the decode cache and HOME point inside the temporary folder).

The number of examples per test is ``MLTL_FUZZ_EXAMPLES`` (default small, for CI); the examples are
derandomised (the same every run) unless ``MLTL_FUZZ_SEED`` is set, and Hypothesis prints the failing
example (and a ``@reproduce_failure`` blob) on a failure. A long local run::

    MLTL_FUZZ_EXAMPLES=3500 MLTL_FUZZ_SEED=16 pytest tests/test_fuzz.py -s
"""

from __future__ import annotations

import collections
import copy
import os
import tempfile
import tomllib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from mltl.cli import commands
from mltl.config import _value as toml_value
from mltl.config import dump_toml

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = int(os.environ.get("MLTL_FUZZ_EXAMPLES", "40"))  # per test; about 30 s in all
SEED = os.environ.get("MLTL_FUZZ_SEED")

BASE = {
    "run": {"name": "fz", "seed": 1},
    "input": {"size": 32, "channels": 1},
    "stages": [
        {"name": "source", "domain": {"plugin": "fractal", "classes": 2, "images_per_class": 6, "seed": 1},
         "backbone": "gfe-1", "train": {"epochs": 1, "batch_size": 4}},
        {"name": "target", "init": "source",
         "domain": {"plugin": "ct-phantom", "classes": ["normal", "cyst"], "images_per_class": 6, "seed": 2},
         "split": {"protocol": "holdout"}, "train": {"epochs": 1, "batch_size": 4}},
    ],
}

# the keys of docs/config.md, and a few of the domains' and backbones' options
RUN_KEYS = ["name", "seed", "device", "out", "reporters", "reporter_options", "device_memory_budget_gb",
            "host_memory_budget_gb"]
INPUT_KEYS = ["size", "channels", "mean", "std"]
STAGE_KEYS = ["name", "domain", "backbone", "init", "head", "freeze", "split", "train", "select_by"]
SPLIT_KEYS = ["val", "test", "seed", "min_per_class", "protocol", "folds", "fractions", "draws", "seeds", "file",
              "group_near_duplicates", "allow_leakage"]
TRAIN_KEYS = ["epochs", "batch_size", "optimizer", "lr", "momentum", "weight_decay", "schedule", "step_epochs",
              "step_gamma", "warmup_epochs", "val_every", "patience", "monitor", "class_weighted",
              "label_smoothing", "lr_decay", "group_lr", "unfreeze_every", "probe_epochs", "l2sp", "l2sp_beta",
              "augment", "sampler", "compile", "compile_mode", "sync_batch_norm"]
HEAD_KEYS = ["dense", "dropout"]
DOMAIN_KEYS = ["plugin", "classes", "images_per_class", "seed", "channels", "root"]
BACKBONE_KEYS = ["name", "batch_norm", "dropout", "weights"]

PATHS = ([("run", k) for k in RUN_KEYS] + [("input", k) for k in INPUT_KEYS]
         + [("stages", i, k) for i in (0, 1) for k in STAGE_KEYS]
         + [("stages", i, "split", k) for i in (0, 1) for k in SPLIT_KEYS]
         + [("stages", i, "train", k) for i in (0, 1) for k in TRAIN_KEYS]
         + [("stages", i, "head", k) for i in (0, 1) for k in HEAD_KEYS]
         + [("stages", i, "domain", k) for i in (0, 1) for k in DOMAIN_KEYS]
         + [("stages", 0, "backbone", k) for k in BACKBONE_KEYS])

WORDS = ["", " ", "..", "../x", "/abs", "a/b", "a\\b", "C:", "x" * 100, "\x7f", "a\x00b", "line\nbreak", "\ufeff",
         "é", "😀", "config.toml", "report.html", "state.json", "environment.json", "reused.json", "tensorboard",
         "CON", "source", "target", "C1", "C1-C2", "C1-C9", "none", "inherited", "all-but-classifier",
         "classifier", "gfe-1", "gfe-2", "alexnet", "timm", "fractal", "ct-phantom", "image-folder", "medmnist",
         "csv-manifest", "dicom", "nifti", "auc", "loss", "accuracy", "sgd", "adamw", "holdout", "kfold",
         "fractions", "auto", "cosine", "step", "hflip", "rotate:10", "crop:2", "noise:-1", "cpu", "cuda", "cuda:9",
         "mps", "roc", "evaluation", "metrics-log", "gradcam", "normal", "cyst", "uniform", "balanced"]
HOSTILE_INTS = [-(2**63), -(2**32), -3, -1, 0, 1, 2, 3, 5, 2**31, 2**32, 2**32 - 1, 2**63 - 1, 2**64, 10**30]
SMALL_INTS = [-5, -1, 0, 1, 2, 3, 4, 8]  # for domain options: a huge image count is the readers' case
FLOATS = [float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 1e-300, 1e300, 0.5, 1.5, -0.5, 0.999999, 1.0]

scalars = st.one_of(
    st.sampled_from(HOSTILE_INTS), st.integers(-10, 10), st.sampled_from(FLOATS),
    st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.sampled_from(WORDS), st.text(max_size=12),
    st.dates(), st.datetimes(), st.times(),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(WORDS + TRAIN_KEYS + ["sweep", "select_by", "plugin", "name"]),
                                  st.text(max_size=6)), inner, max_size=3),
        st.builds(lambda v: {"sweep": v}, st.lists(inner, max_size=3)),
    ),
    max_leaves=8,
)
small_values = st.one_of(st.sampled_from(SMALL_INTS), st.sampled_from(FLOATS), st.booleans(),
                         st.sampled_from(WORDS), st.lists(st.sampled_from(WORDS + ["a", "b"]), max_size=4))
random_key = st.one_of(st.sampled_from(WORDS), st.text(max_size=8))


@st.composite
def edits(draw):
    """A key path (mostly a documented key, sometimes a random one below it) and a value."""
    path = list(draw(st.sampled_from(PATHS)))
    if draw(st.integers(0, 9)) == 0:
        path[-1] = draw(random_key)
    if draw(st.integers(0, 14)) == 0:
        path.append(draw(random_key))
    domain = "domain" in path[:-1]
    value = draw(small_values if domain else values)
    return tuple(path), value


def apply(raw, path, value):
    node = raw
    for part in path[:-1]:
        if isinstance(node, list):
            if not isinstance(part, int) or part >= len(node):
                return
            node = node[part]
        elif isinstance(node, dict):
            nxt = node.get(part)
            if not isinstance(nxt, (dict, list)):
                nxt = node[part] = {} if not isinstance(nxt, str) else {"name" if part == "backbone" else "plugin": nxt}
            node = nxt
        else:
            return
    if isinstance(node, dict) or isinstance(node, list) and isinstance(path[-1], int) and path[-1] < len(node):
        node[path[-1]] = value


def set_text(value):
    """A value as the user would type it after --set KEY=: a TOML literal, or a bare word."""
    if isinstance(value, str) and value and value.isprintable():
        return value
    return toml_value(value)


class Harness:
    """Runs ``mltl validate`` in a fresh folder and checks what it printed and wrote."""

    def __init__(self, tmp_path, capsys, monkeypatch):
        self.tmp, self.capsys, self.codes = tmp_path, capsys, collections.Counter()
        monkeypatch.setenv("MLTL_CACHE_DIR", str(tmp_path / "cache"))
        monkeypatch.setenv("HOME", str(tmp_path / "home"))
        monkeypatch.setenv("MLTL_OFFLINE", "1")
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        self.monkeypatch = monkeypatch

    def validate(self, config_text: str | bytes, overrides=()):
        work = Path(tempfile.mkdtemp(dir=self.tmp, prefix="ex-"))
        cfg = work / "c.toml"
        cfg.write_bytes(config_text if isinstance(config_text, bytes) else config_text.encode("utf-8", "surrogatepass"))
        self.monkeypatch.chdir(work)
        self.capsys.readouterr()
        code = commands.main(["validate", str(cfg), *[f"--set={o}" for o in overrides]])
        out, err = self.capsys.readouterr()
        self.codes[code] += 1
        assert code in (0, 2), f"exit {code}:\n{err}"
        if code == 2:
            lines = err.splitlines()
            assert len(lines) == 1 and lines[0].startswith("mltl: error: "), err
            assert "Traceback" not in err
        else:
            assert ": OK (" in out, out
        assert sorted(p.name for p in work.iterdir()) == ["c.toml"], list(work.iterdir())
        assert {p.name for p in self.tmp.iterdir() if not p.name.startswith("ex-")} <= {"cache", "home"}
        return code

    def report(self, name):
        with self.capsys.disabled():
            print(f"\n{name}: {sum(self.codes.values())} examples, exit codes {dict(sorted(self.codes.items()))}"
                  f" (MLTL_FUZZ_SEED={SEED or 'derandomized'})")


def fuzz(test):
    test = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=SEED is None,
                    print_blob=True, suppress_health_check=list(HealthCheck))(test)
    return seed(int(SEED))(test) if SEED is not None else test


@pytest.fixture
def harness(tmp_path, capsys, monkeypatch):
    return Harness(tmp_path, capsys, monkeypatch)


def test_fuzz_generated_configs(harness):
    @fuzz
    @given(st.lists(edits(), min_size=1, max_size=4))
    def check(changes):
        raw = copy.deepcopy(BASE)
        for path, value in changes:
            apply(raw, path, value)
        text = dump_toml(raw)
        assert tomllib.loads(text).keys() == raw.keys()
        harness.validate(text)

    check()
    harness.report("configs")


def test_fuzz_set_overrides(harness):
    base = dump_toml(BASE)

    @fuzz
    @given(st.lists(st.one_of(
        edits().map(lambda e: ".".join(("stages", ["source", "target", "0", "1"][e[0][1]], *map(str, e[0][2:])))
                    if e[0][0] == "stages" and isinstance(e[0][1], int) else ".".join(map(str, e[0])),
                    ).flatmap(lambda key: st.tuples(st.just(key), values.map(set_text))),
        st.tuples(st.text(max_size=20), st.text(max_size=20)),
    ), min_size=1, max_size=3))
    def check(sets):
        harness.validate(base, [f"{k}={v}" if k or v else k for k, v in sets])

    check()
    harness.report("--set")


MUTATIONS = ["\ufeff", "\x7f", "\x00", "\r", "[", "]", "{", "}", "=", '"', "'", "\n[[stages]]\n", "\n[run]\n",
             "a" * 70, "[" * 3000, "{a=" * 300, "\xff", "é", "#", "..", "/", "\\"]


def test_fuzz_damaged_config_text(harness):
    base = dump_toml(BASE).encode()

    @fuzz
    @given(st.lists(st.tuples(st.integers(0, len(base)), st.integers(0, 8),
                              st.one_of(st.sampled_from(MUTATIONS), st.text(max_size=6))), min_size=1, max_size=4),
           st.booleans())
    def check(changes, bom):
        text = base
        for at, cut, insert in changes:
            at = min(at, len(text))
            text = text[:at] + insert.encode("utf-8", "surrogatepass") + text[at + cut:]
        harness.validate((b"\xef\xbb\xbf" if bom else b"") + text)

    check()
    harness.report("text")


def test_the_base_config_is_valid(harness):
    assert harness.validate(dump_toml(BASE)) == 0
    assert harness.validate(b"\xef\xbb\xbf" + dump_toml(BASE).encode()) == 0  # a byte-order mark is accepted
