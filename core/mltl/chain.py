"""The chain runner: stages in order, each starting from the previous stage's selected weights.

For every stage: load its domain (all domains are loaded before the first stage trains, so a bad
path in the last stage fails in seconds, not hours), split it (stratified, group-aware), train each
variant of its sweep, pick the winner on the **validation** split, and only then evaluate the winner,
once, on the stage's test split. The winner alone is handed to later stages.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import re
import time
import zlib
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch

from . import distributed
from .config import Config, Stage, StageConfig, dump_toml, load_config
from .domain import (Domain, check_split_classes, deal_groups, kfold_assignment, make_splits, split_counts, subsample)
from .errors import ConfigError, UserError
from .finetune import check as check_finetuning
from .freeze import FreezePolicy
from .metrics import classification_metrics, is_better, metric_value
from .network import HeadSpec, Network, build_network, derive, make_spec
from .plugins import Registry, check_options, emit, get_registry
from .reporting import ConsoleReporter, call, write_report
from .results import Predictions, StageResult, group_keys
from .protocols import Repeat, plan_repeats, resolve_protocol, splits_from_file, summarise_repeats
from .rundir import (RunLock, choose_run_dir, environment, load_weights, save_weights_atomic, write_bytes_atomic,
                     write_json_atomic, write_text_atomic)
from .stream import load_images
from .train import Interrupted, TensorData, fit, predict_proba


@attrs.frozen(eq=False)
class RunResult:
    """A finished run: its directory and each stage's result (selected model, test predictions)."""

    run_dir: Path
    stages: tuple[StageResult, ...]

    def stage(self, name: str) -> StageResult:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f'device "{spec}" was asked for but CUDA is not available here; use --device cpu or auto')
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f'device "{spec}" was asked for but MPS is not available here; use --device cpu or auto')
    return dev


def _stage_key(config: Config, stage_index: int) -> str:
    return f"stages[{stage_index}]"


def _domain_cache_key(cfg: StageConfig) -> str:
    return json.dumps([cfg.domain.plugin, cfg.domain.options], sort_keys=True, default=str)


def load_domains(config: Config, registry: Registry) -> dict[str, Domain]:
    """Every distinct domain of the chain, loaded once (keyed by plugin and options)."""
    out: dict[str, Domain] = {}
    for i, stage in enumerate(config.stages):
        for _, cfg in stage.variants:
            k = _domain_cache_key(cfg)
            if k in out:
                continue
            dom = registry.create("domain", cfg.domain.plugin, cfg.domain.options,
                                  key=f"{_stage_key(config, i)}.domain", source=config.source,
                                  extra={"image_size": config.input.size})
            if not isinstance(dom, Domain):
                raise TypeError(f"domain plugin {cfg.domain.plugin!r} returned {type(dom).__name__}, not mltl.Domain")
            out[k] = dom
    return out


def check_networks(config: Config, registry: Registry) -> None:
    """Build every variant's network (untrained, tiny placeholder classes) and resolve its freeze policy,
    so an unknown backbone option or layer group fails before any training."""
    built: dict[str, list[Network]] = {}
    for i, stage in enumerate(config.stages):
        key = _stage_key(config, i)
        nets = []
        for _, cfg in stage.variants:
            if cfg.backbone is not None:
                spec = make_spec(cfg.backbone.name, cfg.backbone.options, config.input.channels,
                                 config.input.size, cfg.head or HeadSpec(), ("a", "b"))
                candidates = [build_network(spec, registry, key=f"{key}.backbone", source=config.source)]
            else:
                candidates = [derive(p, registry, classes=("a", "b", "c"), head=cfg.head,
                                     in_chans=config.input.channels, image_size=config.input.size,
                                     key=key, source=config.source)[0] for p in built[cfg.init]]
            errors = []
            for net in candidates:
                try:
                    net.set_frozen(FreezePolicy(cfg.freeze).resolve(net, registry, key=f"{key}.freeze",
                                                                    source=config.source))
                    check_finetuning(net, cfg.train, key=f"{key}.train", source=config.source)
                except ConfigError as exc:
                    errors.append(exc)
            if len(errors) == len(candidates):  # wrong for every network the stage may start from
                raise errors[0]
            nets.extend(candidates)
        built[stage.name] = nets


def validate(config: Config, registry: Registry | None = None) -> None:
    """Everything that can be checked without data: plugin names and options, networks, freeze groups."""
    registry = registry or get_registry()
    for i, stage in enumerate(config.stages):
        for _, cfg in stage.variants:
            item = registry.get("domain", cfg.domain.plugin, key=f"stages[{i}].domain.plugin", source=config.source)
            check_options(item.factory, cfg.domain.options, key=f"stages[{i}].domain", source=config.source,
                          reserved={"image_size"})
    for name in config.run.reporters or ():
        registry.get("reporter", name, key="run.reporters", source=config.source)
    make_reporters(config, registry)  # names and options of the reporters, before any data is read
    check_networks(config, registry)


def _safe(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", label.replace(",", "+"))


def _predictions_csv(rows: list[Predictions]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    classes = rows[0].classes
    w.writerow(["id", "split", "label", "group"] + [f"p_{c}" for c in classes])
    for p in rows:
        for i in range(len(p)):
            w.writerow([p.ids[i], p.split, classes[p.labels[i]], p.groups[i] if p.groups is not None else ""]
                       + [repr(float(v)) for v in p.probs[i]])
    return buf.getvalue()


def _case_groups(domain: Domain, idx: Any) -> tuple[str, ...] | None:
    """The salted case keys of images ``idx`` (never the raw patient ids), or None without groups."""
    return None if domain.groups is None else group_keys([domain.groups[i] for i in idx])


def _state_on_cpu(net: Network) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in net.state_dict().items()}


def _read_predictions(path: Path, split: str, classes: tuple[str, ...]) -> Predictions:
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == split]
    return Predictions(ids=tuple(r["id"] for r in rows), split=split,
                       labels=np.array([classes.index(r["label"]) for r in rows], dtype=np.int64),
                       probs=np.array([[float(r[f"p_{c}"]) for c in classes] for r in rows], dtype=np.float64)
                       .reshape(len(rows), len(classes)),
                       classes=classes,
                       groups=tuple(r["group"] for r in rows) if rows and all(r.get("group") for r in rows) else None)


def _load_network(path: Path, registry: Registry) -> Network:
    """A network saved by mltl: the spec from the safetensors metadata, then the weights (strict)."""
    state, meta = load_weights(path)
    try:
        spec = json.loads(meta["spec"])
        net = build_network(spec, registry)
        net.load_state_dict(state)
    except (KeyError, ValueError, RuntimeError) as exc:
        raise UserError(f"{path}: weights do not match the network they describe ({exc}); "
                        f"delete the file to re-run that step") from None
    return net


def make_stage_split(config: Config, domain: Domain, cfg: StageConfig, rep: Repeat, where: str) -> dict[str, np.ndarray]:
    """The train/val/test indices of one repeat of a stage variant (holdout, fold, or training fraction)."""
    sp = cfg.split
    split_seed = config.run.seed if sp.seed is None else sp.seed
    if sp.file is not None:
        splits = splits_from_file(domain, sp.file, where)
    elif rep.fold is not None:
        fold = kfold_assignment(domain, sp.folds, seed=split_seed, where=where)
        rest = np.flatnonzero(fold != rep.fold)
        dealt = deal_groups(domain, rest, {"val": sp.val}, seed=split_seed + 1 + rep.fold,
                            min_per_class=sp.min_per_class, where=where)
        splits = {"train": dealt["train"], "val": dealt["val"], "test": np.flatnonzero(fold == rep.fold)}
    else:
        splits = make_splits(domain, val=sp.val, test=sp.test, seed=split_seed,
                             min_per_class=sp.min_per_class, where=where)
    if rep.fraction is not None:
        splits = {**splits, "train": subsample(domain, splits["train"], rep.fraction,
                                               seed=split_seed * 7919 + 1000 * rep.fraction_index + rep.draw)}
    check_split_classes(domain, splits, where)
    return splits



class _StageRunner:
    def __init__(self, config: Config, registry: Registry, device: torch.device, run_dir: Path,
                 domains: dict[str, Domain], reporters: list[Any], resume: bool,
                 reuse: tuple[Path, ...] = ()) -> None:
        self.config, self.registry, self.device, self.run_dir = config, registry, device, run_dir
        self.domains, self.reporters, self.resume, self.reuse = domains, reporters, resume, reuse
        self.selected: dict[str, Network] = {}
        self._tensors: dict[str, torch.Tensor] = {}

    def _images(self, cfg: StageConfig) -> torch.Tensor:
        k = _domain_cache_key(cfg)
        if k not in self._tensors:
            dom, run = self.domains[k], self.config.run
            # resident on the device when it fits [run] device_memory_budget_gb, else streamed (mltl.stream)
            self._tensors = {k: load_images(dom.images, size=self.config.input.size,
                                            channels=self.config.input.channels, device=self.device,
                                            device_budget_gb=run.device_memory_budget_gb,
                                            host_budget_gb=run.host_memory_budget_gb)}
        return self._tensors[k]

    def run(self, index: int, stage: Stage) -> StageResult:
        config = self.config
        key = _stage_key(config, index)
        stage_dir = self.run_dir / stage.name
        if distributed.is_writer():  # under torchrun only rank 0 writes the run directory
            stage_dir.mkdir(parents=True, exist_ok=True)
        call(self.reporters, "stage_started", stage_name=stage.name, stage_dir=stage_dir)
        emit("mltl_stage_started", stage_name=stage.name, stage_dir=stage_dir)
        if self.resume and (stage_dir / "metrics.json").is_file():
            try:
                return self._reuse(stage, stage_dir)
            except _Damaged as exc:
                # repaired, not trusted: the stage is finished again from its saved variants (no retraining
                # unless a variant's own files are damaged too)
                logging.getLogger("mltl").warning("%s: %s; finishing the stage again from its saved variants",
                                                  stage_dir, exc)
                (stage_dir / "metrics.json").unlink()
        origin = self._find_earlier(index, stage) if self.reuse else None
        if origin is not None:  # --reuse: every rank decides alike (read-only checks); rank 0 copies
            if distributed.is_writer():
                _copy_stage(origin, stage_dir)
            distributed.barrier()
            try:
                result = self._reuse(stage, stage_dir)
            except _Damaged as exc:
                logging.getLogger("mltl").warning("%s: not reused: %s; training the stage", origin, exc)
                if distributed.is_writer():
                    (stage_dir / "metrics.json").unlink(missing_ok=True)
            else:
                if distributed.is_writer():
                    reused_path = self.run_dir / "reused.json"
                    reused = json.loads(reused_path.read_text()) if reused_path.is_file() else {}
                    write_json_atomic(reused_path, {**reused, stage.name: str(origin)})
                    logging.getLogger("mltl").info("%s: reused from %s (same data, settings and upstream stages)",
                                                   stage.name, origin)
                return result
        # the same for every variant (a fair comparison), and for a stage of this name in any chain (mltl compare)
        seed = config.run.seed * 1000 + zlib.crc32(stage.name.encode()) % 1000
        where = f"{config.source}: {key} ({stage.first.domain.plugin}): "
        first_domain = self.domains[_domain_cache_key(stage.first)]
        protocol = resolve_protocol(stage.first.split, last=index == len(config.stages) - 1,
                                    domain=first_domain, key=f"{key}.split", source=config.source)
        repeats = plan_repeats(stage.first.split, protocol)
        if len(repeats) == 1:
            best, candidates = self._select(stage, key, seed, stage_dir,
                                            lambda dom, cfg: make_stage_split(self.config, dom, cfg, repeats[0], where))
            test_pred, test_metrics = self._test(best)
            metrics, selection = self._write(stage, stage_dir, best, candidates, test_pred, test_metrics)
            net = best["net"]
            net.to("cpu")
            self.selected[stage.name] = net
            result = StageResult(name=stage.name, stage_dir=stage_dir, classes=best["domain"].classes,
                                 test=test_pred, metrics=metrics, selection=selection)
            call(self.reporters, "stage_finished", result=result)
            emit("mltl_stage_finished", result=result)
            return result
        # a repeated protocol: every fold / draw / seed is a complete stage of its own under repeats/
        rows = []
        for rep in repeats:
            rdir = stage_dir / "repeats" / rep.label
            if not (self.resume and _finished_repeat(rdir)):
                best, candidates = self._select(stage, key, seed + rep.seed_offset, rdir,
                                                lambda dom, cfg, _r=rep: make_stage_split(self.config, dom, cfg, _r, where),
                                                tag=rep.label)
                test_pred, test_metrics = self._test(best)
                self._write(stage, rdir, best, candidates, test_pred, test_metrics, repeat=rep.row())
                del best
            distributed.barrier()  # under torchrun: rank 0 has written what every rank reads next
            m = json.loads((rdir / "metrics.json").read_text())
            rows.append({**rep.row(), "seed": seed + rep.seed_offset, "n_train": m["n_images"]["train"],
                         "n_test": m["n_test"], "auc_macro": m["auc_macro"], "accuracy": m["accuracy"],
                         "balanced_accuracy": m["balanced_accuracy"], "train_seconds": m["train_seconds"]})
        summary = summarise_repeats(protocol, rows, stage_dir / "repeats", repeats)
        # the stage's own files are those of its representative repeat (the first fold / the first draw at
        # the largest fraction / the first seed): its model is the one handed on and served by `mltl predict`
        rep_dir = stage_dir / "repeats" / summary["representative"]
        for name in ("model.safetensors", "model.json", "history.json", "predictions.csv", "splits.csv",
                     "selection.json"):
            if (rep_dir / name).is_file():
                write_bytes_atomic(stage_dir / name, (rep_dir / name).read_bytes())
        if summary.get("pooled") is not None:
            write_text_atomic(stage_dir / "oof_predictions.csv", summary.pop("pooled_csv"))
        write_json_atomic(stage_dir / "repeats.json", {"protocol": protocol, "rows": rows})
        metrics = json.loads((rep_dir / "metrics.json").read_text())
        metrics["protocol"] = summary
        write_json_atomic(stage_dir / "metrics.json", metrics)  # last: marks the stage finished
        distributed.barrier()
        return self._reuse(stage, stage_dir)

    def _select(self, stage: Stage, key: str, seed: int, base: Path, split_of,
                tag: str = "") -> tuple[dict[str, Any], list]:
        """Train every variant of the stage on ``split_of(domain, cfg)``; the best on validation and all candidates."""
        config = self.config
        sweeping = len(stage.variants) > 1
        candidates: list[dict[str, Any]] = []
        best: dict[str, Any] | None = None
        for label, cfg in stage.variants:
            domain = self.domains[_domain_cache_key(cfg)]
            splits = split_of(domain, cfg)
            vdir = base / "variants" / _safe(label) if sweeping else base
            if distributed.is_writer():
                vdir.mkdir(parents=True, exist_ok=True)
            _write_splits(vdir / "splits.csv", domain, splits, check=self.resume)
            x = self._images(cfg)
            y = torch.from_numpy(domain.labels).to(self.device)
            data = {s: TensorData(x[torch.from_numpy(idx).to(self.device)], y[torch.from_numpy(idx).to(self.device)])
                    for s, idx in splits.items()}
            record = self._finished_variant(vdir) if self.resume else None
            if record is not None:
                # a variant finished before the interruption: reuse it as it is
                cand, start, note = record["candidate"], record["start"], record["note"]
                candidates.append(cand)
                if best is None or is_better(cand["selection_value"], best["cand"]["selection_value"], stage.select_by):
                    net = _load_network(vdir / "model.safetensors", self.registry)
                    val_pred = Predictions(
                        ids=tuple(domain.ids[i] for i in splits["val"]), split="val",
                        labels=data["val"].y.cpu().numpy(),
                        probs=predict_proba(net.to(self.device), data["val"].x, config.input), classes=domain.classes,
                        groups=_case_groups(domain, splits["val"]))
                    best = {"cand": cand, "net": net.to("cpu"), "cfg": cfg, "domain": domain, "splits": splits,
                            "val_pred": val_pred, "start": start, "note": note,
                            "history": json.loads((vdir / "history.json").read_text())}
                continue
            torch.manual_seed(seed)
            if cfg.backbone is not None:
                spec = make_spec(cfg.backbone.name, cfg.backbone.options, config.input.channels,
                                 config.input.size, cfg.head or HeadSpec(), domain.classes)
                net = build_network(spec, self.registry, key=f"{key}.backbone", source=config.source)
                start, note = f"new {cfg.backbone.name}", f"New {cfg.backbone.name} network"
            else:
                net, note = derive(self.selected[cfg.init], self.registry, classes=domain.classes, head=cfg.head,
                                   in_chans=config.input.channels, image_size=config.input.size,
                                   key=key, source=config.source)
                start, note = f"from {cfg.init}", f"Started from stage {cfg.init}: {note}"
            try:
                frozen = FreezePolicy(cfg.freeze).resolve(net, self.registry, key=f"{key}.freeze",
                                                          source=config.source)
            except ConfigError as exc:
                if not sweeping:
                    raise
                # e.g. "C1-C3" after the source sweep picked a network with two convolutions
                candidates.append({"variant": label, "skipped": str(exc)})
                continue
            net.set_frozen(frozen)
            net.to(self.device)

            def on_epoch(epoch: int, row: dict[str, Any], _label: str = ",".join(filter(None, (tag, label))),
                         _cfg: StageConfig = cfg) -> None:
                row = {**row, "epochs": _cfg.train.epochs}
                call(self.reporters, "epoch_ended", stage_name=stage.name, variant=_label, epoch=epoch, metrics=row)
                emit("mltl_epoch_ended", stage_name=stage.name, variant=_label, epoch=epoch, metrics=row)

            fitted = fit(net, data["train"], data["val"], cfg.train, config.input, classes=domain.classes,
                         seed=seed, on_epoch=on_epoch, checkpoint=vdir / "checkpoint.pt",
                         checkpoint_seconds=checkpoint_seconds())
            val_pred = Predictions(
                ids=tuple(domain.ids[i] for i in splits["val"]), split="val",
                labels=data["val"].y.cpu().numpy(), probs=predict_proba(net, data["val"].x, config.input),
                classes=domain.classes, groups=_case_groups(domain, splits["val"]))
            val_metrics = classification_metrics(val_pred.labels, val_pred.probs, domain.classes)
            value = metric_value(val_metrics, stage.select_by)
            cand = {
                "variant": label, "selection_value": value, "val": val_metrics, "best_epoch": fitted.best_epoch,
                "epochs_run": len(fitted.history), "frozen": sorted(frozen, key=net.group_names().index),
                "train_seconds": fitted.seconds,
            }
            candidates.append(cand)
            save_weights_atomic(vdir / "model.safetensors", net.state_dict(), {"spec": json.dumps(net.spec)})
            write_json_atomic(vdir / "history.json", fitted.history)
            # written last: its presence marks the variant finished, for --resume
            write_json_atomic(vdir / "variant.json", {"candidate": cand, "start": start, "note": note,
                                                      "config": attrs.asdict(cfg)})
            if distributed.is_writer():
                (vdir / "checkpoint.pt").unlink(missing_ok=True)
            if best is None or is_better(value, best["cand"]["selection_value"], stage.select_by):
                net.to("cpu")
                best = {"cand": cand, "net": net, "cfg": cfg, "domain": domain, "splits": splits,
                        "val_pred": val_pred, "start": start, "note": note, "history": fitted.history}
            del net
        if best is None:
            raise UserError(f"{config.source}: {key}: no variant of stage {stage.name} applies to the network "
                            f"it starts from: " + "; ".join(c["skipped"] for c in candidates))
        return best, candidates

    def _test(self, best: dict[str, Any]) -> tuple[Predictions, dict[str, Any]]:
        """The selected variant on the test split: its first and only look at it."""
        domain, net = best["domain"], best["net"]
        net.to(self.device)
        x = self._images(best["cfg"])
        test_idx = best["splits"]["test"]
        test_pred = Predictions(
            ids=tuple(domain.ids[i] for i in test_idx), split="test", labels=domain.labels[test_idx],
            probs=predict_proba(net, x[torch.from_numpy(test_idx).to(self.device)], self.config.input),
            classes=domain.classes, groups=_case_groups(domain, test_idx))
        return test_pred, classification_metrics(test_pred.labels, test_pred.probs, domain.classes)

    @staticmethod
    def _finished_variant(vdir: Path) -> dict[str, Any] | None:
        """The record of a finished variant, or None (never finished, or damaged: then it is re-run)."""
        try:
            record = json.loads((vdir / "variant.json").read_text())
            load_weights(vdir / "model.safetensors")
            json.loads((vdir / "history.json").read_text())
            return record if {"candidate", "start", "note"} <= set(record) else None
        except (OSError, ValueError, UserError):
            return None

    def _find_earlier(self, index: int, stage: Stage) -> Path | None:
        """``--reuse``: the first earlier run's finished stage of this name that was made from the same data,
        settings and upstream stages (the same ``[input]``, seed and stage tables up to and including this one,
        and the same split of the same images); None when no earlier run qualifies."""
        import tomllib

        log = logging.getLogger("mltl")
        for run_dir in self.reuse:
            src = run_dir / stage.name
            if not (src / "metrics.json").is_file():
                continue
            try:
                before = tomllib.loads((run_dir / "config.toml").read_text())
                same = _same_upstream(before, self.config.raw, index)
            except (OSError, ValueError, TypeError, KeyError, AttributeError):
                same = False
            if not same:
                log.info("%s: not reused (its config differs in [input], the seed or stages[0..%d])", src, index)
                continue
            # the same settings are not enough: every earlier stage of this run (trained here, resumed or
            # copied) must hold the very weights that run's stages held, or this stage was built on others
            earlier = [s.name for s in self.config.stages[:index]]
            if not all(_same_weights(self.selected[n], run_dir / n / "model.safetensors") for n in earlier):
                log.info("%s: not reused (an earlier stage of this run has other weights than that run's)", src)
                continue
            if not self._same_split(index, stage, src):
                log.warning("%s: not reused: its splits.csv differs from the split this run makes (the data or "
                            "the split changed)", src)
                continue
            return src
        return None

    def _same_split(self, index: int, stage: Stage, src: Path) -> bool:
        """The earlier stage's saved split (of its representative repeat) is the one this run makes now."""
        cfg = stage.first
        domain = self.domains[_domain_cache_key(cfg)]
        key = _stage_key(self.config, index)
        try:
            metrics = json.loads((src / "metrics.json").read_text())
            protocol = resolve_protocol(cfg.split, last=index == len(self.config.stages) - 1, domain=domain,
                                        key=f"{key}.split", source=self.config.source)
            repeats = plan_repeats(cfg.split, protocol)
            label = (metrics.get("protocol") or {}).get("representative")
            rep = repeats[0] if len(repeats) == 1 else next((r for r in repeats if r.label == label), None)
            if rep is None:
                return False
            splits = make_stage_split(self.config, domain, cfg, rep, f"{self.config.source}: {key}: ")
            return (src / "splits.csv").read_text() == _splits_csv(domain, splits)
        except (OSError, ValueError, UserError):
            return False

    def _reuse(self, stage: Stage, stage_dir: Path) -> StageResult:
        """A stage that finished before an interruption: its selected model and test predictions as saved.

        Every file a later stage or a report relies on is checked first; :class:`_Damaged` names the first
        damaged one (the caller then finishes the stage again from its saved variants)."""
        try:
            name = "metrics.json"
            metrics = json.loads((stage_dir / name).read_text())
            classes = tuple(metrics["classes"])
            name = "predictions.csv"
            test = _read_predictions(stage_dir / name, "test", classes)
            if len(test) != metrics["n_test"]:
                raise ValueError(f"{len(test)} test rows, metrics.json says {metrics['n_test']}")
            for name in ("model.json", "history.json"):
                json.loads((stage_dir / name).read_text())
            name = "splits.csv"
            with open(stage_dir / name, newline="") as f:
                rows = list(csv.DictReader(f))
            if len(rows) != sum(metrics["n_images"].values()) or any(r.get("split") is None for r in rows):
                raise ValueError(f"{len(rows)} rows, metrics.json counts {sum(metrics['n_images'].values())} images")
            name = "selection.json"
            sel_path = stage_dir / name
            selection = json.loads(sel_path.read_text()) if len(stage.variants) > 1 else None
            name = "model.safetensors"
            self.selected[stage.name] = _load_network(stage_dir / name, self.registry)
        except (OSError, ValueError, KeyError, TypeError, UserError) as exc:
            raise _Damaged(f"{name} is damaged or missing ({str(exc).splitlines()[0][:200]})") from None
        result = StageResult(name=stage.name, stage_dir=stage_dir, classes=classes, test=test,
                             metrics=metrics, selection=selection)
        call(self.reporters, "stage_finished", result=result)
        emit("mltl_stage_finished", result=result)
        return result

    def _write(self, stage: Stage, stage_dir: Path, best: dict[str, Any], candidates: list[dict[str, Any]],
               test_pred: Predictions, test_metrics: dict[str, Any], repeat: dict[str, Any] | None = None
               ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Write a stage's (or one repeat's) files; ``metrics.json`` last, which marks it finished."""
        config, cfg, domain, splits, net = self.config, best["cfg"], best["domain"], best["splits"], best["net"]
        cand = best["cand"]
        selection = None
        if len(stage.variants) > 1:
            selection = {"select_by": stage.select_by, "split": "val", "swept": list(stage.swept),
                         "selected": cand["variant"], "candidates": candidates,
                         "rule": f"highest validation {stage.select_by}" if stage.select_by != "loss"
                         else "lowest validation loss", "ties": "the first listed variant wins"}
            write_json_atomic(stage_dir / "selection.json", selection)
        metrics = {
            "stage": stage.name,
            "split": "test",
            "auc_macro": test_metrics["auc_macro"],
            "accuracy": test_metrics["accuracy"],
            "balanced_accuracy": test_metrics["balanced_accuracy"],
            "n_test": test_metrics["n"],
            "loss": test_metrics["loss"],
            "auc_per_class": test_metrics["auc_per_class"],
            "confusion_matrix": test_metrics["confusion_matrix"],
            "classes": list(domain.classes),
            "val": {**cand["val"], "selection_value": cand["selection_value"]},
            "select_by": stage.select_by,
            "selected_variant": cand["variant"] or None,
            "domain": cfg.domain.plugin,
            "start": best["start"],
            "inherited": best["note"],
            "frozen": cand["frozen"],
            "trainable_parameters": sum(p.numel() for p in net.parameters() if p.requires_grad),
            "best_epoch": cand["best_epoch"],
            "epochs_run": cand["epochs_run"],
            "train_seconds": cand["train_seconds"],
            "n_images": {s: int(len(idx)) for s, idx in splits.items()},
            "class_counts": split_counts(domain, splits),
        }
        if repeat is not None:
            metrics["repeat"] = repeat
        save_weights_atomic(stage_dir / "model.safetensors", net.state_dict(), {"spec": json.dumps(net.spec)})
        write_text_atomic(stage_dir / "model.json", json.dumps(
            {"spec": net.spec, "input": attrs.asdict(config.input), "frozen": cand["frozen"],
             "domain": {"plugin": cfg.domain.plugin, "options": cfg.domain.options}}, indent=2) + "\n")
        write_json_atomic(stage_dir / "history.json", best["history"])
        write_text_atomic(stage_dir / "predictions.csv", _predictions_csv([best["val_pred"], test_pred]))
        _write_splits(stage_dir / "splits.csv", domain, splits)
        write_json_atomic(stage_dir / "metrics.json", metrics)  # last: marks the stage finished, for --resume
        return metrics, selection


class _Damaged(Exception):
    """A finished stage's file is damaged: the stage is finished again instead of trusted."""


def _splits_csv(domain: Domain, splits: dict[str, np.ndarray]) -> str:
    rows = io.StringIO()
    wr = csv.writer(rows, lineterminator="\n")
    wr.writerow(["id", "label", "split"])
    for s, idx in splits.items():
        for i in idx:
            wr.writerow([domain.ids[i], domain.classes[domain.labels[i]], s])
    return rows.getvalue()


def _write_splits(path: Path, domain: Domain, splits: dict[str, np.ndarray], check: bool = False) -> None:
    """Write the split assignment; with ``check`` (a resumed run), refuse one that differs from the saved one."""
    text = _splits_csv(domain, splits)
    if check and path.is_file() and not _same_or_truncated(path.read_text(), text):
        raise UserError(f"{path} does not match the split this run makes now (the file is damaged, or the data "
                        f"or split settings changed since the run started): restore the data, or delete "
                        f"{path.parent} to re-run that step from the start")
    write_text_atomic(path, text)


def _same_or_truncated(saved: str, now: str) -> bool:
    """True when ``saved`` is ``now`` or a cut-off copy of it (damage that rewriting repairs); False when the
    two assignments differ (the data or the split settings changed)."""
    return now.startswith(saved)


def _copy_stage(src: Path, stage_dir: Path) -> None:
    """Copy a finished stage folder whole into a temporary folder, then rename it: a crash leaves no
    half-copied stage behind (and ``metrics.json``, which marks a stage finished, only ever with the rest)."""
    import shutil

    tmp = stage_dir.parent / f".{stage_dir.name}.reuse-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    shutil.rmtree(stage_dir, ignore_errors=True)
    tmp.replace(stage_dir)


def _same_weights(net: Network, path: Path) -> bool:
    """``path`` holds exactly ``net``'s weights (every tensor, bit for bit)."""
    try:
        saved, _ = load_weights(path)
    except UserError:
        return False
    state = net.state_dict()
    return saved.keys() == state.keys() and all(torch.equal(saved[k], state[k].detach().cpu()) for k in state)


def _same_upstream(before: dict[str, Any], now: dict[str, Any], index: int) -> bool:
    """Two raw configs agree on everything stage ``index`` depends on: ``[input]``, the run seed, and the
    stage tables up to and including ``index`` (names, domains, backbones, splits, training). A string that
    names an existing file or folder compares as its absolute path (``data/x`` run from the repository root
    is ``/home/me/repo/data/x``); the split check then confirms the images are the same."""
    def norm(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: norm(x) for k, x in v.items()}
        if isinstance(v, list):
            return [norm(x) for x in v]
        if isinstance(v, str) and ("/" in v or "\\" in v) and Path(v).exists():
            return str(Path(v).resolve())
        return v

    return (before.get("input", {}) == now.get("input", {})
            and before.get("run", {}).get("seed", 0) == now.get("run", {}).get("seed", 0)
            and len(before.get("stages", [])) > index
            and norm(before["stages"][:index + 1]) == norm(now["stages"][:index + 1]))


def _finished_repeat(rdir: Path) -> bool:
    try:
        m = json.loads((rdir / "metrics.json").read_text())
        load_weights(rdir / "model.safetensors")
        return isinstance(m, dict) and "auc_macro" in m
    except (OSError, ValueError, UserError):
        return False


def make_reporters(config: Config, registry: Registry) -> list[Any]:
    """The run's reporters, created with ``[run] reporter_options``: by default every installed reporter
    except opt-in ones (a factory with ``opt_in = True``, used only when named in ``[run] reporters``)."""
    names = config.run.reporters if config.run.reporters is not None else [
        n for n in registry.names("reporter") if not getattr(registry.get("reporter", n).factory, "opt_in", False)]
    for name in config.run.reporter_options:
        registry.get("reporter", name, key=f"run.reporter_options.{name}", source=config.source)
    options = check_reporter_options(config.run.reporter_options, names, "run.reporter_options", config.source)
    reporters = []
    for n in names:
        try:
            reporters.append(registry.create("reporter", n, options.get(n, {}), key=f"run.reporter_options.{n}",
                                             source=config.source))
        except (ValueError, TypeError) as exc:  # a reporter's own check of an option's value
            raise ConfigError(str(exc), key=f"run.reporter_options.{n}", source=config.source) from None
    return reporters


def check_reporter_options(options: dict[str, Any], names: list[str] | tuple[str, ...], key: str,
                           source: str) -> dict[str, dict[str, Any]]:
    """Check ``{reporter: {option: value}}`` names only reporters of ``names`` and holds tables."""
    for name, value in options.items():
        if name not in names:
            raise ConfigError(f'options for reporter "{name}", which this run does not use (it uses: '
                              f'{", ".join(names) or "none"}); add it to run.reporters, or remove its options',
                              key=f"{key}.{name}", source=source)
        if not isinstance(value, dict):
            raise ConfigError(f"expected a table of options, e.g. {{ n_resamples = 2000 }}, got {value!r}",
                              key=f"{key}.{name}", source=source)
    return options


def checkpoint_seconds() -> float:
    """Seconds between training checkpoints (``MLTL_CHECKPOINT_SECONDS``, default 60; 0 = every epoch)."""
    import os

    try:
        return float(os.environ.get("MLTL_CHECKPOINT_SECONDS", "60"))
    except ValueError:
        raise UserError("MLTL_CHECKPOINT_SECONDS must be a number of seconds") from None


def _resume_dir(config: Config, out: str | None) -> Path:
    if out is not None:
        path = Path(out)
    else:
        base = Path("runs") / config.run.name
        numbered = [p for p in base.parent.glob(f"{config.run.name}-*") if re.fullmatch(r"\d+", p.name[len(config.run.name) + 1:])]
        found = [p for p in [base, *numbered] if (p / "config.toml").is_file()]  # not runs/<name>-compare etc.
        if not found:
            raise UserError(f"--resume: no earlier run of {config.run.name!r} under runs/; "
                            f"name its directory with --out")
        path = max(found, key=lambda p: (p / "config.toml").stat().st_mtime)
    stored = path / "config.toml"
    if not stored.is_file():
        raise UserError(f"--resume: {path} is not an mltl run directory (no config.toml)")
    import tomllib

    text = stored.read_text(errors="replace")
    if text != dump_toml(config.raw) and dump_toml(config.raw).startswith(text):
        raise UserError(f"--resume: {stored} is damaged: cut off after {len(text)} characters (what is left is the "
                        f"beginning of this config); if this is the config the run was started with, write it "
                        f"there again (`mltl validate` shows it is valid) and resume, or start a new run")
    try:
        before = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"--resume: {stored} is damaged ({exc}); start a new run") from None
    now = tomllib.loads(dump_toml(config.raw))
    if before != now:
        diff = _first_difference(before, now)
        raise UserError(f"--resume: the config differs from the one {path} was started with (at {diff}); "
                        f"resume with the same config and --set overrides, or start a new run")
    return path


def _first_difference(a: Any, b: Any, path: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{path}.{k}" if path else k)
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return _first_difference(x, y, f"{path}[{i}]")
    return path or "the top level"


class _StopOnSignal:
    """SIGINT/SIGTERM ask the training loop to save a checkpoint and stop (a second SIGINT stops at once)."""

    def __enter__(self) -> _StopOnSignal:
        import signal
        import threading

        from . import train

        train.stop_requested = False
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        import signal

        from . import train

        if train.stop_requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        train.stop_requested = True

    def __exit__(self, *exc: Any) -> None:
        import signal

        from . import train

        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        train.stop_requested = False


def run(config: Config | str | Path, *, out: str | Path | None = None, device: str | None = None,
        overrides: list[str] | tuple[str, ...] = (), resume: bool = False,
        reuse: list[str | Path] | tuple[str | Path, ...] = ()) -> RunResult:
    """Run a chain: ``config`` is a :class:`Config` or a path to a TOML file (``overrides`` apply to a path).

    With ``resume``, continue the run in ``out`` (default: the latest ``runs/<name>[-N]``): finished stages
    and sweep variants are reused, an unfinished variant continues from its last checkpoint.

    ``reuse`` names earlier run directories: a stage finished there from the same data, settings and upstream
    stages is copied instead of trained (e.g. a new target on an intermediate stage trained before).
    """
    if not isinstance(config, Config):
        config = load_config(config, overrides)
    elif overrides:
        raise ValueError("overrides apply to a config file path; pass a path, or apply them with load_config")
    reuse = tuple(Path(p) for p in reuse)
    for p in reuse:
        if not (p / "config.toml").is_file():
            raise UserError(f"--reuse {p}: not an mltl run directory (no config.toml); name a folder that "
                            f"`mltl run` wrote, e.g. runs/<name>")
    registry = get_registry()
    # under torchrun: join the process group, this rank's device (docs/performance.md, mltl.distributed)
    dev = distributed.setup(device or config.run.device) or resolve_device(device or config.run.device)
    validate(config, registry)
    domains = load_domains(config, registry)
    from .datacheck import audit_leakage  # duplicates across splits / stages stop the run (docs/data-check.md)

    domains = audit_leakage(config, domains)
    for i, stage in enumerate(config.stages):  # a protocol or split the data cannot support fails now, not hours later
        for _, cfg in stage.variants:
            domain = domains[_domain_cache_key(cfg)]
            protocol = resolve_protocol(cfg.split, last=i == len(config.stages) - 1, domain=domain,
                                        key=f"{_stage_key(config, i)}.split", source=config.source)
            for rep in plan_repeats(cfg.split, protocol)[:1]:
                make_stage_split(config, domain, cfg, rep, f"{config.source}: {_stage_key(config, i)} "
                                                           f"({cfg.domain.plugin}): ")
    # under torchrun only rank 0 reports, chooses and locks the run directory; the others get its path
    reporters = [ConsoleReporter()] + make_reporters(config, registry) if distributed.is_writer() else []
    out = str(out) if out is not None else config.run.out
    with contextlib.ExitStack() as stack:
        def claim() -> Path:
            path = _resume_dir(config, out) if resume else choose_run_dir(out, config.run.name)
            path.mkdir(parents=True, exist_ok=True)
            stack.enter_context(RunLock(path))
            return path

        run_dir = distributed.on_rank0(claim)
        stack.enter_context(_StopOnSignal())
        return _run_locked(config, registry, dev, domains, reporters, run_dir, resume, reuse)


def _run_locked(config: Config, registry: Registry, dev: torch.device, domains: dict[str, Domain],
                reporters: list[Any], run_dir: Path, resume: bool, reuse: tuple[Path, ...] = ()) -> RunResult:
    torch.manual_seed(config.run.seed)
    env = environment(dev, config.run.seed)
    if resume:
        write_json_atomic(run_dir / f"environment-resume-{env['time_utc'].replace(':', '')}.json", env)
        try:
            env = json.loads((run_dir / "environment.json").read_text())
        except (OSError, ValueError):
            write_json_atomic(run_dir / "environment.json", env)  # damaged or missing: this session's
    else:
        write_text_atomic(run_dir / "config.toml", dump_toml(config.raw))
        write_json_atomic(run_dir / "environment.json", env)
    write_json_atomic(run_dir / "state.json", {"state": "running", "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    t0 = time.perf_counter()
    runner = _StageRunner(config, registry, dev, run_dir, domains, reporters, resume, reuse)
    results: list[StageResult] = []
    try:
        for i, stage in enumerate(config.stages):
            results.append(runner.run(i, stage))
        write_report(run_dir, config.raw, results, env)
        call(reporters, "run_finished", results=results, run_dir=run_dir)
        emit("mltl_run_finished", results=results, run_dir=run_dir)
        write_report(run_dir, config.raw, results, env)  # again, now with the reporters' figures
    except Interrupted as exc:
        write_json_atomic(run_dir / "state.json", {
            "state": "interrupted", "stages_finished": [r.name for r in results], "checkpoint": exc.checkpoint,
            "resume": f"mltl run {config.source} --resume --out {run_dir}"})
        raise
    except BaseException as exc:
        reason = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
        write_json_atomic(run_dir / "state.json", {"state": "failed", "reason": reason,
                                                   "stages_finished": [r.name for r in results]})
        raise
    write_json_atomic(run_dir / "state.json", {"state": "finished", "seconds": time.perf_counter() - t0})
    return RunResult(run_dir=run_dir, stages=tuple(results))


__all__ = ["RunResult", "run", "validate", "resolve_device", "ConfigError"]
