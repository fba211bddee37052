"""Choosing among students without labelled data: the synthetic validation set and ``selection_score``.

**The validation set** is built once per teacher ensemble, from the teachers alone, and
stored in the ensemble folder (``cdfkd.teachers.validation``). Every trial and every
method is scored on the same images, so scores compare across methods and generators
(the older ``proxy`` scores each student on its *own* generator's images, which a
collapsed generator makes easy). The images are synthesised DeepInversion-style (Yin et
al., CVPR 2020): a batch of pixels ``x`` is optimised directly, with class-balanced
targets ``y`` (``per_class`` images of every class), to minimise

    L(x) = (1/N) sum_i CE(t_i(J(x)), y)                            every teacher sees y
         + w_bn  (1/N) sum_i sum_l s_l (||rv_il - var_il||_2 + ||rm_il - mean_il||_2)
         + w_tv  TV(J(x)) + w_l2 mean(x^2)
         + w_div (1/N) sum_i mean_{j != k, y_j = y_k} cos(e_ij, e_ik)   diversity

with ``J`` a random shift of up to ``jitter`` pixels each step, ``t_i``/``e_i`` teacher i's
logits and embedding, and the BN-statistics prior of ``cdfkd.losses.bn_statistics``.
With ``soft_fraction`` > 0 that share of the images gets a two-class target (weight
``u ~ U(0.2, 0.5)`` on a second random class) instead of a one-hot one: images near a
decision boundary (in the spirit of Nayak et al.'s data impressions, ICML 2019).

**selection_score** is one of :data:`cdfkd.metrics.SELECTION_CANDIDATES` computed on that
set (:func:`score_student`); :data:`SELECTION_SCORE` names which, chosen by measurement
(``benchmarks/selection.py``, BENCHMARKS.md).

**With M labelled samples per class** (``aggregation.few_shot``), :func:`few_shot_estimate`
gives the student's accuracy on them with a Wilson confidence interval.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import Field

from cdfkd.bn_hooks import BNStatsRecorder
from cdfkd.data import class_balanced_subset
from cdfkd.losses import bn_statistics, first_layer_rescale, total_variation
from cdfkd.losses.diversity import within_class_similarity
from cdfkd.metrics import SELECTION_CANDIDATES, selection_scores, wilson_interval
from cdfkd.schema import Strict
from cdfkd.teachers import TeacherEnsemble, load_ensemble
from cdfkd.teachers.validation import (
    ValidationSet,
    ValidationSetError,
    read_validation_set,
    rebuild_hint,
    validation_lock,
    validation_set_problem,
    write_validation_set,
)

__all__ = [
    "SELECTION_SCORE",
    "ValidationSet",
    "ValidationSetConfig",
    "ValidationSetError",
    "build_validation_set",
    "ensure_validation_set",
    "few_shot_estimate",
    "score_student",
    "validation_set_status",
]

log = logging.getLogger(__name__)

#: the candidate reported as ``selection_score``: chosen on the digits quality runs (soft
#: agreement, KL similarity and worst-class agreement ranked them equally well within
#: bootstrap noise; soft agreement has no ties and varied least with how the set is built),
#: then checked on a held-out Fashion-MNIST sweep (BENCHMARKS.md, "Choosing without labels")
SELECTION_SCORE = "soft_agreement"
assert SELECTION_SCORE in SELECTION_CANDIDATES

#: ``progress(iteration, iterations, loss)`` while the set is synthesised
BuildProgress = Callable[[int, int, float], None]


class ValidationSetConfig(Strict):
    """How the synthetic validation set is built (defaults: measured, BENCHMARKS.md)."""

    per_class: int = Field(50, ge=1, le=10_000, description="images per class")
    iterations: int = Field(200, ge=1, le=100_000, description="optimiser steps per batch")
    batch_size: int = Field(500, ge=2, description="images optimised together (BN statistics)")
    lr: float = Field(0.1, gt=0.0, le=10.0, description="Adam learning rate on the pixels")
    w_bn: float = Field(1.0, ge=0.0, le=1000.0, description="BN-statistics prior weight")
    bn_first_rescale: float = Field(1.0, gt=0.0, le=100.0, description="first BN layer weight")
    w_tv: float = Field(1e-2, ge=0.0, le=100.0, description="total variation (mean squared)")
    w_l2: float = Field(1e-4, ge=0.0, le=100.0, description="mean squared pixel value")
    w_div: float = Field(1.0, ge=0.0, le=100.0, description="within-class embedding similarity")
    jitter: int = Field(2, ge=0, le=64, description="random shift in pixels per step")
    soft_fraction: float = Field(0.0, ge=0.0, le=1.0, description="share of two-class targets")
    seed: int = 0


# ----------------------------------------------------------------------------- building


def _targets(cfg: ValidationSetConfig, num_classes: int, rng: torch.Generator):
    """Class-interleaved primary targets (B,) and target distributions (B, C)."""
    y = torch.arange(num_classes).repeat(cfg.per_class)  # 0..C-1, 0..C-1, ...: chunks stay balanced
    dist = F.one_hot(y, num_classes).float()
    if cfg.soft_fraction > 0 and num_classes > 1:
        soft = torch.rand(len(y), generator=rng) < cfg.soft_fraction
        other = (y + torch.randint(1, num_classes, (len(y),), generator=rng)) % num_classes
        weight = 0.2 + 0.3 * torch.rand(len(y), generator=rng)
        rows = soft.nonzero().squeeze(1)
        dist[rows, y[rows]] = 1 - weight[rows]
        dist[rows, other[rows]] = weight[rows]
    return y, dist


def _synthesise(
    teachers: TeacherEnsemble,
    x: torch.Tensor,
    y: torch.Tensor,
    dist: torch.Tensor,
    cfg: ValidationSetConfig,
    rng: torch.Generator,
    report: Callable[[int, float], None],
) -> torch.Tensor:
    layers = [bn for per_teacher in teachers.bn_layers() for _, bn in per_teacher]
    rescale = [
        s
        for per_teacher in teachers.bn_layers()
        for s in first_layer_rescale(len(per_teacher), cfg.bn_first_rescale)
    ]
    use_bn = cfg.w_bn > 0 and bool(layers)
    n = teachers.num_teachers
    x = x.clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=cfg.lr, betas=(0.5, 0.9))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.iterations)
    for it in range(cfg.iterations):
        dx, dy = (torch.randint(-cfg.jitter, cfg.jitter + 1, (2,), generator=rng)).tolist()
        xj = torch.roll(x, shifts=(dx, dy), dims=(2, 3)) if cfg.jitter else x
        if use_bn:
            with BNStatsRecorder(layers) as rec:
                out = teachers(xj, return_features=True)
                bn = bn_statistics(*rec.statistics(), rescale=rescale) / n
        else:
            out = teachers(xj, return_features=True)
            bn = xj.sum() * 0.0
        logp = out.logits.float().log_softmax(-1)  # (N, B, C)
        ce = -(logp * dist.unsqueeze(0)).sum(-1).mean()
        loss = ce + cfg.w_bn * bn + cfg.w_tv * total_variation(xj, reduction="mean")
        loss = loss + cfg.w_l2 * x.pow(2).mean()
        if cfg.w_div > 0:
            div = torch.stack([within_class_similarity(e, y) for e in out.embedding]).mean()
            loss = loss + cfg.w_div * div
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        report(it + 1, loss.item() if (it + 1) % 20 == 0 or it + 1 == cfg.iterations else math.nan)
    return x.detach()


def build_validation_set(
    teachers: TeacherEnsemble,
    cfg: ValidationSetConfig | None = None,
    progress: BuildProgress | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Synthesise the set from ``teachers`` alone (see the module docstring).

    Returns ``(images (B, C, H, W), targets (B,), teacher_logits (N, B, C), cpu_seconds)``
    on the CPU, B = ``per_class`` x classes, in batches of ``batch_size`` images. The
    global RNG is left alone: the set depends on ``cfg.seed`` only.
    """
    cfg = cfg or ValidationSetConfig()
    cpu0 = time.process_time()
    info = teachers.info
    device = next(teachers.parameters()).device
    rng = torch.Generator().manual_seed(cfg.seed)
    y, dist = _targets(cfg, info.num_classes, rng)
    shape = (info.channels, info.image_size, info.image_size)
    images = []
    chunks = list(range(0, len(y), cfg.batch_size))
    total = len(chunks) * cfg.iterations
    for k, start in enumerate(chunks):
        sl = slice(start, start + cfg.batch_size)
        x0 = torch.randn(len(y[sl]), *shape, generator=rng)

        def report(it: int, loss: float, done: int = k * cfg.iterations) -> None:
            if progress is not None and not math.isnan(loss):
                progress(done + it, total, loss)

        images.append(
            _synthesise(
                teachers,
                x0.to(device),
                y[sl].to(device),
                dist[sl].to(device),
                cfg,
                rng,
                report,
            ).cpu()
        )
    x = torch.cat(images)
    with torch.no_grad():
        logits = torch.cat(
            [teachers(x[i : i + 256].to(device)).float().cpu() for i in range(0, len(x), 256)],
            dim=1,
        )
    return x, y, logits, time.process_time() - cpu0


def ensure_validation_set(
    path: str | Path,
    teachers: TeacherEnsemble | None = None,
    cfg: ValidationSetConfig | None = None,
    *,
    rebuild: bool = False,
    device: torch.device | str = "cpu",
    progress: Callable[[str], None] | None = None,
    build_progress: BuildProgress | None = None,
) -> ValidationSet:
    """The ensemble folder's validation set: read (hash verified) when it is there, else
    built from the teachers (``teachers``, or loaded from ``path``) and stored there.

    A set whose file was altered or that was built from other teachers is refused with the
    fix (``rebuild=True``, ``cdfkd teachers validation-set DIR --rebuild``). A folder that
    cannot be written gets a set built in memory, with a warning through ``progress``.
    Concurrent callers on one folder build it once (a file lock). ``cfg`` only matters
    when the set is built.
    """
    path = Path(path)
    say = progress or (lambda line: log.info("%s", line))
    cfg = cfg or ValidationSetConfig()
    if not rebuild:
        vs = read_validation_set(path)  # refuses an altered or stale set, with the fix
        if vs is not None:
            return vs
    if not os.access(path, os.W_OK):
        say(f"{path} is not writable: its validation set is built in memory only (not cached)")
        teachers = teachers if teachers is not None else load_ensemble(path, device, mode="loop")
        x, y, logits, cpu = build_validation_set(teachers, cfg, build_progress)
        return ValidationSet(x, y, logits, entry={"build": cfg.model_dump(), "cpu_seconds": cpu})
    with validation_lock(path):
        if not rebuild:  # another process may have built it while this one waited
            vs = read_validation_set(path)
            if vs is not None:
                return vs
        if teachers is None:
            teachers = load_ensemble(path, device, mode="loop")
        say(
            f"building the validation set of {path}: {cfg.per_class * teachers.info.num_classes} "
            f"images ({cfg.per_class} per class) synthesised from its {teachers.num_teachers} "
            f"teachers in {cfg.iterations} steps (once: it is cached in the folder)"
        )
        x, y, logits, cpu = build_validation_set(teachers, cfg, build_progress)
        vs = write_validation_set(path, x, y, logits, cfg.model_dump(), cpu)
    agree = (logits.mean(0).argmax(-1) == y).float().mean().item()
    say(
        f"validation set written to {path / vs.entry['file']} in {cpu:.0f} CPU-s (the "
        f"teachers predict its target class for {100 * agree:.1f} % of the images)"
    )
    return vs


def validation_set_status(path: str | Path) -> str | None:
    """None when the folder's validation set is usable; else why not, with the fix."""
    problem = validation_set_problem(path)
    return None if problem is None else f"{problem}: {rebuild_hint(path)}"


# ----------------------------------------------------------------------------- scoring


@torch.no_grad()
def score_student(
    predict: Callable[[torch.Tensor], torch.Tensor],
    vs: ValidationSet,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
) -> dict[str, float]:
    """Every candidate score of ``predict`` (images -> logits (B, C)) on the set:
    ``{name: value}`` for :data:`cdfkd.metrics.SELECTION_CANDIDATES`; the reported
    ``selection_score`` is ``scores[SELECTION_SCORE]``."""
    logits = torch.cat(
        [
            predict(vs.images[i : i + batch_size].to(device)).float().cpu()
            for i in range(0, len(vs.images), batch_size)
        ]
    )
    return selection_scores(logits, vs.teacher_logits, vs.targets)


@torch.no_grad()
def few_shot_estimate(
    predict: Callable[[torch.Tensor], torch.Tensor],
    dataset: torch.utils.data.Dataset,
    per_class: int,
    *,
    seed: int = 0,
    confidence: float = 0.95,
    device: torch.device | str = "cpu",
) -> dict:
    """The student's accuracy on ``per_class`` labelled samples of every class of ``dataset``
    (``class_balanced_subset(dataset, per_class, seed)``: the aggregation's few-shot data),
    with its Wilson interval.

    Returns ``{"per_class", "samples", "correct", "accuracy", "low", "high", "confidence"}``.
    """
    subset = class_balanced_subset(dataset, per_class, seed=seed)
    loader = torch.utils.data.DataLoader(subset, batch_size=256, shuffle=False)
    correct = seen = 0
    for x, y in loader:
        correct += int((predict(x.to(device)).argmax(-1).cpu() == y).sum())
        seen += len(y)
    low, high = wilson_interval(correct, seen, confidence)
    return {
        "per_class": per_class,
        "samples": seen,
        "correct": correct,
        "accuracy": correct / seen,
        "low": low,
        "high": high,
        "confidence": confidence,
    }
