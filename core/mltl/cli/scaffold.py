"""``mltl new-plugin NAME``: a new plugin distribution, ready to ``pip install`` and with a passing test.

The package is what ``docs/plugins.md`` describes, written out: ``pyproject.toml`` (setuptools, an entry
point in group ``mltl``), a module registering one domain through the ``register_domains`` hook (a folder
with one sub-folder of images per class, to be edited into whatever the user's data needs), a pytest file
that builds a small image folder and checks the installed plugin end to end, and a README.
"""

from __future__ import annotations

import keyword
import re
from importlib import metadata
from pathlib import Path

from ..errors import UserError
from ..running.rundir import write_text_atomic

NAME_RE = re.compile(r"[a-z][a-z0-9]*(-[a-z0-9]+)*")


def check_name(name: str) -> str:
    """The domain name, validated: lowercase letters, digits and single hyphens, starting with a letter."""
    if name.startswith("mltl-"):
        raise UserError(f'new-plugin: give the name without the "mltl-" prefix (e.g. "{name[5:]}"); '
                        f'the distribution is called "mltl-{name[5:]}"')
    if not NAME_RE.fullmatch(name):
        raise UserError(f'new-plugin: "{name}" is not a valid plugin name; use lowercase letters, digits and '
                        f'single hyphens, starting with a letter (e.g. "hospital-xray")')
    if len(name) > 40:
        raise UserError(f'new-plugin: "{name}" is {len(name)} characters long; keep it to 40')
    module = module_name(name)
    if keyword.iskeyword(module):
        raise UserError(f'new-plugin: "{name}" makes the module name "{module}", a Python keyword; choose another')
    return name


def module_name(name: str) -> str:
    return "mltl_" + name.replace("-", "_")


def _taken(name: str) -> str | None:
    """The plugin that already registers a domain called ``name``, if any."""
    from ..plugins import get_registry

    try:
        return get_registry().get("domain", name).plugin
    except UserError:
        return None


PYPROJECT = '''[build-system]
requires = ["setuptools>=64"]
build-backend = "setuptools.build_meta"

[project]
name = "{dist}"
version = "0.1.0"
description = "mltl plugin: the {name} domain"
readme = "README.md"
requires-python = ">=3.11"
dependencies = ["mltl>={mltl_version},<{mltl_next}", "numpy", "pillow"]

[project.optional-dependencies]
test = ["pytest>=7"]

# this line makes the plugin visible to mltl: group "mltl", any entry name, the module with the hooks
[project.entry-points.mltl]
{entry} = "{module}"

[tool.setuptools]
packages = ["{module}"]
'''

MODULE = '''"""mltl plugin: the ``{name}`` domain.

A folder with one sub-folder of images per class. Edit :func:`load_{func}` to read your own data (a
CSV of labels, DICOM files, patient ids for ``groups``...); keep its signature's keyword options, which
mltl checks against the config, and return an :class:`mltl.Domain`.

Config::

    domain = {{ plugin = "{name}", root = "/data/{name}" }}
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

import mltl

SUFFIXES = {{".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}}


def read_file(path: Path, *, channels: int = 1, size: int | None = None, image_size: int = 64) -> np.ndarray:
    """One image file as uint8 ``(size, size)`` (grey) or ``(3, size, size)``: used for training and by
    ``mltl predict``, so new files get exactly the training preprocessing."""
    side = size or image_size
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("L" if channels == 1 else "RGB").resize((side, side)), dtype=np.uint8)
    except OSError as exc:
        raise mltl.UserError(f"{name}: cannot read image {{path}} ({{exc}}); remove or replace the file") from None
    return arr if channels == 1 else arr.transpose(2, 0, 1)


def load_{func}(root: str, channels: int = 1, size: int | None = None, *, image_size: int = 64) -> mltl.Domain:
    """{name}: a folder with one sub-folder of images per class."""
    base = Path(root).expanduser()
    if not base.is_dir():
        raise mltl.UserError(f'{name}: root "{{root}}" is not a folder; set domain.root to the folder that '
                             f"holds one sub-folder per class")
    if channels not in (1, 3):
        raise mltl.UserError(f"{name}: channels must be 1 or 3, got {{channels}}")
    classes = sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise mltl.UserError(f"{name}: {{base}} has {{len(classes)}} class sub-folder(s); a classifier needs 2 or more")
    images, labels, ids = [], [], []
    for label, cls in enumerate(classes):
        files = sorted(f for f in (base / cls).rglob("*") if f.suffix.lower() in SUFFIXES and not f.name.startswith("."))
        if not files:
            raise mltl.UserError(f"{name}: class folder {{base / cls}} holds no images ({{', '.join(sorted(SUFFIXES))}})")
        for f in files:
            images.append(read_file(f, channels=channels, size=size, image_size=image_size))
            labels.append(label)
            ids.append(f.relative_to(base).as_posix())
    return mltl.Domain(classes=classes, images=np.stack(images), labels=labels, ids=ids,
                       description=f"{name} images from {{base}}")


@mltl.hookimpl
def register_domains(register):
    # `mltl predict` reads new files with read_file, searching folders for files ending in SUFFIXES
    register("{name}", load_{func}, read_file=read_file, suffixes=SUFFIXES)
'''

TEST = '''"""Tests of the {name} plugin: run with `pytest` after `pip install .`"""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import mltl
from mltl import get_registry


@pytest.fixture
def folder(tmp_path):
    """Two classes of 16 x 16 grey images: dark squares and bright squares, 8 of each (in their own folder:
    a run directory may not be inside the folder a domain reads)."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for label, (cls, level) in enumerate((("dark", 60), ("bright", 190))):
        (root / cls).mkdir(parents=True)
        for i in range(8):
            pixels = np.clip(rng.normal(level, 20, (16, 16)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / cls / f"{{i}}.png")
    return root


def test_the_installed_plugin_registers_the_domain():
    item = get_registry().get("domain", "{name}")
    assert item.plugin == "{entry}"


def test_loads_the_folder(folder):
    domain = get_registry().create("domain", "{name}", {{"root": str(folder)}}, extra={{"image_size": 16}})
    assert domain.classes == ("bright", "dark")
    assert domain.class_counts() == {{"bright": 8, "dark": 8}}
    assert domain.images.shape == (16, 16, 16) and domain.images.dtype == np.uint8
    assert domain.images[domain.labels == 0].mean() > domain.images[domain.labels == 1].mean() + 80


def test_a_missing_folder_is_a_user_error(tmp_path):
    with pytest.raises(mltl.UserError, match="is not a folder"):
        get_registry().create("domain", "{name}", {{"root": str(tmp_path / "nope")}})
    with pytest.raises(mltl.ConfigError, match="unknown option"):
        get_registry().create("domain", "{name}", {{"rot": str(tmp_path)}})


def test_mltl_plugins_lists_it():
    out = subprocess.run([sys.executable, "-m", "mltl", "plugins"], capture_output=True, text=True, check=True)
    assert "{dist}" in out.stdout and "{name}" in out.stdout


def test_a_one_stage_chain_trains_on_it(folder, tmp_path):
    if "gfe-1" not in get_registry().names("backbone"):
        pytest.skip("needs the gfe-1 backbone: pip install mltl-gfe")
    config = tmp_path / "chain.toml"
    config.write_text(f"""
[run]
name = "{name}-smoke"
reporters = []

[input]
size = 16

[[stages]]
name = "only"
domain = {{{{ plugin = "{name}", root = "{{folder.as_posix()}}" }}}}
backbone = "gfe-1"
split = {{{{ val = 0.25, test = 0.25 }}}}
train = {{{{ epochs = 2, batch_size = 4 }}}}
""")
    result = mltl.run(config, out=tmp_path / "run", device="cpu")
    metrics = result.stage("only").metrics
    assert metrics["n_test"] == 4 and 0 <= metrics["accuracy"] <= 1
    assert (result.run_dir / "only" / "predictions.csv").is_file()
'''

README = '''# {dist}

An mltl plugin providing the `{name}` domain: a folder with one sub-folder of
images per class. Generated by `mltl new-plugin {name}`; edit `{module}/__init__.py` to read your own data.

```bash
pip install .                     # or: pip install --no-deps --no-build-isolation . (offline)
mltl plugins                      # lists {dist} and the domain "{name}"
pytest tests/                     # the plugin's own tests
```

In a config:

```toml
[[stages]]
name = "target"
init = "intermediate"
domain = {{ plugin = "{name}", root = "/data/{name}", channels = 1 }}
```

Options: `root` (the folder), `channels` (1 grey, 3 RGB), `size` (decode size; default the chain's
`[input] size`). `mltl predict RUN_DIR/STAGE files...` reads new files with the same `read_file`.
'''


def scaffold(name: str, directory: str | Path | None = None) -> Path:
    """Write a new plugin package for a domain called ``name``; returns its folder.

    ``directory`` is where the package folder ``mltl-NAME`` is created (default: the current folder).
    """
    from ..version import __version__

    check_name(name)
    owner = _taken(name)
    if owner is not None:
        raise UserError(f'new-plugin: a domain called "{name}" is already registered by plugin "{owner}"; '
                        f"choose another name (`mltl plugins` lists what is installed)")
    parent = Path(directory) if directory is not None else Path.cwd()
    if parent.exists() and not parent.is_dir():
        raise UserError(f"new-plugin: --dir {parent} is a file, not a folder")
    dist = f"mltl-{name}"
    try:
        installed = metadata.distribution(dist)
    except metadata.PackageNotFoundError:
        pass
    else:
        raise UserError(f'new-plugin: a distribution called "{dist}" is already installed (version '
                        f'{installed.version}); choose another name')
    root = parent / dist
    if root.exists():
        raise UserError(f"new-plugin: {root} already exists; remove it or choose another --dir")
    major, minor = (int(v) for v in __version__.split(".")[:2])
    values = {
        "name": name, "dist": dist, "module": module_name(name), "func": name.replace("-", "_"),
        "entry": name.replace("-", "_"), "mltl_version": f"{major}.{minor}",
        "mltl_next": f"{major}.{minor + 1}" if major == 0 else f"{major + 1}",
    }
    files = {
        "pyproject.toml": PYPROJECT,
        f"{module_name(name)}/__init__.py": MODULE,
        "tests/test_plugin.py": TEST,
        "README.md": README,
    }
    for rel, template in files.items():
        write_text_atomic(root / rel, template.format(**values))
    return root


__all__ = ["check_name", "module_name", "scaffold"]
