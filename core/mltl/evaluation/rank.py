"""Transferability ranking: which trained stage is the best starting point for a target, before any training.

``mltl rank CONFIG CANDIDATE...`` scores each candidate checkpoint (a stage directory, a run directory,
or a ``model.safetensors`` file) on the training split of a stage of CONFIG (default its last stage) --
the holdout split ``mltl run`` makes with the stage's ``split`` settings -- with **LogME** (You, Liu, Wang & Long, ICML 2021): the
log marginal likelihood (evidence), per image, of a Bayesian linear model from the candidate's features to
the one-hot labels, with the prior and noise precisions (alpha, beta) set by evidence maximisation.
Higher is better. No weights are trained; the validation and test splits are not read.

When the stage is evaluated by k-fold cross-validation (``protocol = "kfold"``, or ``"auto"`` on a small
last stage), every image is a test image in some fold, so ranking reads labels that the evaluation later
tests on; the command says so. Rank with ``--set stages.NAME.split.protocol=holdout`` and keep that
protocol for the run when the choice of intermediate must stay independent of the test images.

Features are the input of the candidate's classifier (its trunk output, or its last new dense layer
``N``k when it has a head), taken in eval mode on the target images at the config's ``[input]`` size and
channels; ``features="trunk"`` takes the trunk output instead (what a stage with a new ``head`` table
inherits).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch

from ..config import Config, load_config
from ..data.datacheck import apply_duplicate_groups
from ..data.domain import prepare_images
from ..errors import UserError, did_you_mean
from ..plugins import get_registry
from ..running.plan import load_domains, plan_stage
from ..running.protocols import Repeat
from ..running.rundir import StageFiles, load_network

# ---------------------------------------------------------------- LogME


def _evidence_terms(s2: np.ndarray, z2: np.ndarray, y_out: np.ndarray, alpha: np.ndarray, beta: np.ndarray,
                    n: int, d: int) -> tuple[np.ndarray, ...]:
    """For every label column: the log evidence and the quantities of the fixed-point update.

    ``s2``: the nonzero squared singular values of F (r,); ``z2``: squared projections of each label column
    on the left singular vectors (r, C); ``y_out``: the squared norm of each column outside F's column space.
    """
    a, b = alpha[None, :], beta[None, :]
    denom = a + b * s2[:, None]  # eigenvalues of A = alpha I + beta F^T F on F's row space
    m2 = (b ** 2 * s2[:, None] * z2 / denom ** 2).sum(0)  # ||m||^2
    res2 = (a ** 2 * z2 / denom ** 2).sum(0) + y_out  # ||F m - y||^2
    gamma = (b * s2[:, None] / denom).sum(0)  # effective number of parameters
    logdet = np.log(denom).sum(0) + (d - len(s2)) * np.log(alpha)
    evidence = (n / 2 * np.log(beta) + d / 2 * np.log(alpha) - n / 2 * math.log(2 * math.pi)
                - beta / 2 * res2 - alpha / 2 * m2 - logdet / 2)
    return evidence, m2, res2, gamma


def logme(features: np.ndarray, labels: np.ndarray, *, max_iter: int = 100, tol: float = 1e-6,
          return_params: bool = False) -> float | tuple[float, np.ndarray, np.ndarray]:
    """LogME of ``features`` (n, D) for integer ``labels`` (n,): the maximised log evidence per sample of
    y_c = F w_c + noise, w_c ~ N(0, I/alpha_c), noise ~ N(0, 1/beta_c), averaged over the one-hot columns c.

    One SVD of F; then for all columns at once the fixed-point iteration
    gamma = sum_i beta s_i / (alpha + beta s_i), alpha = gamma / ||m||^2, beta = (n - gamma) / ||F m - y||^2.
    """
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels)
    if f.ndim != 2 or len(f) != len(y):
        raise ValueError(f"features {f.shape} and labels {y.shape} do not match")
    n, d = f.shape
    classes = np.unique(y)
    targets = (y[:, None] == classes[None, :]).astype(np.float64)  # one-hot (n, C)
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    keep = s > s.max(initial=0.0) * max(n, d) * np.finfo(np.float64).eps
    u, s2 = u[:, keep], s[keep] ** 2
    z = u.T @ targets
    z2 = z ** 2
    y_out = np.maximum((targets ** 2).sum(0) - z2.sum(0), 0.0)
    alpha = np.ones(len(classes))
    beta = np.ones(len(classes))
    for _ in range(max_iter):
        _, m2, res2, gamma = _evidence_terms(s2, z2, y_out, alpha, beta, n, d)
        new_alpha = gamma / np.maximum(m2, 1e-300)
        new_beta = (n - gamma) / np.maximum(res2, 1e-300)
        done = np.all(np.abs(new_alpha - alpha) <= tol * alpha) and np.all(np.abs(new_beta - beta) <= tol * beta)
        alpha, beta = new_alpha, new_beta
        if done:
            break
    evidence = _evidence_terms(s2, z2, y_out, alpha, beta, n, d)[0]
    score = float(np.mean(evidence / n))
    return (score, alpha, beta) if return_params else score


def log_evidence_direct(features: np.ndarray, target: np.ndarray, alpha: float, beta: float) -> float:
    """The log evidence log p(y | F, alpha, beta) from its definition, for tests: y ~ N(0, F F^T/alpha + I/beta)."""
    f = np.asarray(features, dtype=np.float64)
    cov = f @ f.T / alpha + np.eye(len(f)) / beta
    sign, logdet = np.linalg.slogdet(cov)
    assert sign > 0
    return float(-0.5 * (target @ np.linalg.solve(cov, target) + logdet + len(f) * math.log(2 * math.pi)))


# ---------------------------------------------------------------- candidates


@attrs.frozen
class Ranked:
    name: str  # e.g. "run/intermediate" or "run/intermediate/variants/freeze=C1"
    path: Path
    backbone: str
    feature_dim: int
    score: float


def find_candidates(paths: list[str]) -> list[tuple[str, Path]]:
    """``(label, model.safetensors)`` for each argument: a file, a stage directory (its selected model), or
    a run directory (every finished stage in it); a stage's sweep variants are added too."""
    out: list[tuple[str, Path]] = []
    for arg in paths:
        p = Path(arg)
        if p.is_file():
            out.append((str(p), p))
            continue
        if not p.is_dir():
            raise UserError(f"mltl rank: {arg} is neither a model.safetensors file nor a run or stage directory")
        stages = [StageFiles(p)] if StageFiles(p).model.is_file() else [
            StageFiles(d) for d in sorted(p.iterdir()) if d.is_dir() and StageFiles(d).model.is_file()]
        if not stages:
            raise UserError(f"mltl rank: {arg} holds no {StageFiles.MODEL} (a finished stage, or a run directory "
                            f"with finished stages)")
        for stage in stages:
            out.append((str(stage.root), stage.model))
            selected = stage.model.read_bytes()
            for v in stage.variants():
                # every variant but the selected one (whose weights the stage directory already holds)
                if v.model.is_file() and v.model.read_bytes() != selected:
                    out.append((str(v.root), v.model))
    return out


@torch.inference_mode()
def extract_features(net, x: torch.Tensor, inp, *, features: str = "classifier-input",
                     batch_size: int = 256) -> np.ndarray:
    """The input of ``net``'s classifier (or its trunk output) for uint8 images ``x``, in eval mode."""
    from ..training.train import normalise

    net.eval()
    outs = []
    for chunk in x.split(batch_size):
        h = net.trunk(normalise(chunk, inp))
        if features == "classifier-input":
            h = net.head[:-1](h)
        outs.append(h.float().flatten(1).cpu())
    return torch.cat(outs).double().numpy()


def training_split(config: Config, stage: str | None = None) -> tuple[Any, Any, np.ndarray, str]:
    """The images ``mltl rank`` scores on: the training split the run itself makes of ``stage`` (default the
    last), from its own domain with near-duplicate groups merged where the config asks (:mod:`mltl.running.plan`):
    the holdout (or ``split.file``) training split, or fold 1's under k-fold. Returns the stage, its domain,
    the indices and the stage's protocol."""
    names = [s.name for s in config.stages]
    index = len(config.stages) - 1 if stage is None else next((i for i, s in enumerate(config.stages)
                                                                if s.name == stage), None)
    if index is None:
        raise UserError(f'mltl rank: {config.source} has no stage "{stage}"{did_you_mean(stage, names)}')
    target = config.stages[index]
    single = attrs.evolve(config, stages=(target,))
    domain = next(iter(apply_duplicate_groups(single, load_domains(single, get_registry())).values()))
    plan = plan_stage(config, index, domain)
    rep = plan.repeats[0] if plan.protocol == "kfold" else Repeat(label="")
    return target, domain, plan.split(domain, target.first, rep)["train"], plan.protocol


def rank(config, candidates: list[str], *, stage: str | None = None, device: str = "cpu",
         features: str = "classifier-input") -> tuple[list[Ranked], dict[str, Any]]:
    """Score each candidate on the training split of ``stage`` (default the last) of ``config``; best first.

    Returns the ranking and a description of the data (stage, domain, images, classes)."""
    if features not in ("classifier-input", "trunk"):
        raise UserError(f'mltl rank: --features must be "classifier-input" or "trunk", not "{features}"')
    if not isinstance(config, Config):
        config = load_config(config)
    target, domain, idx, protocol = training_split(config, stage)
    cfg = target.first
    registry = get_registry()
    dev = torch.device(device)
    x = prepare_images(domain.images[idx], size=config.input.size, channels=config.input.channels).to(dev)
    y = domain.labels[idx]
    found = find_candidates(candidates)
    rows = []
    for label, path in found:
        net = load_network(path, registry)
        spec = net.spec
        if (spec["in_chans"], spec["image_size"]) != (config.input.channels, config.input.size):
            raise UserError(f"mltl rank: {path} was trained on {spec['in_chans']}-channel {spec['image_size']} px "
                            f"images, the config's [input] is {config.input.channels} channels, "
                            f"{config.input.size} px; rank candidates of the same chain")
        f = extract_features(net.to(dev), x, config.input, features=features)
        rows.append(Ranked(name=label, path=path, backbone=spec["backbone"], feature_dim=f.shape[1],
                           score=logme(f, y)))
    rows.sort(key=lambda r: -r.score)
    info = {"stage": target.name, "domain": cfg.domain.plugin, "images": int(len(idx)),
            "classes": list(domain.classes), "features": features,
            "split": "train (fold 1)" if protocol == "kfold" else "train (holdout)",
            "protocol": protocol}
    return rows, info


def ranking_json(rows: list[Ranked], info: dict[str, Any]) -> str:
    return json.dumps({**info, "metric": "LogME (log evidence per image, higher is better)",
                       "ranking": [{"rank": i + 1, "candidate": r.name, "backbone": r.backbone,
                                    "feature_dim": r.feature_dim, "logme": r.score}
                                   for i, r in enumerate(rows)]}, indent=2) + "\n"
