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

``mltl.predict``, ``mltl.export`` and ``mltl.compare`` are the functions; their modules are
``mltl.deploy.predict``, ``mltl.deploy.export`` and ``mltl.running.compare``.

The plugin API: this module is the one thing a plugin imports from mltl (``from mltl import ...``, the
names in ``__all__``). Besides the interfaces above it offers the helpers plugins share with the core:
reading images and manifests (:func:`is_dicom_file`, :func:`read_image`, :func:`read_manifest`,
:func:`class_folders`), patient pseudonyms (:func:`pseudonym`, :func:`resolve_salt`), preprocessing as in
training (:class:`InputConfig`, :func:`prepare_images`, :func:`normalise`, :func:`make_splits`), a finished
stage (its files named by :class:`StageFiles` and :class:`RunFiles`, :func:`load_network`,
:func:`read_predictions`), crash-safe writes (:func:`write_bytes_atomic`,
:func:`write_json_atomic`, :func:`write_text_atomic`), messages (:func:`did_you_mean`), the macro AUC and
its one stratified bootstrap (:func:`macro_auc`, :func:`bootstrap_auc_ci`, :func:`paired_bootstrap` ...), and
the blocks a report hook returns (:class:`StageReport`, :class:`Heading`, :class:`Para`, :class:`Table`,
:class:`Figure`). The modules behind them are internal and move without notice;
``tests/test_architecture.py`` checks that first-party plugins import nothing else.
"""

from __future__ import annotations

from .builtins import class_folders
from .config import Config, InputConfig, Stage, StageConfig, load_config
from .data.domain import Domain, make_splits, prepare_images
from .data.images import IMAGE_SUFFIXES, is_dicom_file, read_image
from .data.manifest import read_manifest
from .data.privacy import pseudonym, resolve_salt
from .deploy.export import ExportResult, export
from .deploy.predict import TrainedStage, load_stage, predict
from .errors import ConfigError, UserError, did_you_mean
from .evaluation.report import Figure, Heading, Para, StageReport, Table
from .evaluation.reporting import Reporter
from .evaluation.results import Predictions, StageResult
from .evaluation.stats import (
                    bootstrap_auc_ci,
                    bootstrap_macro_aucs,
                    check_scores,
                    delong_test,
                    macro_auc,
                    paired_bootstrap,
                    scored_classes,
                    stratified_resamples,
)
from .data.cache import cache_dir
from .data.limits import check_decoded_bytes, check_image_pixels, few
from .hookspecs import hookimpl
from .networks.freeze import FreezePolicy
from .networks.network import HeadSpec, Network, Preprocessing, Trunk
from .plugins import get_registry, register_plugin, unregister_plugin
from .running.chain import RunResult, run
from .running.compare import Comparison, compare
from .running.preflight import validate
from .running.rundir import (RunFiles, StageFiles, load_network, read_predictions, unguard_csv_cell,
                             write_bytes_atomic, write_json_atomic, write_text_atomic)
from .training.train import normalise
from .version import __version__

__all__ = [
    "Comparison", "Config", "ConfigError", "Domain", "ExportResult", "FreezePolicy", "HeadSpec", "Network",
    "Preprocessing",
    "Predictions", "Reporter", "RunResult", "Stage", "StageConfig", "StageResult", "TrainedStage", "Trunk",
    "UserError", "__version__", "compare", "export", "get_registry", "hookimpl", "load_config", "load_stage",
    "predict", "register_plugin", "run", "unregister_plugin", "validate",
    # helpers for plugins (see the module docstring)
    "IMAGE_SUFFIXES", "InputConfig", "class_folders", "did_you_mean", "is_dicom_file", "load_network",
    "make_splits", "normalise", "prepare_images", "pseudonym", "read_image", "read_manifest",
    "read_predictions", "resolve_salt", "write_bytes_atomic", "write_json_atomic", "write_text_atomic",
    "RunFiles", "StageFiles", "unguard_csv_cell", "check_decoded_bytes", "check_image_pixels", "few",
    "cache_dir",
    # AUCs and their one bootstrap (mltl.evaluation.stats); report blocks for the report hooks (mltl.evaluation.report)
    "bootstrap_auc_ci", "bootstrap_macro_aucs", "check_scores", "delong_test", "macro_auc", "paired_bootstrap",
    "scored_classes", "stratified_resamples", "Figure", "Heading", "Para", "StageReport", "Table",
]
