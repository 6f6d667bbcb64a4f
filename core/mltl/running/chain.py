"""The chain runner: stages in order, each starting from the previous stage's selected weights.

:func:`run` checks everything first (:func:`mltl.running.preflight.prepare`: plugins, networks, every domain,
leakage, every split), then for each stage: resumed, reused or trained. Training a stage means, for each
repeat of its protocol: train every variant of its sweep, select the winner on the **validation** split,
and only then evaluate the winner, once, on the test split; write its record (:mod:`mltl.running.rundir`); hand
the winner down to later stages.

After a repeated protocol (k-fold, seeds, fractions) has measured a stage, the stage also trains its **final
model** (``split.final_model``, default on) on all of its non-test data: k-fold every image of the domain,
otherwise the train and val images of the holdout split; with the variant selected most often on validation
over the repeats, for the median of that variant's best epochs (rounded up), without early stopping. It is
written to ``STAGE/final/``, never evaluated (the stage's numbers are the repeats'), and it is what the next
stage, ``mltl predict`` and ``mltl export`` use (:func:`mltl.running.rundir.served`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
import warnings
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch

from ..config import Config, StageConfig, dump_toml, load_config, restrict_to_backbone
from ..data.domain import Domain, prepare_images, split_counts
from ..data.stream import load_images
from ..errors import ConfigError, UserError
from ..evaluation.metrics import classification_metrics, is_better, metric_value
from ..evaluation.report import headline, write_report
from ..evaluation.reporting import ConsoleReporter, Events, make_reporters
from ..evaluation.results import (Candidate, Predictions, StageResult, group_keys, selection_record,
                                  stage_metrics)
from ..networks.freeze import FreezePolicy
from ..networks.network import HeadSpec, Network, build_network, derive, make_spec
from ..plugins import Hooks, Registry, get_registry
from ..training import distributed
from ..training.train import Interrupted, StopOnSignal, TensorData, checkpoint_seconds, fit, predict_proba
from .plan import StagePlan, domain_key
from .preflight import ChainPlan, check_not_inside_data, prepare, resolve_device
from .protocols import Repeat, summarise_repeats
from .resume import check_reuse_dirs, find_earlier, resume_dir
from .rundir import (Damaged, RunFiles, RunLock, StageFiles, choose_run_dir, content_hash, copy_stage, environment,
                    finished_repeat, jsonable, load_network, pixel_hash, prune_stage, read_final, read_stage,
                    read_variant, remove_orphan_temporaries, splits_csv, training_images_record, write_final,
                    write_json_atomic, write_repeated_stage, write_splits, write_stage, write_text_atomic,
                    write_variant)

log = logging.getLogger("mltl")


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


@attrs.define(eq=False)
class _Trained:
    """A trained variant of a stage, kept in memory while the stage's selection runs."""

    candidate: Candidate
    net: Network
    cfg: StageConfig
    domain: Domain
    splits: dict[str, np.ndarray]
    val: Predictions
    start: str  # "new gfe-2", "from source"
    note: str  # how the network was obtained, for the report
    history: Any


def _image_file(image_id: str, options: dict[str, Any]) -> Path | None:
    """The file an image id names, where there is one: an absolute path, or a path under the domain's ``root``
    (image-folder) or beside its ``csv`` (csv-manifest); None for a generated image or a slice of a volume."""
    path = Path(image_id)
    candidates = [path] if path.is_absolute() else []
    if not path.is_absolute():
        for key, base in (("root", lambda v: Path(v).expanduser()), ("csv", lambda v: Path(v).expanduser().parent)):
            if isinstance(options.get(key), str):
                candidates.append(base(options[key]) / path)
    for candidate in candidates:
        try:
            if candidate.is_file():
                return candidate
        except OSError:
            continue
    return None


def _file_hash(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        return content_hash(path.read_bytes())
    except OSError:
        return None


def _predictions(net: Network, domain: Domain, idx: np.ndarray, split: str, x: torch.Tensor, input_cfg) -> Predictions:
    return Predictions(ids=tuple(domain.ids[i] for i in idx), split=split, labels=domain.labels[idx],
                       probs=predict_proba(net, x, input_cfg), classes=domain.classes,
                       groups=None if domain.groups is None else group_keys([domain.groups[i] for i in idx]))


class _StageRunner:
    def __init__(self, chain: ChainPlan, registry: Registry, device: torch.device, run_dir: Path,
                 events: Hooks, resume: bool, reuse: tuple[Path, ...] = ()) -> None:
        self.chain, self.config, self.registry, self.device = chain, chain.config, registry, device
        self.run_files, self.events, self.resume, self.reuse = RunFiles(run_dir), events, resume, reuse
        self.selected: dict[str, Network] = {}  # each finished stage's winner, handed down
        self._tensors: dict[str, torch.Tensor] = {}
        self._hashes: dict[str, tuple[list[str], list[str | None]]] = {}

    def _images(self, cfg: StageConfig) -> torch.Tensor:
        k = domain_key(cfg)
        if k not in self._tensors:
            run = self.config.run
            # resident on the device when it fits [run] device_memory_budget_gb, else streamed (mltl.data.stream)
            self._tensors = {k: load_images(self.chain.domain(cfg).images, size=self.config.input.size,
                                            channels=self.config.input.channels, device=self.device,
                                            device_budget_gb=run.device_memory_budget_gb,
                                            host_budget_gb=run.host_memory_budget_gb)}
        return self._tensors[k]

    def _content_hashes(self, cfg: StageConfig, domain: Domain) -> tuple[list[str], list[str | None]]:
        """Per image of the domain: the hash of its pixels at the chain's input and of its file's bytes (None
        where it is no file); computed once per domain, as ``mltl predict`` computes them for a new file."""
        k = domain_key(cfg)
        if k not in self._hashes:
            size, channels = self.config.input.size, self.config.input.channels
            pixels: list[str] = []
            for i in range(0, len(domain), 1024):
                prepared = prepare_images(np.asarray(domain.images[i:i + 1024]), size=size, channels=channels)
                pixels += [pixel_hash(a) for a in prepared.numpy()]
            files = [_file_hash(_image_file(i, cfg.domain.options)) for i in domain.ids]
            self._hashes = {k: (pixels, files)}
        return self._hashes[k]

    def _training_images(self, cfg: StageConfig, domain: Domain, roles: dict[str, np.ndarray]) -> dict[str, Any]:
        """``training_images.json`` of a model trained on ``roles["train"]`` (and chosen on ``roles["val"]``)."""
        pixels, files = self._content_hashes(cfg, domain)
        return training_images_record({r: [pixels[i] for i in idx] for r, idx in roles.items()},
                                      {r: [files[i] for i in idx if files[i] is not None] for r, idx in roles.items()},
                                      size=self.config.input.size, channels=self.config.input.channels)

    def run(self, plan: StagePlan) -> StageResult:
        name = plan.stage.name
        files = self.run_files.stage(name)
        if distributed.is_writer():  # under torchrun only rank 0 writes the run directory
            files.root.mkdir(parents=True, exist_ok=True)
        self.events.stage_started(stage_name=name, stage_dir=files.root)
        result = self._resumed(plan, files) if self.resume and files.metrics.is_file() else None
        if result is None and self.reuse:
            result = self._reused(plan, files)
        if result is None:
            result = self._train_once(plan, files) if len(plan.repeats) == 1 else self._train_repeated(plan, files)
        self.events.stage_finished(result=result)
        # [run] keep = "selected": sweep variants' weights and checkpoints go, now that metrics.json is on disk
        removed = prune_stage(files, self.config.run.keep)
        if removed:
            log.info("%s: removed %d files no longer needed ([run] keep = \"selected\")", files.root, len(removed))
        return result

    def _resumed(self, plan: StagePlan, files: StageFiles) -> StageResult | None:
        try:
            result, self.selected[plan.stage.name] = read_stage(files, plan.stage.name,
                                                                swept=len(plan.stage.variants) > 1,
                                                                registry=self.registry)
            return result
        except Damaged as exc:
            # repaired, not trusted: the stage is finished again from its saved variants (no retraining
            # unless a variant's own files are damaged too)
            log.warning("%s: %s; finishing the stage again from its saved variants", files.root, exc)
            files.metrics.unlink()
            return None

    def _reused(self, plan: StagePlan, files: StageFiles) -> StageResult | None:
        """``--reuse``: every rank decides alike (read-only checks); rank 0 copies."""
        origin = find_earlier(plan, self.chain.domain(plan.stage.first), self.reuse, self.selected)
        if origin is None:
            return None
        if distributed.is_writer():
            copy_stage(origin, files.root)
        distributed.barrier()
        try:
            result, self.selected[plan.stage.name] = read_stage(files, plan.stage.name,
                                                                swept=len(plan.stage.variants) > 1,
                                                                registry=self.registry)
        except Damaged as exc:
            log.warning("%s: not reused: %s; training the stage", origin, exc)
            if distributed.is_writer():
                files.metrics.unlink(missing_ok=True)
            return None
        if distributed.is_writer():
            path = self.run_files.reused
            reused = json.loads(path.read_text()) if path.is_file() else {}
            write_json_atomic(path, {**reused, plan.stage.name: str(origin)})
            log.info("%s: reused from %s (same data, settings and upstream stages)", plan.stage.name, origin)
        return result

    def _train_once(self, plan: StagePlan, files: StageFiles) -> StageResult:
        metrics, selection, best, test = self._select_and_test(plan, files, plan.repeats[0])
        self.selected[plan.stage.name] = best.net
        return StageResult(name=plan.stage.name, stage_dir=files.root, classes=best.domain.classes, test=test,
                           metrics=metrics, selection=selection)

    def _train_repeated(self, plan: StagePlan, files: StageFiles) -> StageResult:
        """Every fold / draw / seed is a complete stage of its own under ``repeats/``; the stage's own files
        are its representative repeat's (the first fold / the first draw at the largest fraction / the first
        seed): its model is the one handed on and served by ``mltl predict``."""
        done: dict[str, tuple[dict[str, Any], dict[str, Any] | None, Network, Predictions]] = {}
        rows = []
        for rep in plan.repeats:
            rfiles = files.repeat(rep.label)
            saved = self._finished_repeat(plan, rfiles) if self.resume else None
            if saved is None:
                metrics, selection, best, test = self._select_and_test(plan, rfiles, rep)
                saved = metrics, selection, best.net, test
            distributed.barrier()  # under torchrun: rank 0 has written what every rank reads next
            done[rep.label] = saved
            m = jsonable(saved[0])
            rows.append({**rep.row(), "seed": plan.seed + rep.seed_offset, "n_train": m["n_images"]["train"],
                         "n_test": m["n_test"], "auc_macro": m["auc_macro"], "accuracy": m["accuracy"],
                         "balanced_accuracy": m["balanced_accuracy"], "train_seconds": m["train_seconds"]})
        summary = summarise_repeats(plan.protocol, rows, list(plan.repeats), [done[r.label][3] for r in plan.repeats])
        oof_csv = summary.pop("pooled_csv", None)
        metrics, selection, net, test = done[summary["representative"]]
        # a [run] baseline (trained from scratch for comparison only) hands nothing on: no final model
        baseline = self.config.baseline
        wanted = plan.stage.first.split.final_model and (baseline is None or plan.stage.name != baseline.name)
        final = self._final_model(plan, files, done) if wanted else None
        # the numbers stay the repeats'; the final model's record says what it is and how it was made
        metrics = jsonable({**metrics, "protocol": summary, **({"final_model": final[1]} if final else {})})
        write_repeated_stage(files, summary["representative"], oof_csv,
                             {"protocol": plan.protocol, "rows": rows}, metrics, final=final[1] if final else None)
        distributed.barrier()
        self.selected[plan.stage.name] = final[0] if final else net
        return StageResult(name=plan.stage.name, stage_dir=files.root, classes=tuple(metrics["classes"]),
                           test=test, metrics=metrics, selection=jsonable(selection))

    def _final_model(self, plan: StagePlan, files: StageFiles, done: dict[str, tuple]) -> tuple[Network, dict[str, Any]]:
        """Train (or, resumed, read) the stage's final model in ``STAGE/final``; the network and its record.

        Data: every image of the domain (k-fold: each was tested once by a fold model that did not train on
        it), otherwise the train and val images of the holdout split. Variant: the one the repeats' selections
        chose most often (ties: the first listed). Epochs: the median of that variant's best epochs (on
        validation) over the repeats, rounded up; fractions count only the repeats at the largest fraction,
        whose training split is the nearest to the final model's. No early stopping: nothing is left to
        validate on. Nothing is evaluated: the model trained on every image it could be tested on."""
        stage, ffiles = plan.stage, files.final
        heads = list(plan.repeats)
        if plan.protocol == "fractions":
            top = max(r.fraction for r in plan.repeats)
            heads = [r for r in plan.repeats if r.fraction == top]
        order = [label for label, _ in stage.variants]
        chosen = {r.label: done[r.label][0].get("selected_variant") or "" for r in heads}
        counts = {v: list(chosen.values()).count(v) for v in order}
        variant = max(order, key=lambda v: (counts[v], -order.index(v)))

        def best_epoch(label: str) -> int | None:
            m, sel = done[label][0], done[label][1]
            if (m.get("selected_variant") or "") == variant:
                return m.get("best_epoch")
            return next((c.get("best_epoch") for c in (sel or {}).get("candidates", [])
                         if c.get("variant") == variant and c.get("best_epoch") is not None), None)

        best = [e for e in (best_epoch(r.label) for r in heads) if e is not None]
        median = float(np.median(best)) if best else float(dict(stage.variants)[variant].train.epochs)
        epochs = max(1, math.ceil(median))
        cfg = dict(stage.variants)[variant]
        domain = self.chain.domain(cfg)
        if plan.protocol == "kfold":
            idx = np.arange(len(domain))
            what = ("every image of the domain: k-fold tested each once, by the fold model that did not train on "
                    "it; none is held out")
        else:
            holdout = plan.split(domain, cfg, Repeat(label=""))
            idx = np.sort(np.concatenate([holdout["train"], holdout["val"]]))
            what = ("the train and val images of the holdout split; its test images, on which the repeats were "
                    "tested, are not trained on")
        repeats_word = {"kfold": "folds", "fractions": f"draws at the largest fraction ({heads[0].fraction:g})"
                        if heads[0].fraction is not None else "draws"}.get(plan.protocol, "seeds")
        record: dict[str, Any] = {
            "model": "final", "folder": StageFiles.FINAL, "variant": variant or None,
            "variant_rule": (f"selected on validation in {counts[variant]} of the {len(heads)} {repeats_word} "
                             f"(the most often; ties: the first listed variant)") if len(order) > 1
            else "the stage's only variant",
            "selected_by_repeat": {k: v or None for k, v in chosen.items()},
            "trained_on": len(idx), "trained_on_images": what,
            "class_counts": split_counts(domain, {"train": idx})["train"],
            "epochs": epochs, "best_epochs": best,
            "epochs_rule": (f"the median of the variant's best epochs on validation over the {len(heads)} "
                            f"{repeats_word} ({median:g}), rounded up; no early stopping (no validation data is "
                            f"left); the learning-rate schedule spans these {epochs} epochs"),
            "seed": plan.seed, "evaluated": False,
            "evaluation": ("none: it trained on every image it could be tested on; the stage's numbers are the "
                           "repeats' (metrics.json protocol, repeats.json), whose models stay in repeats/"),
        }
        if self.resume:
            found = read_final(ffiles, self.registry)
            if found is not None and all(found[1].get(k) == record[k] for k in ("variant", "epochs", "trained_on")):
                log.info("%s: the final model was finished before the interruption", ffiles.root)
                return found[0], {**record, "train_seconds": found[1].get("train_seconds")}
        split_text = splits_csv(domain.ids, domain.classes, domain.labels, {"train": idx})
        if distributed.is_writer():
            ffiles.root.mkdir(parents=True, exist_ok=True)
        write_splits(ffiles.splits, split_text, check=self.resume)
        torch.manual_seed(plan.seed)
        net, _start, note = self._start_network(plan, cfg, domain)
        frozen = FreezePolicy(cfg.freeze).resolve(net, self.registry, key=f"{plan.key}.freeze",
                                                  source=self.config.source)
        net.set_frozen(frozen)
        net.to(self.device)
        x = self._images(cfg)
        train = TensorData(x[torch.from_numpy(idx).to(self.device)], torch.from_numpy(domain.labels[idx]).to(self.device))
        inp = self.config.input
        # fit() scores a validation split after its last epoch; there is none, so it gets one blank image (no
        # image of any split), and its numbers are dropped from the history: nothing is measured on this model
        blank = TensorData(torch.zeros((1, inp.channels, inp.size, inp.size), dtype=torch.uint8, device=self.device),
                           torch.zeros(1, dtype=torch.int64, device=self.device))
        tcfg = attrs.evolve(cfg.train, epochs=epochs, patience=None, val_every=epochs + 1)

        def on_epoch(epoch: int, row: dict[str, Any]) -> None:
            row.update(val_loss=math.nan, val_auc=math.nan, val_accuracy=math.nan)  # the history's row itself
            self.events.epoch_ended(stage_name=stage.name, variant=StageFiles.FINAL, epoch=epoch,
                                    metrics={**row, "epochs": epochs})

        log.info("%s: training the final model on %d images for %d epochs", stage.name, len(idx), epochs)
        with warnings.catch_warnings():  # scikit-learn's notes on scoring one blank image of one class
            warnings.filterwarnings("ignore", category=UserWarning, module=r"sklearn\.")
            fitted = fit(net, train, blank, tcfg, inp, classes=domain.classes, seed=plan.seed, on_epoch=on_epoch,
                         checkpoint=ffiles.checkpoint, checkpoint_seconds=checkpoint_seconds(),
                         key=f"stages.{stage.name}.train", source=self.config.source)
        net.to("cpu")
        record["train_seconds"] = fitted.seconds
        model_json = {"spec": net.spec, "input": attrs.asdict(inp), "input_note": self.chain.input_note,
                      "frozen": sorted(frozen, key=net.group_names().index),
                      "domain": {"plugin": cfg.domain.plugin, "options": cfg.domain.options},
                      "start": note, **record}
        write_final(ffiles, net=net, model_json=model_json, history=fitted.history, splits=split_text,
                    training_images=self._training_images(cfg, domain, {"train": idx}))
        distributed.barrier()
        return net, record

    def _finished_repeat(self, plan: StagePlan, files: StageFiles):
        """A repeat finished before an interruption, as saved; None when it must be trained (again)."""
        if not finished_repeat(files):
            return None
        try:
            result, net = read_stage(files, plan.stage.name, swept=len(plan.stage.variants) > 1,
                                     registry=self.registry)
        except Damaged as exc:
            log.warning("%s: %s; training the repeat again", files.root, exc)
            return None
        return result.metrics, result.selection, net, result.test

    def _select_and_test(self, plan: StagePlan, files: StageFiles, rep: Repeat):
        """Train every variant, select on validation, test the winner once, write the record."""
        seed = plan.seed + rep.seed_offset
        best, candidates = self._select(plan, files, rep, seed)
        x = self._images(best.cfg)
        test_idx = best.splits["test"]
        best.net.to(self.device)
        test = _predictions(best.net, best.domain, test_idx, "test", x[torch.from_numpy(test_idx).to(self.device)],
                            self.config.input)  # the selected variant's first and only look at its test split
        metrics, selection = self._write(plan, files, best, candidates, test, rep)
        best.net.to("cpu")
        return metrics, selection, best, test

    def _select(self, plan: StagePlan, files: StageFiles, rep: Repeat, seed: int) -> tuple[_Trained, list[Candidate]]:
        """Train every variant of the stage (or take it as saved); the best on validation, and every candidate."""
        stage = plan.stage
        sweeping = len(stage.variants) > 1
        candidates: list[Candidate] = []
        best: _Trained | None = None
        for label, cfg in stage.variants:
            domain = self.chain.domain(cfg)
            splits = plan.split(domain, cfg, rep)
            vfiles = files.variant(label) if sweeping else files
            if distributed.is_writer():
                vfiles.root.mkdir(parents=True, exist_ok=True)
            write_splits(vfiles.splits, splits_csv(domain.ids, domain.classes, domain.labels, splits),
                         check=self.resume)
            x = self._images(cfg)
            data = {s: TensorData(x[torch.from_numpy(idx).to(self.device)],
                                  torch.from_numpy(domain.labels[idx]).to(self.device)) for s, idx in splits.items()}
            record = read_variant(vfiles) if self.resume else None
            if record is not None:  # a variant finished before the interruption: taken as it is
                cand = Candidate.from_json(record["candidate"])
                candidates.append(cand)
                if best is None or is_better(cand.selection_value, best.candidate.selection_value, stage.select_by):
                    net = load_network(vfiles.model, self.registry).to(self.device)
                    net.set_frozen(frozenset(cand.frozen))  # as it trained: metrics.json counts trainable weights
                    val = _predictions(net, domain, splits["val"], "val", data["val"].x, self.config.input)
                    best = _Trained(cand, net.to("cpu"), cfg, domain, splits, val, record["start"], record["note"],
                                    json.loads(vfiles.history.read_text()))
                continue
            trained = self._train_variant(plan, label, cfg, domain, splits, data, vfiles, seed, rep, sweeping)
            candidates.append(trained.candidate if isinstance(trained, _Trained) else trained)
            if isinstance(trained, _Trained) and (best is None or is_better(
                    trained.candidate.selection_value, best.candidate.selection_value, stage.select_by)):
                best = trained
        if best is None:
            raise UserError(f"{self.config.source}: {plan.key}: no variant of stage {stage.name} applies to the "
                            f"network it starts from: " + "; ".join(c.skipped for c in candidates))
        return best, candidates

    def _start_network(self, plan: StagePlan, cfg: StageConfig, domain: Domain) -> tuple[Network, str, str]:
        """The network a variant starts from (a new backbone, or the earlier stage's handed-down model), how it
        started ("new gfe-2", "from source") and a note for the report."""
        config, key = self.config, plan.key
        if cfg.backbone is not None:
            spec = make_spec(cfg.backbone.name, cfg.backbone.options, config.input.channels,
                             config.input.size, cfg.head or HeadSpec(), domain.classes)
            net = build_network(spec, self.registry, key=f"{key}.backbone", source=config.source)
            return net, f"new {cfg.backbone.name}", f"New {cfg.backbone.name} network"
        net, note = derive(self.selected[cfg.init], self.registry, classes=domain.classes, head=cfg.head,
                           in_chans=config.input.channels, image_size=config.input.size,
                           key=key, source=config.source)
        return net, f"from {cfg.init}", f"Started from stage {cfg.init}: {note}"

    def _train_variant(self, plan: StagePlan, label: str, cfg: StageConfig, domain: Domain, splits, data,
                       vfiles: StageFiles, seed: int, rep: Repeat, sweeping: bool) -> _Trained | Candidate:
        """Build (or inherit) the variant's network, freeze it, train it, score it on validation, save it."""
        config, key = self.config, plan.key
        torch.manual_seed(seed)
        net, start, note = self._start_network(plan, cfg, domain)
        try:
            frozen = FreezePolicy(cfg.freeze).resolve(net, self.registry, key=f"{key}.freeze", source=config.source)
        except ConfigError as exc:
            if not sweeping:
                raise
            # e.g. "C1-C3" after the source sweep picked a network with two convolutions
            return Candidate(variant=label, skipped=str(exc))
        net.set_frozen(frozen)
        net.to(self.device)
        tag = ",".join(filter(None, (rep.label, label)))

        def on_epoch(epoch: int, row: dict[str, Any]) -> None:
            self.events.epoch_ended(stage_name=plan.stage.name, variant=tag, epoch=epoch,
                                    metrics={**row, "epochs": cfg.train.epochs})

        fitted = fit(net, data["train"], data["val"], cfg.train, config.input, classes=domain.classes,
                     seed=seed, on_epoch=on_epoch, checkpoint=vfiles.checkpoint,
                     checkpoint_seconds=checkpoint_seconds(), key=f"stages.{plan.stage.name}.train", source=config.source)
        val = _predictions(net, domain, splits["val"], "val", data["val"].x, config.input)
        val_metrics = classification_metrics(val.labels, val.probs, domain.classes)
        cand = Candidate(variant=label, selection_value=metric_value(val_metrics, plan.stage.select_by),
                         val=val_metrics, best_epoch=fitted.best_epoch, epochs_run=len(fitted.history),
                         frozen=tuple(sorted(frozen, key=net.group_names().index)), train_seconds=fitted.seconds)
        write_variant(vfiles, net, fitted.history, {"candidate": cand.to_json(), "start": start, "note": note,
                                                    "config": attrs.asdict(cfg)})
        return _Trained(cand, net.to("cpu"), cfg, domain, splits, val, start, note, fitted.history)

    def _write(self, plan: StagePlan, files: StageFiles, best: _Trained, candidates: list[Candidate],
               test: Predictions, rep: Repeat) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """The stage's (or one repeat's) record on disk; ``metrics.json`` last, which marks it finished."""
        stage, cand, cfg, domain, net = plan.stage, best.candidate, best.cfg, best.domain, best.net
        selection = selection_record(stage, cand, candidates) if len(stage.variants) > 1 else None
        metrics = stage_metrics(
            stage, cand, classification_metrics(test.labels, test.probs, domain.classes), classes=domain.classes,
            domain=cfg.domain.plugin, start=best.start, note=best.note,
            trainable=sum(p.numel() for p in net.parameters() if p.requires_grad),
            n_images={s: int(len(idx)) for s, idx in best.splits.items()},
            class_counts=split_counts(domain, best.splits), repeat=rep.row() if len(plan.repeats) > 1 else None)
        model_json = {"spec": net.spec, "input": attrs.asdict(self.config.input), "input_note": self.chain.input_note,
                      "frozen": list(cand.frozen), "domain": {"plugin": cfg.domain.plugin, "options": cfg.domain.options},
                      "model": "selected" + (f" (repeat {rep.label})" if rep.label else ""),
                      "variant": cand.variant or None}
        roles = {"train": best.splits["train"], "val": best.splits["val"]}
        write_stage(files, net=net, model_json=model_json, history=best.history, predictions=[best.val, test],
                    splits=splits_csv(domain.ids, domain.classes, domain.labels, best.splits), selection=selection,
                    metrics=metrics, training_images=self._training_images(cfg, domain, roles))
        return metrics, selection


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
    check_reuse_dirs(reuse)
    registry = get_registry()
    # under torchrun: join the process group, this rank's device (docs/performance.md, mltl.training.distributed)
    dev = distributed.setup(device or config.run.device) or resolve_device(device or config.run.device)
    chain = prepare(config, registry)
    # under torchrun only rank 0 reports, chooses and locks the run directory; the others get its path
    reporters = [ConsoleReporter(summary=headline)] + make_reporters(config, registry) if distributed.is_writer() else []
    out = str(out) if out is not None else config.run.out
    check_not_inside_data(config, Path(out) if out is not None else Path("runs") / config.run.name)
    with contextlib.ExitStack() as stack:
        def claim() -> Path:
            path = resume_dir(config, out) if resume else choose_run_dir(out, config.run.name)
            path.mkdir(parents=True, exist_ok=True)
            stack.enter_context(RunLock(path))
            remove_orphan_temporaries(path)  # what a killed process left half-written (never a live run's)
            return path

        run_dir = distributed.on_rank0(claim)
        stack.enter_context(StopOnSignal())
        events = stack.enter_context(Events(reporters))
        return _run_locked(chain, registry, dev, events, run_dir, resume, reuse)


def _run_locked(chain: ChainPlan, registry: Registry, dev: torch.device, events: Hooks, run_dir: Path,
                resume: bool, reuse: tuple[Path, ...]) -> RunResult:
    config, files = chain.config, RunFiles(run_dir)
    torch.manual_seed(config.run.seed)
    env = environment(dev, config.run.seed)
    if resume:
        write_json_atomic(files.environment_resumed(env["time_utc"]), env)
        try:
            env = json.loads(files.environment.read_text())
        except (OSError, ValueError):
            write_json_atomic(files.environment, env)  # damaged or missing: this session's
    else:
        write_text_atomic(files.config, dump_toml(config.raw))
        write_json_atomic(files.environment, env)
    write_json_atomic(files.state, {"state": "running", "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    if chain.input_note:
        log.info("%s", chain.input_note)
    t0 = time.perf_counter()
    runner = _StageRunner(chain, registry, dev, run_dir, events, resume, reuse)
    results: list[StageResult] = []
    try:
        events.run_started(config=config, run_dir=run_dir)
        for plan in chain.stages:
            if plan.stage is config.baseline:  # the network the chain's first stage selected, from scratch
                first = runner.selected[chain.stages[0].stage.name].spec
                plan = attrs.evolve(plan, stage=restrict_to_backbone(plan.stage, first["backbone"], first["options"]))
            results.append(runner.run(plan))
        write_report(run_dir, config.raw, results, env)
        events.run_finished(results=results, run_dir=run_dir)
        write_report(run_dir, config.raw, results, env)  # again, now with the reporters' figures
    except Interrupted as exc:
        write_json_atomic(files.state, {
            "state": "interrupted", "stages_finished": [r.name for r in results], "checkpoint": exc.checkpoint,
            "resume": f"mltl run {config.source} --resume --out {run_dir}"})
        raise
    except BaseException as exc:
        reason = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
        write_json_atomic(files.state, {"state": "failed", "reason": reason,
                                        "stages_finished": [r.name for r in results]})
        raise
    write_json_atomic(files.state, {"state": "finished", "seconds": time.perf_counter() - t0})
    return RunResult(run_dir=run_dir, stages=tuple(results))


__all__ = ["RunResult", "run"]
