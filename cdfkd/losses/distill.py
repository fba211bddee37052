"""Student-side distillation losses on logits and features.

Every function takes tensors and returns a scalar tensor; weights are the
caller's business. Logit tensors have the class dimension last and any number
of leading dimensions (``(B, C)``, or ``(H, B, C)`` stacked over headers or
teachers); leading dimensions are flattened into rows before averaging.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "adversarial_discrepancy",
    "feature_l1",
    "kd_kl",
    "l1_logits",
    "preset_label_ce",
]


def _check_same_shape(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{what}: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}; "
            "student and teacher outputs must be paired element by element"
        )


def kd_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Hinton et al. 2015 knowledge distillation: ``T^2 * KL(softmax(t/T) || softmax(s/T))``.

    ``L = T^2 / R * sum_r sum_k p_t[r, k] (log p_t[r, k] - log p_s[r, k])`` with
    ``p = softmax(logits / T)`` and R rows ("batchmean"). The ``T^2`` keeps the
    gradient scale independent of T. T = 1 is the CDFKD (ICME/TMM) student loss.

    Shapes: ``student_logits``, ``teacher_logits``: ``(..., C)``, equal. Returns ``()``.
    """
    _check_same_shape(student_logits, teacher_logits, "kd_kl")
    if temperature <= 0:
        raise ValueError(f"kd_kl: temperature must be > 0 (1 is plain KD), got {temperature}")
    num_classes = student_logits.shape[-1]
    log_p_s = F.log_softmax(student_logits.reshape(-1, num_classes) / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.reshape(-1, num_classes) / temperature, dim=-1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
    return kl * temperature**2


def l1_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean absolute logit difference, ``mean |s - t|`` over all elements (``F.l1_loss``).

    The DFAD (Fang et al. 2019) and CDFKD-MFS (Hao et al. 2022) student loss.
    Because the mean runs over classes too, its scale shrinks with the number
    of classes. Shapes: ``(..., C)``, equal. Returns ``()``.
    """
    _check_same_shape(student_logits, teacher_logits, "l1_logits")
    return F.l1_loss(student_logits, teacher_logits)


def adversarial_discrepancy(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: str = "l1",
    temperature: float = 1.0,
) -> torch.Tensor:
    """Student-teacher disagreement that an adversarial generator *maximises*.

    The generator's loss term is the negative of this value (DFAD; CDFKD-MFS
    generator step ``-w_g * L1(s_i, t_i)``). ``kind="l1"`` is :func:`l1_logits`
    (DFAD, CDFKD-MFS); ``kind="kl"`` is :func:`kd_kl` at ``temperature`` (ZSKT,
    CDFKD-TMM, DFQ). Whether teacher logits are detached is the caller's choice.

    Shapes: ``(..., C)``, equal. Returns ``()`` (non-negative).
    """
    if kind == "l1":
        return l1_logits(student_logits, teacher_logits)
    if kind == "kl":
        return kd_kl(student_logits, teacher_logits, temperature=temperature)
    raise ValueError(f"adversarial_discrepancy: kind must be 'l1' or 'kl', got {kind!r}")


def preset_label_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy to the preset labels: ``mean_r -log softmax(logits)[r, y_r]``.

    CGDD: the label ``y`` a conditional generator was asked for is used as the
    ground truth, both for the generator (the teacher must classify G(z, y) as
    y) and for the student's CE term.

    Shapes: ``logits (..., C)``, ``labels (...)`` integer class ids. Returns ``()``.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"preset_label_ce: labels {tuple(labels.shape)} do not match "
            f"logits {tuple(logits.shape)} without the class dimension; give one class id per row"
        )
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def feature_l1(student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """CDFKD-MFS feature loss: ``mean_b sum_d |f_s[b, d] - f_t[b, d]|``.

    The absolute difference is summed over the feature dimension (last) and
    averaged over the rest, so its scale grows with D (unlike ``F.l1_loss``).
    The reference weights it 0.2 (0.05 on mini-ImageNet). The feature
    dimensions must match: there is no projector, and a mismatch is an error
    here rather than the reference's runtime crash.

    Shapes: ``(..., D)``, equal. Returns ``()``.
    """
    _check_same_shape(student_features, teacher_features, "feature_l1")
    return (student_features - teacher_features).abs().sum(dim=-1).mean()
