"""The ``mlflow`` reporter: one MLflow run per mltl run, with the configuration, the curves, the test metrics
and the report.

Opt-in (``[run] reporters = [..., "mlflow"]``); needs MLflow's tracking client (``pip install mlflow-skinny``,
or the full ``mlflow``), imported only when the reporter is created. Options
(``[run] reporter_options.mlflow``):

- ``tracking_uri``: where to log. Default: a store inside the run directory, so nothing is written elsewhere:
  ``store = "file"`` (the default) is MLflow's file store ``RUN_DIR/mlruns``; ``store = "sqlite"`` is
  ``RUN_DIR/mlflow.db`` with the artifacts in ``RUN_DIR/mlruns`` (needs ``sqlalchemy`` and ``alembic``,
  which the full ``mlflow`` brings). Any other URI (``http://host:5000``, ``sqlite:///path/mlflow.db``,
  ``databricks``) is passed to MLflow as it is.
- ``experiment``: the experiment's name; default the run's name (``[run] name``).
- ``run_name``: the MLflow run's name; default the run directory's name.

What is logged:

- ``run_started``: the resolved configuration as parameters, flattened (``stages.target.train.lr``,
  ``input.size``; a swept key holds its values; values cut to MLflow's length limit), tags ``mltl.run_dir``,
  ``mltl.config`` and ``mltl.version``, and ``config.toml``, the source config and ``environment.json`` as
  artifacts under ``config/``.
- ``epoch_ended``: the epoch's numbers (``loss``, ``lr``, ``val_loss``, ``val_auc``, ``val_accuracy``,
  ``seconds``) as metrics ``<stage>[/<variant>]/<name>`` at ``step=epoch`` (validation only on the epochs
  that scored it).
- ``stage_finished``: the stage's test metrics ``<stage>/test/<name>`` (``auc_macro``, ``accuracy``,
  ``balanced_accuracy``, ... and, for a repeated stage, ``auc_macro_mean`` / ``_sd``).
- ``run_finished``: ``report.md``, ``report.html`` and every figure (``*.png``, ``*.svg``) of the run directory
  (under ``figures/``, by their path in the run directory) as artifacts; then the run ends as FINISHED.

A resumed run (``mltl run --resume``) continues the MLflow run of the same run directory where the store
still holds it.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mltl
from mltl import RunFiles, UserError

INSTALL_HINT = "the mlflow reporter needs MLflow's tracking client: pip install mlflow-skinny"
STORES = ("file", "sqlite")
#: the characters MLflow accepts in a parameter or metric name, everything else becomes "_"
_NAME_UNSAFE = re.compile(r"[^\w\-. :/]")
#: folders of the run directory whose files are not the run's figures
_NOT_FIGURES = ("mlruns", "tensorboard", "wandb")


def flatten_config(config: Any) -> dict[str, Any]:
    """The resolved configuration as flat ``dotted.key -> value``: ``run.*`` and ``input.*`` with their
    defaults, and ``stages.<name>.*`` for every stage (domain and backbone options beside ``plugin`` /
    ``name``; a key a sweep varies holds the list of its values, in variant order). Values are ``None``,
    ``bool``, ``int``, ``float``, ``str`` or a list of these."""
    flat: dict[str, Any] = {}
    _flatten(config.run, "run", flat)
    _flatten(config.input, "input", flat)
    for stage in config.stages:
        variants = []
        for _, stage_config in stage.variants:
            one: dict[str, Any] = {}
            _flatten(stage_config, f"stages.{stage.name}", one)
            variants.append(one)
        keys = list(dict.fromkeys(k for one in variants for k in one))
        for key in keys:
            values = [one.get(key) for one in variants]
            flat[key] = values[0] if all(v == values[0] for v in values) else values
        if stage.swept:
            flat[f"stages.{stage.name}.swept"] = list(stage.swept)
        flat[f"stages.{stage.name}.select_by"] = stage.select_by
    return flat


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
    fields = getattr(type(value), "__attrs_attrs__", None)
    if fields is not None:
        for field in fields:
            item = getattr(value, field.name)
            # DomainRef / BackboneRef: the options sit beside the plugin's name, as in the TOML
            _flatten(item, prefix if field.name == "options" and isinstance(item, dict) else f"{prefix}.{field.name}",
                     out)
    elif isinstance(value, dict):  # an empty one (no reporter options) adds nothing
        for key, item in value.items():
            _flatten(item, f"{prefix}.{key}", out)
    elif isinstance(value, (list, tuple)):
        out[prefix] = [v if isinstance(v, (str, int, float, bool)) or v is None else str(v) for v in value]
    elif value is None or isinstance(value, (str, int, float, bool)):
        out[prefix] = value
    else:
        out[prefix] = str(value)


#: the user-information part of a URI (``https://user:token@host``), never logged
_URI_CREDENTIALS = re.compile(r"(?<=://)[^/@\s]+@")


def param_text(value: Any) -> str:
    """A flattened value as the string a tracker stores: JSON-like (``true``, ``["C1", "C1-C2"]``), ``None``
    as ``"None"``, credentials in a URI (``https://user:token@host``) replaced by ``***``."""
    if isinstance(value, str):
        text = value
    elif value is None:
        text = "None"
    else:
        text = json.dumps(value)
    return _URI_CREDENTIALS.sub("***@", text)


def metric_name(*parts: str) -> str:
    """``stage/variant/name`` with the characters MLflow refuses replaced (``freeze=C1,seed=2`` becomes
    ``freeze:C1_seed:2``)."""
    return "/".join(_NAME_UNSAFE.sub("_", p.replace("=", ":").replace(",", "_")) for p in parts if p)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


class MlflowReporter:
    """One MLflow run per mltl run (see the module docstring)."""

    opt_in = True  # not among the default reporters: named in [run] reporters

    def __init__(self, *, tracking_uri: str | None = None, store: str = "file", experiment: str | None = None,
                 run_name: str | None = None):
        if store not in STORES:
            raise ValueError(f"store must be one of {', '.join(map(repr, STORES))}, got {store!r}")
        if tracking_uri is not None and not tracking_uri.strip():
            raise ValueError("tracking_uri must not be empty; leave it out for a store inside the run directory")
        try:
            import mlflow  # noqa: F401
            from mlflow.entities import Metric, Param
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise UserError(INSTALL_HINT) from None
        self._client_class, self._metric, self._param = MlflowClient, Metric, Param
        try:
            from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH
        except ImportError:  # an MLflow that moved it: the oldest, smallest limit
            MAX_PARAM_VAL_LENGTH = 250
        self.max_param_length = int(MAX_PARAM_VAL_LENGTH)
        self.tracking_uri_option = tracking_uri
        self.store = store
        self.experiment = experiment
        self.run_name = run_name
        # what it writes in the run directory, so that no stage folder may take that name (mltl validate)
        self.log_dir = "mlruns" if tracking_uri is None else None
        self.tracking_uri: str | None = None
        self.run_id: str | None = None
        self.run_dir: Path | None = None
        self._client: Any = None
        self._file_store = False
        self._artifact_location: str | None = None

    # ------------------------------------------------------------ the store

    @contextmanager
    def _allowed(self) -> Iterator[None]:
        """MLflow 3.x refuses its file store unless ``MLFLOW_ALLOW_FILE_STORE`` is true (its check runs on every
        call): set it around this reporter's own calls to a file store, never beyond them."""
        if not self._file_store or os.environ.get("MLFLOW_ALLOW_FILE_STORE") is not None:
            yield
            return
        os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
        try:
            yield
        finally:
            os.environ.pop("MLFLOW_ALLOW_FILE_STORE", None)

    def _open(self, run_dir: Path) -> None:
        run_dir = Path(run_dir).resolve()
        self.run_dir = run_dir
        artifact_location = None
        if self.tracking_uri_option is not None:
            self.tracking_uri = self.tracking_uri_option
            self._file_store = "://" not in self.tracking_uri or self.tracking_uri.startswith("file:")
        elif self.store == "sqlite":
            self.tracking_uri = "sqlite:///" + (run_dir / "mlflow.db").as_posix()
            artifact_location = (run_dir / "mlruns").as_uri()
        else:
            self.tracking_uri = (run_dir / "mlruns").as_uri()
            self._file_store = True
        with self._allowed():
            self._client = self._client_class(tracking_uri=self.tracking_uri)
        self._artifact_location = artifact_location

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        with self._allowed():
            return getattr(self._client, method)(*args, **kwargs)

    # ------------------------------------------------------------ the events

    def run_started(self, config: Any, run_dir: Path) -> None:
        self._open(run_dir)
        name = self.experiment or config.run.name
        with self._allowed():
            found = self._client.get_experiment_by_name(name)
            experiment_id = found.experiment_id if found is not None else self._client.create_experiment(
                name, artifact_location=self._artifact_location)
        self.run_id = self._existing_run(experiment_id)
        if self.run_id is None:
            run = self._call("create_run", experiment_id, run_name=self.run_name or self.run_dir.name, tags={
                "mltl.run_dir": str(self.run_dir), "mltl.config": str(config.source),
                "mltl.version": mltl.__version__})
            self.run_id = run.info.run_id
        else:
            self._call("update_run", self.run_id, status="RUNNING")
        params = [self._param(_NAME_UNSAFE.sub("_", key), param_text(value)[: self.max_param_length])
                  for key, value in flatten_config(config).items()]
        existing = self._call("get_run", self.run_id).data.params
        params = [p for p in params if p.key not in existing]  # a resumed run logged them already
        for i in range(0, len(params), 100):  # MLflow's limit per batch
            self._call("log_batch", self.run_id, params=params[i: i + 100])
        files = RunFiles(self.run_dir)
        for path in (files.config, files.environment):
            if path.is_file():
                self._call("log_artifact", self.run_id, str(path), "config")
        source = Path(str(config.source))
        if source.is_file() and source.resolve() != files.config.resolve():
            self._call("log_artifact", self.run_id, str(source), "config/source")

    def _existing_run(self, experiment_id: str) -> str | None:
        """The unfinished MLflow run of this run directory (a resumed mltl run), if the store holds one."""
        quoted = str(self.run_dir).replace("\\", "\\\\").replace("'", "\\'")
        try:
            runs = self._call("search_runs", [experiment_id], filter_string=f"tags.`mltl.run_dir` = '{quoted}'",
                              max_results=5)
        except Exception:  # a store without tag search, or a path it cannot quote: a new run is fine
            return None
        for run in runs:
            if run.info.status != "FINISHED":
                return run.info.run_id
        return None

    def _log_metrics(self, values: dict[str, float], step: int) -> None:
        if self.run_id is None or not values:
            return
        now = int(time.time() * 1000)
        metrics = [self._metric(key, value, now, step) for key, value in values.items()]
        for i in range(0, len(metrics), 1000):
            self._call("log_batch", self.run_id, metrics=metrics[i: i + 1000])

    def epoch_ended(self, stage_name: str, variant: str, epoch: int, metrics: dict[str, Any]) -> None:
        values = {}
        for key, value in metrics.items():
            number = _number(value)
            if key not in ("epoch", "epochs") and number is not None:
                values[metric_name(stage_name, variant, key)] = number
        self._log_metrics(values, int(epoch))

    def stage_finished(self, result: Any) -> None:
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
        self._log_metrics(values, 0)

    def run_finished(self, results: list[Any], run_dir: Path) -> None:
        if self.run_id is None:
            return
        root = Path(run_dir).resolve()
        files = RunFiles(root)
        for path in (files.report_md, files.report_html):
            if path.is_file():
                self._call("log_artifact", self.run_id, str(path))
        for path in sorted(p for suffix in ("*.png", "*.svg") for p in root.rglob(suffix)):
            relative = path.relative_to(root)
            if relative.parts[0] in _NOT_FIGURES or not path.is_file():
                continue
            folder = "/".join(("figures", *relative.parts[:-1]))
            self._call("log_artifact", self.run_id, str(path), folder)
        self._call("set_terminated", self.run_id, "FINISHED")
        self.run_id = None
