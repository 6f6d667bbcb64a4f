"""The fixtures of tests/conftest.py, for the tests each first-party plugin carries in plugins/<name>/tests/.

pytest applies a conftest.py only to the tests below its own folder, so the shared fixtures are re-exported
here: the autouse ``_isolated_cache`` (every test's decoded-image cache in a temporary folder, MLTL_QUIET set),
``shared_data`` (../shared/data: skipped where absent, a failure under CI=true), ``fresh_plugins`` and
``tiny_config``. ``tests`` is importable because pyproject.toml sets ``pythonpath = ["."]``.
"""

from tests.conftest import _isolated_cache, fresh_plugins, shared_data, tiny_config  # noqa: F401
