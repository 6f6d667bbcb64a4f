"""The stage-list config: TOML in, validated attrs objects out.

Reading a config never executes code: TOML is parsed with :mod:`tomllib` and every key is checked
against the classes below. Every error names the file, the key path (``stages[1].freeze``) and the
problem, and suggests the closest valid key for a typo. ``--set KEY=VALUE`` overrides (:func:`apply_overrides`)
are applied to the parsed TOML before validation, so they are checked the same way.

A **sweep** is a table ``{ sweep = [v1, v2, ...], select_by = "auc" }`` in place of any value of a stage
(``backbone``, ``freeze``, ``train.lr``, ``domain.size``, ...). The stage then trains one variant per value
(the cartesian product when several keys are swept), picks the best on the validation split by
``select_by``, and hands only the winner on. The paper's choice of GFE structure and its freeze variants
are both sweeps.
"""

from __future__ import annotations

import copy
import datetime
import itertools
import json
import math
import re
import tomllib
import typing
from pathlib import Path
from typing import Any, Literal

import attrs

from .errors import ConfigError, UserError, did_you_mean
from .networks.network import HeadSpec
from .running.rundir import RunFiles

METRICS = ("auc", "accuracy", "balanced_accuracy", "loss")

# Limits on what a config may ask for (docs/errors.md, "Hardening"): anything beyond them is refused when the
# config is parsed, before any data is read, instead of failing deep inside numpy or torch (or after training).
SEED_MAX = 2**32 - 1  # numpy's seed range (legacy) and well inside torch's
MAX_INPUT_SIZE = 4096  # pixels per side
MAX_HEAD_WIDTH = 65536  # units of one new dense layer
MAX_HEAD_LAYERS = 64
MAX_NAME_LENGTH = 64  # stage and run names become folder names
MAX_VARIANTS = 1000  # variants of one stage (the product of its sweeps)
MAX_REPEATS = 1000  # split.folds, split.draws, split.seeds
MAX_NESTING = 32  # tables and arrays inside each other

# What a run writes at the top of its directory besides its own files (mltl.running.rundir.RunFiles): the
# reporters' run-level outputs and a comparison's files. A stage folder of one of these names would collide
# with it. Compared case-insensitively (macOS, Windows).
RESERVED_STAGE_NAMES = frozenset({
    "roc_stages.png", "roc_chains.png", "metrics.jsonl", "tensorboard", "comparison.md", "comparison.html",
    "comparison.json", "runs",
})
_RESERVED_PATTERNS = (r"environment-resume-.*\.json", r"(con|prn|aux|nul|com\d|lpt\d)(\..*)?")  # Windows devices
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def check_folder_name(value: Any, what: str) -> None:
    """Raise ValueError unless ``value`` is a safe folder name (a stage's or a run's)."""
    rule = "letters, digits, '_', '.' or '-', starting with a letter or digit"
    if not isinstance(value, str) or not SAFE_NAME.fullmatch(value):
        raise ValueError(f"is not a valid {what} name: use {rule} (it becomes a folder name)")
    if len(value) > MAX_NAME_LENGTH:
        raise ValueError(f"is too long for a {what} name ({len(value)} characters; at most {MAX_NAME_LENGTH})")
    if ".." in value or value.endswith("."):
        raise ValueError(f"is not a valid {what} name: '..' and a trailing '.' are not allowed")
    low = value.lower()
    if low in RESERVED_STAGE_NAMES or RunFiles.is_own_name(low) or any(re.fullmatch(p, low) for p in _RESERVED_PATTERNS):
        raise ValueError(f"is not a valid {what} name: it is the name of a file or folder that a run writes "
                         f"(or a reserved device name); choose another")


def _seed(instance, attribute, value) -> None:
    if value is not None and not 0 <= value <= SEED_MAX:
        raise ValueError(f"must be a seed from 0 to {SEED_MAX} (2**32 - 1)")


def _input_size(instance, attribute, value) -> None:
    if not 0 < value <= MAX_INPUT_SIZE:
        raise ValueError(f"must be from 1 to {MAX_INPUT_SIZE} pixels")


def _repeats(instance, attribute, value) -> None:
    if value > MAX_REPEATS:
        raise ValueError(f"must be at most {MAX_REPEATS}")


MAX_RUN_NAME_LENGTH = 100


def _run_name(instance, attribute, value) -> None:
    """A run name becomes ``runs/<name>``: it must stay one folder inside ``runs/``."""
    if not value.strip(". "):
        raise ValueError("is not a valid run name: it must hold a letter or digit (it becomes the folder runs/<name>)")
    if any(c in value for c in "/\\:") or not value.isprintable():
        raise ValueError("is not a valid run name: no '/', '\\', ':' or control characters (it becomes the folder "
                         "runs/<name>; use [run] out or --out to choose another place)")
    if len(value) > MAX_RUN_NAME_LENGTH:
        raise ValueError(f"is too long for a run name ({len(value)} characters; at most {MAX_RUN_NAME_LENGTH})")


def doc(text: str, **kw: Any) -> dict[str, Any]:
    return {"doc": text, **kw}


def _positive(instance, attribute, value) -> None:
    if value is not None and value <= 0:
        raise ValueError("must be greater than 0")


def _per_channel(value: Any) -> tuple[float, ...] | None:
    """A normalisation constant: one number or a list of them (one per channel), kept as a tuple."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (float(value),)
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                         for v in value):
        return tuple(float(v) for v in value)
    return value  # the validator says what is wrong


def _channel_values(instance, attribute, value) -> None:
    if value is None:
        return
    if not isinstance(value, tuple) or not all(isinstance(v, float) for v in value):
        raise ValueError("must be a number or a list of numbers (one per channel)")
    if len(value) not in (1, 3):
        raise ValueError(f"must be one number or one per channel (3 for RGB), got {len(value)}")
    if not all(math.isfinite(v) for v in value):
        raise ValueError("must be finite")


def _positive_values(instance, attribute, value) -> None:
    if value is not None and isinstance(value, tuple) and any(v <= 0 for v in value):
        raise ValueError("must be greater than 0")


def _non_negative(instance, attribute, value) -> None:
    if value is not None and value < 0:
        raise ValueError("must be 0 or more")


def _fraction(instance, attribute, value) -> None:
    if not 0 < value < 1:
        raise ValueError("must be a fraction between 0 and 1 (exclusive)")


def _unit_interval(instance, attribute, value) -> None:
    if not 0 <= value < 1:
        raise ValueError("must be at least 0 and below 1")


def _decay(value) -> None:
    if not 0 < value <= 1:
        raise ValueError("must be in (0, 1]")


def _group_lr(value) -> None:
    for name, mult in value.items():
        if isinstance(mult, bool) or not isinstance(mult, (int, float)) or not math.isfinite(mult) or mult <= 0:
            raise ValueError(f"group {name!r}: the multiplier must be a number greater than 0, got {mult!r}")


def _augment_items(instance, attribute, value) -> None:
    from .data.augment import validate_items

    validate_items(instance, attribute, value)


@attrs.frozen
class RunSection:
    name: str = attrs.field(validator=_run_name, metadata=doc("Run name; the run directory defaults to runs/<name>."))
    seed: int = attrs.field(default=0, validator=_seed, metadata=doc("Seed for splits, initialisation and batch order."))
    device: str = attrs.field(default="auto", metadata=doc('"auto" (CUDA when present), "cpu", "cuda" or "cuda:N".'))
    out: str | None = attrs.field(default=None, metadata=doc("Run directory; relative paths are relative to the working directory."))
    reporters: tuple[str, ...] | None = attrs.field(default=None, metadata=doc("Reporters to use; default all installed."))
    reporter_options: dict[str, Any] = attrs.field(factory=dict, metadata=doc('Options per reporter, e.g. { evaluation = { case_aggregate = "max" }, roc = { n_resamples = 2000 } }; checked against the reporter\'s own options (`mltl plugins` lists the reporters).'))
    device_memory_budget_gb: float | None = attrs.field(default=None, validator=_positive, metadata=doc("A domain whose decoded images (at the input size) exceed this stays in host memory and is streamed to the device in batches; default: half the free CUDA memory (on the CPU: the host budget)."))
    host_memory_budget_gb: float | None = attrs.field(default=None, validator=_positive, metadata=doc("Streamed images are prepared once in host memory when they fit this, else read and resized per batch from the domain's (possibly memory-mapped) array; default: half the available memory."))
    baseline: Literal["none", "scratch"] = attrs.field(default="none", metadata=doc('"scratch": also train the last stage from scratch (a stage <last>-scratch: the backbone the first stage selected, or its only one, randomly initialised, with the last stage\'s head, training settings, protocol and the very same splits); the report and the console then open with the chain against it on the same test images (both AUCs, the paired 95% CI of their difference). "none" (default): no baseline. See docs/evaluation.md.'))
    keep: Literal["selected", "all"] = attrs.field(default="selected", metadata=doc('What the run folder keeps once a stage\'s record is on disk: "selected" (default: the model of each stage, of each repeat and the final model; sweep variants keep their histories and records, not their weights; finished checkpoints are removed) or "all" (every sweep variant\'s weights too).'))

    @device.validator
    def _device(self, attribute, value) -> None:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", value):
            raise ValueError('must be "auto", "cpu", "cuda", "cuda:N" or "mps"')


@attrs.frozen
class InputConfig:
    size: int = attrs.field(default=64, validator=_input_size, metadata=doc("Square input size in pixels for every stage (paper: 150)."))
    channels: Literal[1, 3] = attrs.field(default=1, metadata=doc("Input channels: 1 (grey) or 3 (RGB; grey images are replicated)."))
    mean: tuple[float, ...] | None = attrs.field(default=None, converter=_per_channel, validator=_channel_values, metadata=doc("Normalisation (pixel/255 - mean) / std: one number, or one per channel (e.g. ImageNet's [0.485, 0.456, 0.406]); default: the backbone's own (a pretrained timm or torchvision model's), else 0.5."))
    std: tuple[float, ...] | None = attrs.field(default=None, converter=_per_channel, validator=[_channel_values, _positive_values], metadata=doc("Normalisation (pixel/255 - mean) / std: one number, or one per channel; default: the backbone's own, else 0.25."))


@attrs.frozen
class DomainRef:
    plugin: str = attrs.field(metadata=doc("Registered domain name (`mltl plugins`)."))
    options: dict[str, Any] = attrs.field(factory=dict, metadata=doc("Every other key of the table, passed to the domain."))


@attrs.frozen
class BackboneRef:
    name: str = attrs.field(metadata=doc("Registered backbone name (`mltl plugins`)."))
    options: dict[str, Any] = attrs.field(factory=dict, metadata=doc("Every other key of the table, passed to the backbone."))


@attrs.frozen
class SplitConfig:
    val: float = attrs.field(default=0.2, validator=_fraction, metadata=doc("Fraction of each class for validation (model selection, early stopping)."))
    test: float = attrs.field(default=0.2, validator=_fraction, metadata=doc("Fraction of each class for the untouched test split."))
    seed: int | None = attrs.field(default=None, validator=_seed, metadata=doc("Split seed; default: the run seed."))
    min_per_class: int = attrs.field(default=1, validator=_positive, metadata=doc("Fewest images of each class in validation and test."))
    protocol: Literal["auto", "holdout", "kfold", "fractions"] = attrs.field(default="auto", metadata=doc(
        'Evaluation protocol: "holdout" (one train/val/test split), "kfold" (stratified, patient-grouped k-fold: '
        'every image is tested once, by a model that never saw it; val is taken from the other folds), "fractions" '
        '(Samala\'s protocol: the holdout split, training on `fractions` of the training set, `draws` random draws '
        'each), or "auto": kfold for the last stage of the chain when its domain has fewer than 2000 images and no '
        "predefined split, holdout otherwise. See docs/evaluation.md."))
    folds: int = attrs.field(default=5, metadata=doc('"kfold": number of folds (at least 2; each class needs that many patient groups).'))
    fractions: tuple[float, ...] = attrs.field(default=(0.1, 0.25, 0.5, 1.0), metadata=doc('"fractions": fractions of the training split to train on, each in (0, 1].'))
    draws: int = attrs.field(default=5, validator=[_positive, _repeats], metadata=doc('"fractions": random draws of the training subset (and training seeds) per fraction.'))
    seeds: int = attrs.field(default=1, validator=[_positive, _repeats], metadata=doc('"holdout": train this many times with different seeds on the same split and report mean +/- SD.'))
    file: str | None = attrs.field(default=None, metadata=doc("A splits.csv from an earlier run (columns id, split): reuse that exact assignment (holdout only); relative to the working directory."))
    group_near_duplicates: bool = attrs.field(default=False, metadata=doc("Keep exact and near-duplicate images (e.g. neighbouring slices of one scan, for data without patient ids) in one split: their groups are merged into the domain's patient groups. See docs/data-check.md."))
    final_model: bool = attrs.field(default=True, metadata=doc("After a repeated protocol (kfold, fractions, seeds > 1) has measured the stage: also train a final model on all of its non-test data (kfold: every image; otherwise train + val of the holdout split), with the variant selected most often on validation, for the median of the repeats' best epochs; mltl predict, mltl export and the next stage use it (STAGE/final/). false: they use the representative repeat's model. The stage's numbers come from the repeats either way. See docs/evaluation.md."))
    allow_leakage: bool = attrs.field(default=False, metadata=doc("Run even when duplicate images straddle this stage's splits, or join an earlier stage's training images with this stage's validation/test images (otherwise `mltl run` stops; see docs/data-check.md)."))

    @folds.validator
    def _folds(self, attribute, value) -> None:
        if value < 2:
            raise ValueError("must be at least 2")
        _repeats(self, attribute, value)

    @fractions.validator
    def _fractions(self, attribute, value) -> None:
        if not value or any(not 0 < f <= 1 for f in value) or len(set(value)) != len(value):
            raise ValueError("must be a non-empty list of distinct fractions in (0, 1]")


@attrs.frozen
class TrainConfig:
    epochs: int = attrs.field(default=10, validator=_positive, metadata=doc("Training epochs (paper: 1500)."))
    batch_size: int = attrs.field(default=64, validator=_positive, metadata=doc("Mini-batch size (paper: 64)."))
    optimizer: Literal["sgd", "adamw"] = attrs.field(default="sgd", metadata=doc("SGD with momentum, or AdamW."))
    lr: float = attrs.field(default=0.01, validator=_positive, metadata=doc("Initial learning rate (paper: 0.01)."))
    momentum: float = attrs.field(default=0.9, validator=_unit_interval, metadata=doc("SGD momentum."))
    weight_decay: float = attrs.field(default=0.0, validator=_non_negative, metadata=doc("Weight decay."))
    schedule: Literal["cosine", "step", "constant"] = attrs.field(default="cosine", metadata=doc("Learning-rate schedule over the epochs."))
    step_epochs: int = attrs.field(default=30, validator=_positive, metadata=doc('"step" schedule: epochs between decays.'))
    step_gamma: float = attrs.field(default=0.1, validator=_positive, metadata=doc('"step" schedule: decay factor.'))
    warmup_epochs: int = attrs.field(default=0, validator=_non_negative, metadata=doc("Linear warm-up epochs."))
    val_every: int = attrs.field(default=1, validator=_positive, metadata=doc("Score the validation split every N epochs (and after the last); early stopping and the best-epoch checkpoint see only those epochs."))
    patience: int | None = attrs.field(default=None, validator=_positive, metadata=doc("Early stopping: validations without improvement; none = off."))
    monitor: Literal["auc", "accuracy", "balanced_accuracy", "loss"] = attrs.field(default="loss", metadata=doc("Validation metric for early stopping and the best-epoch checkpoint."))
    class_weighted: bool = attrs.field(default=False, metadata=doc("Weight the loss by inverse class frequency of the training split."))
    label_smoothing: float = attrs.field(default=0.0, validator=_unit_interval, metadata=doc("Label smoothing of the cross-entropy."))
    lr_decay: float | None = attrs.field(default=None, validator=attrs.validators.optional(lambda i, a, v: _decay(v)), metadata=doc("Layer-wise learning-rate decay in (0, 1]: the classifier trains at lr, each earlier layer group at lr * lr_decay^k (k counted in network order). See docs/finetuning.md."))
    group_lr: dict[str, float] = attrs.field(factory=dict, validator=lambda i, a, v: _group_lr(v), metadata=doc('Learning-rate multipliers per layer group, e.g. { C1 = 0.1, classifier = 2.0 } (times lr; times the decay when lr_decay is set).'))
    unfreeze_every: int | None = attrs.field(default=None, validator=_positive, metadata=doc("Gradual unfreezing: the head trains alone first (probe_epochs, default N), then one more trunk group joins from the top every N epochs; policy-frozen groups never join."))
    probe_epochs: int | None = attrs.field(default=None, validator=_positive, metadata=doc("Linear probing, then fine-tuning: only the head (N layers and classifier) trains for this many epochs, then every group the freeze policy left trainable."))
    l2sp: float | None = attrs.field(default=None, validator=_non_negative, metadata=doc("L2-SP: add l2sp/2 * ||w - w0||^2 for the weights the stage started from (the earlier stage's; a new backbone's trunk), instead of weight decay on them."))
    l2sp_beta: float | None = attrs.field(default=None, validator=_non_negative, metadata=doc("L2-SP: add l2sp_beta/2 * ||w||^2 for the new layers (those without an anchor)."))
    augment: tuple[str, ...] = attrs.field(default=(), validator=_augment_items, metadata=doc('On-device batch augmentation, a random draw per image: "hflip", "vflip", "rotate:DEG", "crop:MIN_AREA" (random resized crop), "shift[:F]" (plain "shift" = up to 1/16 of the size), "brightness:F", "contrast:F", "intensity:F" (both), "noise:STD"; e.g. ["hflip", "rotate:10", "crop:0.8", "intensity:0.1"]. See docs/performance.md.'))
    sampler: Literal["uniform", "balanced"] = attrs.field(default="uniform", metadata=doc('Batch order: "uniform" (a permutation of the training split each epoch) or "balanced" (each epoch draws as many images, with replacement, with probability inversely proportional to their class frequency, so classes appear about equally often).'))
    compile: bool = attrs.field(default=False, metadata=doc("torch.compile the network for training (falls back to eager with one warning when compilation fails; needs a C compiler on CPU)."))
    compile_mode: Literal["default", "max-autotune-no-cudagraphs"] = attrs.field(default="default", metadata=doc("torch.compile mode when compile = true."))
    sync_batch_norm: bool = attrs.field(default=False, metadata=doc("Under torchrun (DistributedDataParallel): SyncBatchNorm for the trainable BatchNorm layers (statistics over the global batch); default: per-rank statistics."))


@attrs.frozen
class StageConfig:
    """One concrete stage (a sweep expands into several of these, its variants)."""

    name: str = attrs.field(metadata=doc("Stage name, unique in the chain; later stages refer to it with init."))
    domain: DomainRef = attrs.field(metadata=doc('The data: { plugin = "...", options... }.'))
    backbone: BackboneRef | None = attrs.field(default=None, metadata=doc('A new network: "name" or { name = "...", options... }. Exclusive with init.'))
    init: str | None = attrs.field(default=None, metadata=doc("Start from the selected model of this earlier stage. Exclusive with backbone."))
    head: HeadSpec | None = attrs.field(default=None, metadata=doc("Replace the head: { dense = [widths], dropout = p }. Default: keep the earlier stage's head, new classifier when the classes differ."))
    freeze: str = attrs.field(default="none", metadata=doc('Layer groups to freeze: "C1-C3", "C1,F1", "none", "inherited", "all-but-classifier".'))
    split: SplitConfig = attrs.field(factory=SplitConfig, metadata=doc("Train/validation/test split."))
    train: TrainConfig = attrs.field(factory=TrainConfig, metadata=doc("Training settings."))
    select_by: Literal["auc", "accuracy", "balanced_accuracy", "loss"] = attrs.field(default="auc", metadata=doc("Validation metric that picks a sweep's winner."))


@attrs.frozen
class Stage:
    """A stage with its variants: one per combination of swept values (one when nothing is swept)."""

    name: str
    variants: tuple[tuple[str, StageConfig], ...]  # (label such as "freeze=C1-C2", config)
    select_by: str
    swept: tuple[str, ...]  # the swept key paths

    @property
    def first(self) -> StageConfig:
        return self.variants[0][1]


@attrs.frozen
class Config:
    run: RunSection
    input: InputConfig
    stages: tuple[Stage, ...]
    source: str  # the file it came from, for messages
    raw: dict[str, Any]  # the TOML after overrides, written to the run directory
    # [run] baseline = "scratch": the last stage trained from scratch (scratch_stage), planned and run beside the
    # chain (mltl.running.preflight.prepare) but not one of its stages: nothing inherits from it
    baseline: Stage | None = None

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)


TOP_LEVEL = {"run": RunSection, "input": InputConfig, "stages": None}


# ---------------------------------------------------------------- loading


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read, override and validate a config file. Raises :class:`ConfigError` with file and key."""
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{source}: config file not found") from None
    except IsADirectoryError:
        raise UserError(f"{source}: is a folder, not a config file") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{source}: cannot read the config: not UTF-8 text (byte {exc.start}: "
                        f"{exc.object[exc.start:exc.start + 1]!r}); save it as UTF-8") from None
    except OSError as exc:
        raise UserError(f"{source}: cannot read the config: {exc.strerror or exc}") from None
    raw = parse_toml(text.removeprefix("\ufeff"), source)  # a byte-order mark (Windows editors) is not TOML
    raw = apply_overrides(raw, overrides, source)
    return parse_config(raw, source)


def parse_toml(text: str, source: str) -> dict[str, Any]:
    """``tomllib.loads`` with every failure (syntax, nesting too deep for the parser) as one :class:`UserError`."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{source}: invalid TOML: {exc}") from None
    except RecursionError:
        raise UserError(f"{source}: invalid TOML: arrays or tables nested too deeply "
                        f"(at most {MAX_NESTING} levels)") from None
    _check_nesting(raw, source)
    return raw


def _check_nesting(raw: Any, source: str) -> None:
    """Refuse tables and arrays nested deeper than :data:`MAX_NESTING` (iteratively: no recursion)."""
    stack = [(raw, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_NESTING:
            raise UserError(f"{source}: arrays or tables nested too deeply (more than {MAX_NESTING} levels)")
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)


def _check_strings(raw: Any, source: str) -> None:
    """Refuse strings a config cannot hold: a NUL character (no path or name may contain one) and text that is
    not Unicode (``--set`` values with bytes the locale cannot decode arrive as lone surrogates)."""
    stack: list[tuple[Any, str]] = [(raw, "")]
    while stack:
        node, key = stack.pop()
        items: Any = ()
        if isinstance(node, dict):
            items = ((f"{key}.{k}" if key else str(k), k, v) for k, v in node.items())
        elif isinstance(node, list):
            items = ((f"{key}[{i}]", None, v) for i, v in enumerate(node))
        for path, k, v in items:
            for text in (k, v):
                if isinstance(text, str):
                    if "\x00" in text:
                        raise ConfigError("contains a NUL character (\\x00), which no name or path may hold",
                                          key=_printable(path), source=source)
                    if not _is_unicode(text):
                        raise ConfigError("contains bytes that are not valid UTF-8 text", key=_printable(path),
                                          source=source)
            stack.append((v, path))


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _printable(text: str) -> str:
    """``text`` for a one-line message: control characters and lone surrogates escaped."""
    return "".join(c if c.isprintable() and not 0xD800 <= ord(c) <= 0xDFFF else ascii(c)[1:-1] for c in text)


def parse_config(raw: dict[str, Any], source: str = "<config>") -> Config:
    _check_nesting(raw, source)
    _check_strings(raw, source)
    for key in raw:
        if key not in TOP_LEVEL:
            raise ConfigError(f"unknown key{did_you_mean(key, TOP_LEVEL)}", key=_printable(key), source=source)
    if "run" in raw and not isinstance(raw["run"], dict):
        raise ConfigError(f"expected a table, got {_type_name(raw['run'])}", key="run", source=source)
    if "run" not in raw or "name" not in raw["run"]:
        raise ConfigError('missing required key "name" (give the run a name)', key="run", source=source)
    run = _parse_attrs(RunSection, raw["run"], "run", source)
    inp = _parse_attrs(InputConfig, raw.get("input", {}), "input", source)
    raw_stages = raw.get("stages")
    if not isinstance(raw_stages, list) or not raw_stages:
        raise ConfigError("the config needs at least one [[stages]] table", key="stages", source=source)
    stages: list[Stage] = []
    for i, raw_stage in enumerate(raw_stages):
        key = f"stages[{i}]"
        if not isinstance(raw_stage, dict):
            raise ConfigError("each stage must be a table ([[stages]])", key=key, source=source)
        stage = _parse_stage(raw_stage, key, source)
        _check_chain(stage, stages, key, source)
        stages.append(stage)
    baseline = _baseline(raw, stages, source) if run.baseline == "scratch" else None
    return Config(run=run, input=inp, stages=tuple(stages), source=source, raw=raw, baseline=baseline)


def effective_head(raw_stages: list[dict[str, Any]], index: int) -> Any:
    """The raw head table stage ``index`` ends up with: its own, or the one it inherits down its init chain
    (None: the backbone's default head)."""
    by_name = {s.get("name"): s for s in raw_stages}
    stage: dict[str, Any] | None = raw_stages[index]
    seen = set()
    while stage is not None and id(stage) not in seen:
        seen.add(id(stage))
        if "head" in stage:
            return copy.deepcopy(stage["head"])
        init = stage.get("init")
        stage = by_name.get(init) if isinstance(init, str) else None
    return None


def scratch_stage(raw_stages: list[dict[str, Any]], name: str | None = None) -> dict[str, Any]:
    """The raw table of the last stage trained from scratch: the first stage's backbone (new, randomly
    initialised: no ``init``, nothing frozen, and without its pretrained-weight options ``weights``,
    ``pretrained``, so an ImageNet-started chain is compared with a truly untrained network), the head the last stage ends up with, and everything else of the
    last stage (domain, split, training, select_by). ``name``: default the last stage's own. ``mltl compare``'s
    scratch chain and ``[run] baseline = "scratch"`` both use it; where the first stage sweeps backbones, both
    then keep the one it selected (:func:`restrict_to_backbone`, :func:`mltl.running.compare.compare`)."""
    first, last = raw_stages[0], raw_stages[-1]
    out = {k: copy.deepcopy(v) for k, v in last.items() if k not in ("init", "freeze", "head", "backbone")}
    out["backbone"] = _without_weights(copy.deepcopy(first["backbone"]))
    head = effective_head(raw_stages, len(raw_stages) - 1)
    if head is not None:
        out["head"] = head
    if name is not None:
        out["name"] = name
    return out


#: backbone options that load trained weights; a scratch stage drops them (a randomly initialised network)
WEIGHT_OPTIONS = ("weights", "pretrained", "allow_download")


def _without_weights(backbone: Any) -> Any:
    """A backbone table (or a sweep of them) without the options that load pretrained weights."""
    if isinstance(backbone, dict):
        if "sweep" in backbone:
            return {**backbone, "sweep": [_without_weights(b) for b in backbone["sweep"]]}
        return {k: v for k, v in backbone.items() if k not in WEIGHT_OPTIONS}
    return backbone


def restrict_to_backbone(stage: Stage, name: str, options: dict[str, Any]) -> Stage:
    """A scratch stage (:func:`scratch_stage`) whose backbone is a sweep, kept to the variants of one backbone:
    the one the chain's first stage selected and handed on (``name``, ``options``; options that load weights
    are ignored, as the scratch stage has none). The baseline then isolates what the handed-down weights
    add: the same network, randomly initialised. Unchanged when no variant or every variant has it."""
    def plain(n: str, o: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        return n, {k: v for k, v in o.items() if k not in WEIGHT_OPTIONS}

    want = plain(name, options)
    keep = tuple((label, cfg) for label, cfg in stage.variants
                 if cfg.backbone is not None and plain(cfg.backbone.name, cfg.backbone.options) == want)
    if not keep or len(keep) == len(stage.variants):
        return stage
    if len(keep) == 1:  # no sweep left: a plain stage (no variants/ folders, no selection)
        return attrs.evolve(stage, variants=(("", keep[0][1]),), swept=())
    return attrs.evolve(stage, variants=keep)  # another sweep remains (its labels still name the backbone)


BASELINE_SUFFIX = "-scratch"


def baseline_name(raw: dict[str, Any]) -> str | None:
    """The stage name of the run's baseline (``<last stage>-scratch``), or None without ``[run] baseline``."""
    run, stages = raw.get("run") or {}, raw.get("stages") or []
    if not isinstance(run, dict) or run.get("baseline") != "scratch" or not stages:
        return None
    return f"{stages[-1].get('name')}{BASELINE_SUFFIX}"


def _baseline(raw: dict[str, Any], stages: list[Stage], source: str) -> Stage:
    if len(stages) < 2:
        raise ConfigError('baseline = "scratch" compares a chain with its last stage trained from scratch; this '
                          "chain has one stage, which is already trained from scratch", key="run.baseline",
                          source=source)
    name = baseline_name(raw)
    if name in {s.name for s in stages}:
        raise ConfigError(f'baseline = "scratch" adds a stage named "{name}", which the chain already has; rename '
                          f"that stage", key="run.baseline", source=source)
    table = scratch_stage(raw["stages"], name)
    split = table.get("split", {})
    if isinstance(split, dict) and "sweep" not in split and "final_model" in attrs.fields_dict(SplitConfig):
        table["split"] = {**split, "final_model": False}  # nothing starts from the baseline, nor serves it
    # the key of a message about it: run.baseline (e.g. run.baseline.name when <last>-scratch is too long)
    return _parse_stage(table, "run.baseline", source)


def _check_chain(stage: Stage, earlier: list[Stage], key: str, source: str) -> None:
    names = [s.name for s in earlier]
    if stage.name in names:
        raise ConfigError(f'stage name "{stage.name}" is used twice; stage names must be unique', key=f"{key}.name", source=source)
    for label, cfg in stage.variants:
        if (cfg.backbone is None) == (cfg.init is None):
            raise ConfigError(
                "a stage needs exactly one of backbone (a new network) or init (an earlier stage's model)",
                key=key, source=source,
            )
        if cfg.init is not None and cfg.init not in names:
            if cfg.init == stage.name:
                problem = f'"{cfg.init}" is this stage itself'
            else:
                problem = f'"{cfg.init}" names no earlier stage'
            problem = _printable(problem)
            hint = f"; earlier stages: {', '.join(names)}" if names else "; the first stage needs a backbone"
            raise ConfigError(problem + hint, key=f"{key}.init", source=source)
        if cfg.freeze.strip() == "inherited" and cfg.init is None:
            raise ConfigError('freeze = "inherited" needs init (nothing is inherited from a new backbone)',
                              key=f"{key}.freeze", source=source)


def _parse_stage(raw: dict[str, Any], key: str, source: str) -> Stage:
    sweeps = _find_sweeps(raw, key, source)
    n_variants = math.prod(len(values) for values, _, _ in sweeps.values())
    if n_variants > MAX_VARIANTS:
        raise ConfigError(f"the sweeps make {n_variants} variants of this stage; at most {MAX_VARIANTS} "
                          f"(sweep fewer values, or split the sweep over several runs)", key=key, source=source)
    select_by = raw.get("select_by", "auc")
    for path, (_, sel, _) in sweeps.items():
        if sel is not None:
            if "select_by" in raw and sel != select_by:
                raise ConfigError(_printable(f'select_by "{sel}" conflicts with the stage\'s select_by "{select_by}"'),
                                  key=_printable(f"{key}.{path}.select_by"), source=source)
            select_by = sel
    variants = []
    paths = list(sweeps)
    for combo in itertools.product(*(sweeps[p][0] for p in paths)) if paths else [()]:
        concrete = copy.deepcopy(raw)
        concrete["select_by"] = select_by
        for path, value in zip(paths, combo):
            _set_path(concrete, sweeps[path][2], value)
        label = ",".join(f"{p}={_label(v)}" for p, v in zip(paths, combo))
        variants.append((label, _parse_stage_config(concrete, key, source)))
    labels = [lab for lab, _ in variants]
    if len(set(labels)) != len(labels):
        raise ConfigError("a sweep lists the same value twice", key=key, source=source)
    first = variants[0][1]
    return Stage(name=first.name, variants=tuple(variants), select_by=first.select_by, swept=tuple(paths))


def _label(value: Any) -> str:
    """A short, readable variant label: ``gfe-2``, ``gfe-2(batch_norm=true)``, ``0.01``."""
    if isinstance(value, dict):
        name = value.get("name", value.get("plugin"))
        rest = {k: v for k, v in value.items() if k not in ("name", "plugin")}
        inner = ",".join(f"{k}={json.dumps(v, default=str)}" for k, v in rest.items())
        if name is None:
            return "{" + inner + "}"
        return f"{name}({inner})" if inner else str(name)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _find_sweeps(raw: dict[str, Any], key: str, source: str, prefix: str = "",
                 parents: tuple[str, ...] = ()) -> dict[str, tuple[list, str | None, tuple[str, ...]]]:
    """The swept key paths of a stage: ``{"train.lr": (values, select_by, ("train", "lr"))}``."""
    found: dict[str, tuple[list, str | None, tuple[str, ...]]] = {}
    for k, v in raw.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict) and "sweep" in v:
            extra = set(v) - {"sweep", "select_by"}
            if extra:
                raise ConfigError(_printable(f"a sweep table takes only sweep and select_by, not {sorted(extra)}"),
                                  key=_printable(f"{key}.{path}"), source=source)
            values = v["sweep"]
            if not isinstance(values, list) or len(values) < 1:
                raise ConfigError("sweep must be a non-empty list of values", key=_printable(f"{key}.{path}.sweep"), source=source)
            sel = v.get("select_by")
            if sel is not None and sel not in METRICS:
                raise ConfigError(_printable(f'unknown metric "{sel}"{did_you_mean(str(sel), METRICS)}'),
                                  key=_printable(f"{key}.{path}.select_by"), source=source)
            if k in ("name", "init"):
                raise ConfigError(f"{k} cannot be swept", key=_printable(f"{key}.{path}"), source=source)
            if path in found:
                raise ConfigError("two swept keys have the same path", key=f"{key}.{_printable(path)}", source=source)
            found[path] = (values, sel, parents + (k,))
        elif isinstance(v, dict):
            for sub, entry in _find_sweeps(v, key, source, prefix=f"{path}.", parents=parents + (k,)).items():
                if sub in found:
                    raise ConfigError("two swept keys have the same path", key=f"{key}.{_printable(sub)}",
                                      source=source)
                found[sub] = entry
    return found


def _set_path(d: dict[str, Any], parts: tuple[str, ...], value: Any) -> None:
    for p in parts[:-1]:
        d = d[p]
    d[parts[-1]] = value


def _parse_stage_config(raw: dict[str, Any], key: str, source: str) -> StageConfig:
    raw = dict(raw)
    if "name" not in raw or not isinstance(raw["name"], str) or not SAFE_NAME.fullmatch(raw["name"]):
        raise ConfigError("every stage needs a name of letters, digits, '_', '.' or '-'", key=f"{key}.name", source=source)
    try:
        check_folder_name(raw["name"], "stage")
    except ValueError as exc:
        raise ConfigError(f"{raw['name']!r} {exc}", key=f"{key}.name", source=source) from None
    if "domain" not in raw:
        raise ConfigError('missing required key "domain" (e.g. domain = { plugin = "ct-phantom" })', key=key, source=source)
    raw["domain"] = _plugin_ref(raw["domain"], "plugin", DomainRef, f"{key}.domain", source)
    if "backbone" in raw:
        raw["backbone"] = _plugin_ref(raw["backbone"], "name", BackboneRef, f"{key}.backbone", source)
    cfg = _parse_attrs(StageConfig, raw, key, source, prebuilt={"domain", "backbone"})
    if cfg.head is not None:
        if len(cfg.head.dense) > MAX_HEAD_LAYERS:
            raise ConfigError(f"{len(cfg.head.dense)} dense layers; at most {MAX_HEAD_LAYERS}",
                              key=f"{key}.head.dense", source=source)
        if any(w > MAX_HEAD_WIDTH for w in cfg.head.dense):
            raise ConfigError(f"{list(cfg.head.dense)}: a dense layer may have at most {MAX_HEAD_WIDTH} units",
                              key=f"{key}.head.dense", source=source)
    return cfg


def _plugin_ref(value: Any, name_key: str, cls: type, key: str, source: str) -> Any:
    if isinstance(value, str):
        value = {name_key: value}
    if not isinstance(value, dict) or not isinstance(value.get(name_key), str):
        raise ConfigError(f'expected "name" or a table with a "{name_key}" key', key=key, source=source)
    options = {k: v for k, v in value.items() if k != name_key}
    return cls(value[name_key], options)


def _parse_attrs(cls: type, raw: Any, key: str, source: str, prebuilt: set[str] = frozenset()) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"expected a table, got {_type_name(raw)}", key=key, source=source)
    fields = {f.name: f for f in attrs.fields(attrs.resolve_types(cls))}
    for k in raw:
        if k not in fields:
            raise ConfigError(f"unknown key{did_you_mean(str(k), fields)}", key=_printable(f"{key}.{k}"),
                              source=source)
    kwargs = {}
    for name, f in fields.items():
        if name not in raw:
            if f.default is attrs.NOTHING:
                raise ConfigError(f'missing required key "{name}"', key=key, source=source)
            continue
        value = raw[name]
        kwargs[name] = value if name in prebuilt else _convert(value, f.type, f"{key}.{name}", source)
    try:
        return cls(**kwargs)
    except ValueError as exc:
        # attrs validators raise with a message about one field; find which
        for name in kwargs:
            try:
                f = fields[name]
                if f.validator is not None:
                    f.validator(None, f, kwargs[name])
            except ValueError as field_exc:
                raise ConfigError(f"{_short(kwargs[name])} {field_exc}", key=f"{key}.{name}", source=source) from None
        raise ConfigError(str(exc), key=key, source=source) from None


def _short(value: Any, limit: int = 80) -> str:
    """``repr(value)`` for a one-line message: at most ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _type_name(value: Any) -> str:
    return {dict: "a table", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number"}.get(type(value), type(value).__name__)


def _convert(value: Any, tp: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", typing.Union)):
        if value is None:
            return None
        non_none = [a for a in args if a is not type(None)]
        if typing.get_origin(non_none[0]) is tuple and not isinstance(value, list) \
                and isinstance(value, (int, float)) and not isinstance(value, bool):
            return _convert(value, typing.get_args(non_none[0])[0], key, source)  # one number for all channels
        return _convert(value, non_none[0], key, source)
    if origin is Literal:
        if value not in args or isinstance(value, bool) != isinstance(args[0], bool):
            choices = [str(a) for a in args]
            raise ConfigError(f"{_short(value)} is not one of {', '.join(repr(a) for a in args)}"
                              f"{did_you_mean(str(value), choices) if isinstance(value, str) else ''}",
                              key=key, source=source)
        return value
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"expected a list, got {_type_name(value)}", key=key, source=source)
        return tuple(_convert(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"expected a table, got {_type_name(value)}", key=key, source=source)
        return value
    if attrs.has(tp):
        return _parse_attrs(tp, value, key, source)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"expected true or false, got {_type_name(value)} {_short(value)}", key=key, source=source)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"expected an integer, got {_type_name(value)} {_short(value)}", key=key, source=source)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"expected a number, got {_type_name(value)} {_short(value)}", key=key, source=source)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"expected a string, got {_type_name(value)} {_short(value)}", key=key, source=source)
        return value
    raise TypeError(f"config type {tp!r} not handled")  # a bug in this module, not a user error


# ---------------------------------------------------------------- overrides


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...], source: str) -> dict[str, Any]:
    """Apply ``KEY=VALUE`` overrides; ``stages.NAME`` (or ``stages.INDEX``) addresses a stage.

    VALUE is read as a TOML value (``5``, ``0.01``, ``true``, ``["C1", "C1-C2"]``, ``{ sweep = [1, 2] }``)
    and as a plain string when it is not one (``stages.target.freeze=C1-C2``).
    """
    raw = copy.deepcopy(raw)
    for item in overrides:
        where = f"--set {_short(item) if not item.isprintable() or len(item) > 80 else item}"
        if not _is_unicode(item):
            raise UserError(f"{where}: not valid UTF-8 text")
        if "=" not in item:
            raise UserError(f'{where}: expected KEY=VALUE, e.g. --set stages.target.train.epochs=5')
        path, _, text = item.partition("=")
        parts = [p for p in path.strip().split(".")]
        if not all(parts):
            raise UserError(f"{where}: empty key segment in {path!r}")
        try:
            parsed = tomllib.loads(f"v = {text}")
            value = parsed["v"] if list(parsed) == ["v"] else text  # "1\nw = 2" is a string, not the value 1
        except tomllib.TOMLDecodeError:
            value = text
        except RecursionError:
            raise UserError(f"{where}: arrays or tables nested too deeply (at most {MAX_NESTING} levels)") from None
        _check_nesting(value, where)
        node: Any = raw
        walked: list[str] = []
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                names = [s.get("name") for s in node if isinstance(s, dict)]
                if part in names:
                    idx = names.index(part)
                elif part.isascii() and part.isdigit() and int(part) < len(node):
                    idx = int(part)
                else:
                    raise UserError(f'{where}: no stage "{_printable(part)}"'
                                    f'{did_you_mean(part, [n for n in names if isinstance(n, str) and n])}')
                if last:
                    raise UserError(f"{where}: cannot replace a whole stage; set one of its keys")
                node = node[idx]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    if part not in node:
                        node[part] = {}
                    elif not isinstance(node[part], (dict, list)):
                        raise UserError(f"{where}: {_printable('.'.join(walked + [part]))} is a value, not a table")
                    node = node[part]
            else:
                raise UserError(f"{where}: {_printable('.'.join(walked))} is a value, not a table")
            walked.append(part)
    return raw


# ---------------------------------------------------------------- writing


def dump_toml(raw: dict[str, Any]) -> str:
    """TOML text for a parsed config (tables and arrays of tables, values as TOML literals)."""
    lines: list[str] = []
    scalars = {k: v for k, v in raw.items() if not isinstance(v, (dict, list)) or _is_value_list(v)}
    for k, v in scalars.items():
        lines.append(f"{_key(k)} = {_value(v)}")
    for k, v in raw.items():
        if isinstance(v, dict):
            lines.append(f"\n[{_key(k)}]")
            lines.extend(f"{_key(k2)} = {_value(v2)}" for k2, v2 in v.items())
        elif isinstance(v, list) and not _is_value_list(v):
            for item in v:
                lines.append(f"\n[[{_key(k)}]]")
                lines.extend(f"{_key(k2)} = {_value(v2)}" for k2, v2 in item.items())
    return "\n".join(lines).lstrip("\n") + "\n"


def _is_value_list(v: Any) -> bool:
    return isinstance(v, list) and not (v and all(isinstance(x, dict) for x in v))


def _key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else _basic_string(k, ascii_only=True)


_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _basic_string(text: str, ascii_only: bool = False) -> str:
    """``text`` as a TOML basic string: quotes, backslashes and every control character (U+0000 to U+001F
    and DEL, U+007F, which TOML forbids raw) escaped; with ``ascii_only``, all non-ASCII too (``\\uXXXX``,
    ``\\UXXXXXXXX`` beyond the BMP). ``tomllib.loads`` reads back exactly ``text``."""
    out = []
    for c in text:
        o = ord(c)
        if c in _ESCAPES:
            out.append(_ESCAPES[c])
        elif o < 0x20 or o == 0x7F or (ascii_only and o > 0x7E):
            if 0xD800 <= o <= 0xDFFF:
                raise ValueError(f"a lone surrogate (U+{o:04X}) cannot be written as TOML")
            out.append(f"\\u{o:04x}" if o <= 0xFFFF else f"\\U{o:08x}")
        elif 0xD800 <= o <= 0xDFFF:
            raise ValueError(f"a lone surrogate (U+{o:04X}) cannot be written as TOML")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int,)):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return _basic_string(v)
    if isinstance(v, (datetime.datetime, datetime.date, datetime.time)):
        return v.isoformat()
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_key(k)} = {_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")
