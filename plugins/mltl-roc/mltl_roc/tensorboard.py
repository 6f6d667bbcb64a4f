"""The ``tensorboard`` reporter: training curves and test metrics as TensorBoard scalars.

Opt-in (``[run] reporters = [..., "tensorboard"]``), and registered only where the ``tensorboard`` package
is installed (``pip install tensorboard``). Writes ``RUN_DIR/tensorboard/<stage>[/<variant>]/`` event files
through ``torch.utils.tensorboard``; view them with ``tensorboard --logdir RUN_DIR/tensorboard``.

Per epoch: ``train/loss``, ``train/lr``, ``val/loss``, ``val/auc``, ``val/accuracy`` (validation only on the
epochs that scored it, see ``train.val_every``). Per finished stage: ``test/auc_macro``, ``test/accuracy``,
``test/balanced_accuracy`` at step 0 and, for a repeated stage, ``test/auc_macro_mean`` and ``_sd``.

Per run: the resolved configuration, flattened (``stages.target.train.lr``, as the ``mlflow`` reporter logs
its parameters), as hyper-parameters of TensorBoard's HPARAMS tab, with the final metrics of every stage
(``final/<stage>/auc_macro``, ``accuracy``, ``balanced_accuracy`` and, for a repeated stage,
``auc_macro_mean``) as its metrics, in ``RUN_DIR/tensorboard/_hparams/`` (a name no stage can have).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from mltl import UserError

HPARAMS_RUN = "_hparams"  # stage names start with a letter or digit: never a stage's folder
FINAL_METRICS = ("auc_macro", "accuracy", "balanced_accuracy")
EPOCH_SCALARS = {"loss": "train/loss", "lr": "train/lr", "val_loss": "val/loss", "val_auc": "val/auc",
                 "val_accuracy": "val/accuracy"}


def available() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


class TensorBoardReporter:
    """TensorBoard scalars of every stage (see the module docstring)."""

    opt_in = True  # not among the default reporters: named in [run] reporters

    def __init__(self, *, log_dir: str = "tensorboard"):
        if not log_dir or Path(log_dir).name != log_dir:
            raise UserError(f"log_dir must be a plain folder name inside the run directory, got {log_dir!r}")
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("the tensorboard reporter needs the tensorboard package: pip install tensorboard") from None
        self._writer_class = SummaryWriter
        self.log_dir = log_dir
        self.root: Path | None = None
        self._writers: dict[str, Any] = {}
        self._hparams: dict[str, Any] | None = None

    def _writer(self, name: str) -> Any:
        if name not in self._writers:
            self._writers[name] = self._writer_class(log_dir=str(self.root / name))
        return self._writers[name]

    def run_started(self, config: Any, run_dir: Path) -> None:
        from .mlflow_reporter import flatten_config, param_text

        self.root = Path(run_dir) / self.log_dir
        # numbers stay numbers (sortable in the HPARAMS tab); everything else as the text MLflow would hold
        self._hparams = {key: value if isinstance(value, (int, float)) and not isinstance(value, bool)
                         else param_text(value) for key, value in flatten_config(config).items()}

    def stage_started(self, stage_name: str, stage_dir: Path) -> None:
        self.root = Path(stage_dir).parent / self.log_dir

    def epoch_ended(self, stage_name: str, variant: str, epoch: int, metrics: dict[str, Any]) -> None:
        if self.root is None:
            return
        w = self._writer(f"{stage_name}/{variant.replace(',', '+')}" if variant else stage_name)
        for key, tag in EPOCH_SCALARS.items():
            value = metrics.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                w.add_scalar(tag, float(value), int(epoch))
        w.flush()

    def stage_finished(self, result: Any) -> None:
        if self.root is None:
            self.root = Path(result.stage_dir).parent / self.log_dir
        m = result.metrics
        w = self._writer(result.name)
        for key in ("auc_macro", "accuracy", "balanced_accuracy"):
            if isinstance(m.get(key), (int, float)) and math.isfinite(m[key]):
                w.add_scalar(f"test/{key}", float(m[key]), 0)
        proto = m.get("protocol") or {}
        auc = proto.get("auc_macro") or {}
        for stat in ("mean", "sd"):
            if isinstance(auc.get(stat), (int, float)):
                w.add_scalar(f"test/auc_macro_{stat}", float(auc[stat]), 0)
        w.flush()

    def run_finished(self, results: list[Any], run_dir: Path) -> None:
        if self._hparams is not None:
            self._write_hparams(results, Path(run_dir) / self.log_dir)
        for w in self._writers.values():
            w.close()
        self._writers.clear()

    def _write_hparams(self, results: list[Any], root: Path) -> None:
        """The run's configuration and final metrics for TensorBoard's hparams plugin (what
        ``SummaryWriter.add_hparams`` writes, into a folder of our choosing rather than a time-stamped one)."""
        from torch.utils.tensorboard.summary import hparams

        final: dict[str, float] = {}
        for result in results:
            m = result.metrics
            for key in FINAL_METRICS:
                if isinstance(m.get(key), (int, float)) and math.isfinite(m[key]):
                    final[f"final/{result.name}/{key}"] = float(m[key])
            mean = ((m.get("protocol") or {}).get("auc_macro") or {}).get("mean")
            if isinstance(mean, (int, float)) and math.isfinite(mean):
                final[f"final/{result.name}/auc_macro_mean"] = float(mean)
        experiment, start, end = hparams(self._hparams, final)
        with self._writer_class(log_dir=str(root / HPARAMS_RUN)) as w:
            for summary in (experiment, start, end):
                w.file_writer.add_summary(summary)
            for tag, value in final.items():
                w.add_scalar(tag, value, 0)
        self._hparams = None
