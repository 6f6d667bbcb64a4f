"""mltl: multi-stage transfer learning for rare medical image datasets.

The library API mirrors the CLI (``mltl run / compare / validate / predict / export / new-plugin``)::

    import mltl
    config = mltl.load_config("examples/rare_liver.toml", ["stages.target.train.epochs=5"])
    result = mltl.run(config)                           # mltl.RunResult
    target = result.stage("target")                     # mltl.StageResult
    target.metrics["auc_macro"], target.test.probs      # test metrics, test-split probabilities
    for path, probs in mltl.predict(result.run_dir / "target", ["new_scans/"]):
        ...
    mltl.export(result.run_dir / "target", "onnx")      # model.onnx + model.onnx.json

Plugins: installed distributions register through the entry-point group ``mltl``; in a notebook or a
test, :func:`register_plugin` registers a module or object whose functions carry :data:`hookimpl`.
The interfaces a plugin implements or returns: :class:`Domain`, :class:`Trunk` (wrapped by mltl into a
:class:`Network`), freeze policies (:class:`FreezePolicy`), and reporters (:class:`Reporter`).

``mltl.predict``, ``mltl.export`` and ``mltl.compare`` are the functions; their modules stay importable
as ``from mltl.predict import ...``.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .chain import RunResult, run, validate
from .compare import Comparison, compare
from .config import Config, Stage, StageConfig, load_config
from .domain import Domain
from .errors import ConfigError, UserError
from .export import ExportResult, export
from .freeze import FreezePolicy
from .hookspecs import hookimpl
from .network import HeadSpec, Network, Trunk
from .plugins import get_registry, register_plugin, unregister_plugin
from .predict import TrainedStage, load_stage, predict
from .reporting import Reporter
from .results import Predictions, StageResult

__all__ = [
    "Comparison", "Config", "ConfigError", "Domain", "ExportResult", "FreezePolicy", "HeadSpec", "Network",
    "Predictions", "Reporter", "RunResult", "Stage", "StageConfig", "StageResult", "TrainedStage", "Trunk",
    "UserError", "__version__", "compare", "export", "get_registry", "hookimpl", "load_config", "load_stage",
    "predict", "register_plugin", "run", "unregister_plugin", "validate",
]
