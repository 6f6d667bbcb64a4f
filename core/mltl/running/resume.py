"""Carrying on and reusing: ``mltl run --resume`` (continue a run in its own directory) and ``--reuse``
(copy a stage an earlier run finished from the same data, settings and upstream stages).

What is finished is read through :mod:`mltl.running.rundir`; what the run would make now comes from
:mod:`mltl.running.plan`, so a resumed or reused stage is checked against the very split this run makes.
"""

from __future__ import annotations

import logging
import re
import tomllib
from pathlib import Path
from typing import Any

import torch

from ..config import Config, dump_toml
from ..data.domain import Domain
from ..errors import UserError
from ..networks.network import Network
from .plan import StagePlan
from .rundir import RunFiles, load_weights, served, splits_csv

log = logging.getLogger("mltl")


def resume_dir(config: Config, out: str | None) -> Path:
    """The run directory ``--resume`` continues: ``out``, or the latest ``runs/<name>[-N]`` holding a run
    of this config. Refused when its ``config.toml`` differs from ``config`` (names the first difference)."""
    if out is not None:
        path = Path(out)
    else:
        base = Path("runs") / config.run.name
        numbered = [p for p in base.parent.glob(f"{config.run.name}-*")
                    if re.fullmatch(r"\d+", p.name[len(config.run.name) + 1:])]
        found = [p for p in [base, *numbered] if RunFiles(p).config.is_file()]  # not runs/<name>-compare etc.
        if not found:
            raise UserError(f"--resume: no earlier run of {config.run.name!r} under runs/; "
                            f"name its directory with --out")
        path = max(found, key=lambda p: RunFiles(p).config.stat().st_mtime)
    stored = RunFiles(path).config
    if not stored.is_file():
        raise UserError(f"--resume: {path} is not an mltl run directory (no {stored.name})")
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
        raise UserError(f"--resume: the config differs from the one {path} was started with (at "
                        f"{first_difference(before, now)}); resume with the same config and --set overrides, "
                        f"or start a new run")
    return path


def first_difference(a: Any, b: Any, path: str = "") -> str:
    """The key path of the first place two parsed configs differ, e.g. ``stages[2].train.lr``."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return first_difference(a.get(k), b.get(k), f"{path}.{k}" if path else k)
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return first_difference(x, y, f"{path}[{i}]")
    return path or "the top level"


def check_reuse_dirs(reuse: tuple[Path, ...]) -> None:
    for p in reuse:
        if not RunFiles(p).config.is_file():
            raise UserError(f"--reuse {p}: not an mltl run directory (no config.toml); name a folder that "
                            f"`mltl run` wrote, e.g. runs/<name>")


def same_upstream(before: dict[str, Any], now: dict[str, Any], index: int) -> bool:
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


def same_weights(net: Network, path: Path) -> bool:
    """``path`` holds exactly ``net``'s weights (every tensor, bit for bit)."""
    try:
        saved, _ = load_weights(path)
    except UserError:
        return False
    state = net.state_dict()
    return saved.keys() == state.keys() and all(torch.equal(saved[k], state[k].detach().cpu()) for k in state)


def find_earlier(plan: StagePlan, domain: Domain, reuse: tuple[Path, ...], selected: dict[str, Network]) -> Path | None:
    """``--reuse``: the first earlier run's finished stage of this name that was made from the same data,
    settings and upstream stages (the same ``[input]``, seed and stage tables up to and including this one,
    every earlier stage holding the weights ``selected`` holds now, and the same split of the same images);
    None when no earlier run qualifies."""
    stage, config = plan.stage, plan.config
    for run_dir in reuse:
        files = RunFiles(run_dir).stage(stage.name)
        if not files.metrics.is_file():
            continue
        try:
            same = same_upstream(tomllib.loads(RunFiles(run_dir).config.read_text()), config.raw, plan.index)
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            same = False
        if not same:
            log.info("%s: not reused (its config differs in [input], the seed or stages[0..%d])", files.root,
                     plan.index)
            continue
        # the same settings are not enough: every earlier stage of this run (trained here, resumed or
        # copied) must hold the very weights that run's stages handed on (a final model where there is one),
        # or this stage was built on others
        earlier = [s.name for s in config.stages[:plan.index]]
        if not all(same_weights(selected[n], served(RunFiles(run_dir).stage(n)).model) for n in earlier):
            log.info("%s: not reused (an earlier stage of this run has other weights than that run's)", files.root)
            continue
        baseline = getattr(config, "baseline", None)
        wants_final = (len(plan.repeats) > 1 and plan.stage.first.split.final_model
                       and (baseline is None or plan.stage.name != baseline.name))
        if wants_final and served(files) == files:
            log.info("%s: not reused (it has no final model: made by an mltl before final models, or with "
                     "split.final_model = false)", files.root)
            continue
        if not _same_split(plan, domain, files.metrics, files.splits):
            log.warning("%s: not reused: its splits.csv differs from the split this run makes (the data or "
                        "the split changed)", files.root)
            continue
        return files.root
    return None


def _same_split(plan: StagePlan, domain: Domain, metrics_path: Path, splits_path: Path) -> bool:
    """The earlier stage's saved split (of its representative repeat) is the one this run makes now."""
    import json

    try:
        label = (json.loads(metrics_path.read_text()).get("protocol") or {}).get("representative")
        rep = plan.repeats[0] if len(plan.repeats) == 1 else plan.repeat(label)
        if rep is None:
            return False
        splits = plan.split(domain, plan.stage.first, rep)
        return splits_path.read_text() == splits_csv(domain.ids, domain.classes, domain.labels, splits)
    except (OSError, ValueError, UserError):
        return False
