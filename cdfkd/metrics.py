"""Accuracy, relative accuracy, the data-free proxy, the selection scores, confidence
intervals and rank correlation."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch

REFERENCE_KINDS = ("ensemble", "best_teacher", "kd_real")

#: What every finished run reports under these names: result.json, a trial's last Tune
#: result, results.csv, MLflow, the progress table and the reports' tables.
RESULT_METRICS = (
    "relative_accuracy",
    "student_accuracy",
    "validation_accuracy",
    "proxy",
    "selection_score",
    "student_params",
    "student_macs",
    "wall_seconds",
)


@torch.no_grad()
def evaluate_headers(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    loader: Iterable,
    device: torch.device,
    max_samples: int | None = None,
) -> dict:
    """Accuracy of a (H, B, C)-logit model on labelled batches.

    Returns ``{"accuracy": mean-of-headers accuracy, "header_accuracy": [per header],
    "samples": n}``; accuracies are fractions in [0, 1].
    """
    correct_mean = 0
    correct_heads: torch.Tensor | None = None
    seen = 0
    for x, y in loader:
        if max_samples is not None and seen >= max_samples:
            break
        if max_samples is not None:
            x, y = x[: max_samples - seen], y[: max_samples - seen]
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = logits_fn(x)
        if logits.dim() == 2:
            logits = logits.unsqueeze(0)
        correct_mean += (logits.mean(0).argmax(-1) == y).sum().item()
        heads = (logits.argmax(-1) == y.unsqueeze(0)).sum(1).cpu()
        correct_heads = heads if correct_heads is None else correct_heads + heads
        seen += len(y)
    if seen == 0 or correct_heads is None:
        raise ValueError("evaluation set is empty")
    return {
        "accuracy": correct_mean / seen,
        "header_accuracy": [c / seen for c in correct_heads.tolist()],
        "samples": seen,
    }


def relative_accuracy(student_accuracy: float, reference_accuracy: float) -> float:
    """Student accuracy divided by the reference accuracy (CGDD's metric).

    The reference is the teacher ensemble, the best single teacher or a
    KD-with-real-data result; callers record which one next to the value.
    """
    if reference_accuracy <= 0:
        raise ValueError(f"reference accuracy must be positive, got {reference_accuracy}")
    return student_accuracy / reference_accuracy


def reference_accuracy(
    kind: str, manifest: dict, kd_real_result: dict | None = None
) -> float | None:
    """The accuracy relative accuracy divides by, from an ensemble manifest or a kd_real result.

    None when the manifest does not record it (an ensemble saved without
    evaluation); the caller then measures it.
    """
    if kind == "ensemble":
        acc = manifest.get("ensemble_accuracy")
        return None if acc is None else float(acc)
    if kind == "best_teacher":
        accs = [t.get("test_accuracy") for t in manifest["teachers"]]
        return None if None in accs else max(float(a) for a in accs)
    if kind == "kd_real":
        if kd_real_result is None:
            raise ValueError("reference kd_real needs the result.json of a kd_real run")
        return float(kd_real_result["student_accuracy"])
    raise ValueError(f"unknown reference {kind!r}; known: {', '.join(REFERENCE_KINDS)}")


@torch.no_grad()
def agreement_proxy(
    student_fn: Callable[[torch.Tensor], torch.Tensor],
    teacher_fn: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable,
    num_classes: int,
) -> float:
    """Data-free proxy: how often the student's prediction agrees with the teachers'.

    ``batches`` yields ``(x, y)`` with ``y`` the preset labels of a conditional
    generator or ``None``. With labels, agreement is computed per preset class and
    averaged over classes (a generator that collapsed onto easy classes cannot
    inflate it); without, over all samples. Returns a fraction in [0, 1].
    """
    agree = torch.zeros(num_classes)
    count = torch.zeros(num_classes)
    for x, y in batches:
        same = (student_fn(x).argmax(-1) == teacher_fn(x).argmax(-1)).float().cpu()
        groups = y.cpu() if y is not None else torch.zeros(len(same), dtype=torch.long)
        agree.index_add_(0, groups, same)
        count.index_add_(0, groups, torch.ones_like(same))
    present = count > 0
    if not present.any():
        raise ValueError("the proxy got no samples")
    return (agree[present] / count[present]).mean().item()


#: every candidate selection score of :func:`selection_scores` (each in [0, 1], higher is
#: better); ``cdfkd.selection.SELECTION_SCORE`` names the one reported as ``selection_score``
SELECTION_CANDIDATES = (
    "agreement",
    "soft_agreement",
    "kl_similarity",
    "confidence_weighted",
    "worst_class_agreement",
    "target_accuracy",
)


@torch.no_grad()
def selection_scores(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor
) -> dict[str, float]:
    """How closely a student follows the teachers on a labelled synthetic set.

    ``student_logits`` (B, C): the student's prediction (mean over headers);
    ``teacher_logits`` (N, B, C): each teacher's; ``targets`` (B,): the classes the
    images were synthesised for. With p_s, p_t the softmax of the student's and of the
    teachers' mean logits (the ensemble the reference accuracy measures), and a_b = 1
    when argmax p_s = argmax p_t:

    - ``agreement``: mean_b a_b
    - ``soft_agreement``: mean_b sum_c min(p_s, p_t) = 1 - total variation distance
    - ``kl_similarity``: exp(-mean_b KL(p_t || p_s))
    - ``confidence_weighted``: sum_b max(p_t) a_b / sum_b max(p_t)
    - ``worst_class_agreement``: min over target classes of mean a_b within the class
    - ``target_accuracy``: mean_b [argmax p_s = target_b]

    Returns ``{name: value}`` for every name of :data:`SELECTION_CANDIDATES`, in [0, 1].
    """
    if student_logits.dim() != 2 or teacher_logits.dim() != 3:
        raise ValueError(
            f"selection_scores takes student (B, C) and teacher (N, B, C) logits, got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    s = student_logits.float().log_softmax(-1)
    t = teacher_logits.float().mean(0).log_softmax(-1)
    if s.shape != t.shape or len(targets) != len(s) or len(s) == 0:
        raise ValueError("selection_scores: student, teachers and targets disagree in size")
    ps, pt = s.exp(), t.exp()
    agree = (ps.argmax(-1) == pt.argmax(-1)).float()
    conf = pt.max(-1).values
    kl = (pt * (t - s)).sum(-1).clamp_min(0).mean()
    targets = targets.to(agree.device)
    per_class = [agree[targets == c].mean() for c in targets.unique()]
    return {
        "agreement": agree.mean().item(),
        "soft_agreement": torch.minimum(ps, pt).sum(-1).mean().item(),
        "kl_similarity": torch.exp(-kl).item(),
        "confidence_weighted": ((conf * agree).sum() / conf.sum()).item(),
        "worst_class_agreement": torch.stack(per_class).min().item(),
        "target_accuracy": (ps.argmax(-1) == targets).float().mean().item(),
    }


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion ``successes / n`` (Wilson 1927).

    Unlike the normal approximation it stays inside [0, 1] and keeps its coverage for
    small ``n`` and proportions near 0 or 1 (Brown, Cai & DasGupta 2001), which is where
    few-shot accuracies of good students are.
    """
    from scipy.stats import norm

    if n <= 0 or not 0 <= successes <= n:
        raise ValueError(
            f"wilson_interval needs 0 <= successes <= n and n > 0, got {successes}/{n}"
        )
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    z = float(norm.ppf(0.5 + confidence / 2))
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


@torch.no_grad()
def within_class_diversity(features: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean pairwise distance between L2-normalised ``features`` (B, D) of the same label,
    averaged over the labels with at least two samples; in [0, 2].

    0 means every class is one point (a collapsed conditional generator); features of
    real images of one class are far from 0. Computed on the teachers' embeddings of
    generated images, it measures what the student learns from, not pixel noise.
    """
    f = torch.nn.functional.normalize(features.flatten(1).float(), dim=1)
    per_class = []
    for c in labels.unique():
        members = f[labels == c]
        n = len(members)
        if n < 2:
            continue
        d = torch.cdist(members, members, compute_mode="donot_use_mm_for_euclid_dist")
        per_class.append(d.sum() / (n * (n - 1)))
    if not per_class:
        raise ValueError("within_class_diversity needs a label with at least two samples")
    return torch.stack(per_class).mean().item()


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman rank correlation (``scipy.stats.spearmanr``, average ranks for ties); nan for
    fewer than 3 pairs or a constant sequence."""
    from scipy.stats import spearmanr

    if len(a) != len(b):
        raise ValueError("spearman needs two sequences of equal length")
    if len(a) < 3 or len(set(a)) < 2 or len(set(b)) < 2:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def pick_regret(scores: Sequence[float], truth: Sequence[float]) -> float:
    """How much ``truth`` the pick by ``scores`` loses: max(truth) - truth[argmax(scores)].

    0 when the best-scoring run is the truly best one; ties in the score are resolved to
    the worst of the tied runs (a pessimistic pick). NaN scores are never picked.
    """
    if len(scores) != len(truth) or not scores:
        raise ValueError("pick_regret needs two non-empty sequences of equal length")
    valid = [i for i, v in enumerate(scores) if not math.isnan(v)]
    if not valid:
        return float("nan")
    top = max(scores[i] for i in valid)
    picked = min(truth[i] for i in valid if scores[i] == top)
    return max(truth) - picked


def pareto_front(points: Sequence[Sequence[float]], maximize: Sequence[bool]) -> list[bool]:
    """For each point, True when no other point is at least as good in every objective and
    better in one (``maximize[k]``: objective k is maximised, else minimised).

    The one Pareto rule of the project: the sweep's front (``cdfkd.tune``) and the
    reports' accuracy-vs-size front both call it. Points with a NaN are never on it.
    """
    signs = [1.0 if m else -1.0 for m in maximize]
    scored = [
        None
        if any(math.isnan(v) for v in p)
        else tuple(s * v for s, v in zip(signs, p, strict=True))
        for p in points
    ]

    def dominates(a: tuple, b: tuple) -> bool:
        return all(x >= y for x, y in zip(a, b, strict=True)) and a != b

    return [
        p is not None and not any(q is not None and dominates(q, p) for q in scored) for p in scored
    ]
