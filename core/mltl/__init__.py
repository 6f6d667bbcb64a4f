"""mltl: multi-stage transfer learning for rare medical image datasets.

The library API mirrors the CLI::

    import mltl
    config = mltl.load_config("examples/rare_liver.toml", ["stages.target.train.epochs=5"])
    result = mltl.run(config)
    result.stage("target").metrics["auc_macro"]
"""

from __future__ import annotations

__version__ = "0.1.0"

from .chain import RunResult, run, validate
from .config import Config, Stage, StageConfig, load_config
from .domain import Domain
from .errors import ConfigError, UserError
from .freeze import FreezePolicy
from .hookspecs import hookimpl
from .network import HeadSpec, Network, Trunk
from .plugins import get_registry, register_plugin, unregister_plugin
from .results import Predictions, StageResult

__all__ = [
    "Config", "ConfigError", "Domain", "FreezePolicy", "HeadSpec", "Network", "Predictions", "RunResult",
    "Stage", "StageConfig", "StageResult", "Trunk", "UserError", "__version__", "get_registry", "hookimpl",
    "load_config", "register_plugin", "run", "unregister_plugin", "validate",
]
