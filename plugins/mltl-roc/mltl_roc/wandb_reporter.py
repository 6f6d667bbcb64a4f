"""The ``wandb`` reporter: one Weights & Biases run per mltl run, offline by default, kept inside the run
directory.

Opt-in (``[run] reporters = [..., "wandb"]``); needs ``pip install wandb``, imported only when the reporter is
created. Options (``[run] reporter_options.wandb``):

- ``mode``: ``"offline"`` (the default) writes the W&B run into ``RUN_DIR/wandb/`` and nowhere else: no
  account, no network; ``wandb sync RUN_DIR/wandb/offline-run-*`` uploads it later. ``"online"`` also streams
  it to the W&B server (needs ``wandb login`` or ``WANDB_API_KEY``); only when you ask for it.
- ``project``: the W&B project; default the run's name (``[run] name``).
- ``entity``: the W&B user or team (online); default W&B's own default.
- ``run_name``: the W&B run's name; default the run directory's name.

While the reporter talks to wandb it points ``WANDB_DIR``, ``WANDB_CACHE_DIR``, ``WANDB_CONFIG_DIR`` and
``WANDB_DATA_DIR`` at ``RUN_DIR/wandb`` and folders inside it (so W&B's debug logs, settings and staging stay
in the run directory, never in ``~/.cache``, ``~/.config`` or ``~/.local/share``), and restores them after
each call. W&B's background process, started with the run, inherits them and is stopped when the run ends
(unless W&B was already running in the process before).

What is logged:

- ``run_started``: the resolved configuration as the run's config, flattened as for the mlflow reporter
  (``stages.target.train.lr``, ``input.size``; numbers stay numbers, lists stay lists; credentials in a URI
  replaced by ``***``), with ``mltl.run_dir``, ``mltl.config`` and ``mltl.version``; ``config.toml``,
  ``environment.json`` and the source config as files under ``config/``.
- ``epoch_ended``: ``<stage>[/<variant>]/<name>`` (``loss``, ``lr``, ``val_loss``, ``val_auc``,
  ``val_accuracy``, ``seconds``) with ``<stage>[/<variant>]/epoch`` as their x-axis (``define_metric``).
- ``stage_finished``: the stage's test metrics in the run's summary, ``<stage>/test/<name>``.
- ``run_finished``: ``report.md``, ``report.html`` and every figure of the run directory (``*.png``,
  ``*.svg``, under ``figures/`` by their path there) as files of the run; then the run is finished.

A resumed run (``mltl run --resume``) continues the W&B run of the same run directory (same run id, steps
counted on from where it stopped; ``RUN_DIR/wandb/mltl-wandb.json`` keeps both).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mltl
from mltl import RunFiles, UserError

from .mlflow_reporter import _NOT_FIGURES, _URI_CREDENTIALS, _number, flatten_config, metric_name

INSTALL_HINT = "the wandb reporter needs Weights & Biases: pip install wandb"
MODES = ("offline", "online")
FOLDER = "wandb"
#: the environment wandb reads for its folders, and where they go inside RUN_DIR/wandb
_ENV_FOLDERS = {"WANDB_DIR": "", "WANDB_CACHE_DIR": ".cache", "WANDB_CONFIG_DIR": ".config",
                "WANDB_DATA_DIR": ".data"}
STATE = "mltl-wandb.json"


def _clean(value: Any) -> Any:
    """A flattened config value for wandb: as it is, with credentials in a URI replaced by ``***``."""
    if isinstance(value, str):
        return _URI_CREDENTIALS.sub("***@", value)
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


class WandbReporter:
    """One W&B run per mltl run (see the module docstring)."""

    opt_in = True  # not among the default reporters: named in [run] reporters

    def __init__(self, *, mode: str = "offline", project: str | None = None, entity: str | None = None,
                 run_name: str | None = None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(map(repr, MODES))}, got {mode!r}")
        for name, value in (("project", project), ("entity", entity), ("run_name", run_name)):
            if value is not None and not str(value).strip():
                raise ValueError(f"{name} must not be empty; leave it out for the default")
        try:
            import wandb
        except ImportError:
            raise UserError(INSTALL_HINT) from None
        self._wandb = wandb
        self.mode = mode
        self.project = project
        self.entity = entity
        self.run_name = run_name
        # what it writes in the run directory, so that no stage folder may take that name (mltl validate)
        self.log_dir = FOLDER
        self.run: Any = None
        self.run_dir: Path | None = None
        self.step = 0
        self._defined: set[str] = set()
        self._teardown = False

    # ------------------------------------------------------------ the environment

    @contextmanager
    def _inside(self) -> Iterator[None]:
        """wandb's folders inside ``RUN_DIR/wandb`` for the duration of one call, the caller's afterwards."""
        folder = self.run_dir / FOLDER
        saved = {key: os.environ.get(key) for key in (*_ENV_FOLDERS, "WANDB_MODE")}
        try:
            for key, sub in _ENV_FOLDERS.items():
                path = folder / sub if sub else folder
                path.mkdir(parents=True, exist_ok=True)
                os.environ[key] = str(path)
            os.environ["WANDB_MODE"] = self.mode
            yield
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    def _state(self) -> Path:
        return self.run_dir / FOLDER / STATE

    def _save_state(self) -> None:
        self._state().write_text(json.dumps({"id": self.run.id, "step": self.step}) + "\n")

    # ------------------------------------------------------------ the events

    def run_started(self, config: Any, run_dir: Path) -> None:
        self.run_dir = Path(run_dir).resolve()
        wandb = self._wandb
        run_id, self.step = None, 0
        with self._inside():
            if self._state().is_file():  # mltl run --resume: the same W&B run, steps counted on
                state = json.loads(self._state().read_text())
                run_id, self.step = state["id"], int(state["step"])
            from wandb.sdk import wandb_setup

            running = getattr(getattr(wandb_setup, "_singleton", None), "_connection", None) is not None
            self._teardown = not running  # stop W&B's background process with the run if the run started it
            params = {key: _clean(value) for key, value in flatten_config(config).items()}
            params.update({"mltl.run_dir": str(self.run_dir), "mltl.config": str(config.source),
                           "mltl.version": mltl.__version__})
            settings = wandb.Settings(console="off", silent=True, x_disable_stats=True, x_save_requirements=False,
                                      disable_git=True, save_code=False)
            self.run = wandb.init(mode=self.mode, dir=str(self.run_dir), project=self.project or config.run.name,
                                  entity=self.entity, name=self.run_name or self.run_dir.name, id=run_id,
                                  resume="allow" if run_id else None, config=params, settings=settings)
            self._save_state()
            files = RunFiles(self.run_dir)
            for path in (files.config, files.environment):
                self._save(path, f"config/{path.name}")
            source = Path(str(config.source))
            if source.is_file() and source.resolve() != files.config.resolve():
                self._save(source, f"config/source/{source.name}")

    def _save(self, path: Path, name: str) -> None:
        """A copy of ``path`` as the run's file ``name`` (a copy: mltl rewrites the report after the run)."""
        if not path.is_file():
            return
        target = Path(self.run.dir) / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        self.run.save(str(target), base_path=self.run.dir, policy="now")

    def epoch_ended(self, stage_name: str, variant: str, epoch: int, metrics: dict[str, Any]) -> None:
        if self.run is None:
            return
        x_axis = metric_name(stage_name, variant, "epoch")
        values: dict[str, Any] = {}
        for key, value in metrics.items():
            number = _number(value)
            if key not in ("epoch", "epochs") and number is not None:
                values[metric_name(stage_name, variant, key)] = number
        if not values:
            return
        with self._inside():
            for key in values:
                if key not in self._defined:
                    self.run.define_metric(key, step_metric=x_axis)
                    self._defined.add(key)
            self.run.log({x_axis: int(epoch), **values}, step=self.step)
            self.step += 1
            self._save_state()

    def stage_finished(self, result: Any) -> None:
        if self.run is None:
            return
        m = result.metrics
        values = {}
        for key, value in m.items():
            number = _number(value)
            if number is not None:
                values[metric_name(result.name, "test", key)] = number
        auc = (m.get("protocol") or {}).get("auc_macro") or {}
        for stat in ("mean", "sd"):
            number = _number(auc.get(stat))
            if number is not None:
                values[metric_name(result.name, "test", f"auc_macro_{stat}")] = number
        if values:
            with self._inside():
                self.run.summary.update(values)

    def run_finished(self, results: list[Any], run_dir: Path) -> None:
        if self.run is None:
            return
        root = Path(run_dir).resolve()
        files = RunFiles(root)
        with self._inside():
            for path in (files.report_md, files.report_html):
                self._save(path, path.name)
            for path in sorted(p for suffix in ("*.png", "*.svg") for p in root.rglob(suffix)):
                relative = path.relative_to(root)
                if relative.parts[0] in _NOT_FIGURES or not path.is_file():
                    continue
                self._save(path, "/".join(("figures", *relative.parts)))
            self.run.finish()
            self.run = None
            if self._teardown:
                self._wandb.teardown()
