"""Generator-side priors: what makes synthetic images look like the teacher's data.

DAFL (Chen et al. 2019, "Data-Free Learning of Student Networks") trains its
generator with ``oh * one_hot + ie * information_entropy + a * activation``;
DeepInversion (Yin et al. 2020) adds an image smoothness prior,
:func:`total_variation`. All return scalar tensors.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["activation", "information_entropy", "one_hot", "total_variation"]


def information_entropy(teacher_logits: torch.Tensor) -> torch.Tensor:
    """Negative entropy of the mean teacher prediction: ``sum_k p_bar_k ln p_bar_k``.

    ``p_bar = mean_r softmax(logits[r])`` over every leading row: over the batch
    for ``(B, C)``, and over teachers *and* batch for ``(N, B, C)``, i.e. the
    class balance of the ensemble's averaged probabilities. Minimising it
    maximises the entropy of ``p_bar``, which pushes a generated batch towards
    equal class frequencies (DAFL). The value lies in ``[-ln C, 0]``.

    Variants: the ICME CDFKD code uses log10 (divide this by ``ln 10``) and
    averages per-teacher values (call once per teacher and average); FDF uses
    the natural log as here. ``log p_bar`` is computed with a log-sum-exp, so a
    class with vanishing mass gives no NaN gradient.

    Shapes: ``(B, C)`` or ``(N, B, C)``. Returns ``()``.
    """
    if teacher_logits.dim() not in (2, 3):
        raise ValueError(
            f"information_entropy: expected logits (B, C) or (N, B, C), "
            f"got {tuple(teacher_logits.shape)}"
        )
    rows = teacher_logits.reshape(-1, teacher_logits.shape[-1])
    log_p = F.log_softmax(rows, dim=-1)
    log_p_bar = torch.logsumexp(log_p, dim=0) - math.log(rows.shape[0])
    return (log_p_bar.exp() * log_p_bar).sum()


def one_hot(teacher_logits: torch.Tensor) -> torch.Tensor:
    """DAFL one-hot loss ``CE(t, argmax t)``: rewards confident teacher predictions.

    The pseudo label is the teacher's own argmax (no gradient through it).
    Shapes: ``(..., C)``; leading dimensions are rows (so ``(N, B, C)`` gives the
    mean over teachers of the per-teacher loss). Returns ``()``.
    """
    rows = teacher_logits.reshape(-1, teacher_logits.shape[-1])
    return F.cross_entropy(rows, rows.argmax(dim=-1))


def activation(features: torch.Tensor) -> torch.Tensor:
    """DAFL activation loss ``-mean |f|``: rewards large teacher feature magnitudes.

    ``features`` are usually the teacher's pooled penultimate features.
    Shapes: any. Returns ``()``.
    """
    return -features.abs().mean()


def total_variation(images: torch.Tensor, reduction: str = "norm") -> torch.Tensor:
    """L2 total variation over the 4 neighbour directions (DeepInversion's ``TV_L2``).

    With ``d_1 .. d_4`` the differences between each pixel and its right, lower,
    lower-left and lower-right neighbours (all channels, all images):

    - ``reduction="norm"`` (DeepInversion, whose weights 1e-3/1e-4 assume it):
      ``sum_j ||d_j||_2``, Frobenius norms over the whole batch, so the value
      grows with sqrt(batch size);
    - ``reduction="mean"``: ``sum_j mean(d_j^2)``, independent of batch and image size.

    Shapes: ``images (B, C, H, W)`` with ``H, W >= 2``. Returns ``()``.
    """
    if images.dim() != 4 or images.shape[-1] < 2 or images.shape[-2] < 2:
        raise ValueError(
            f"total_variation: expected images (B, C, H>=2, W>=2), got {tuple(images.shape)}"
        )
    diffs = (
        images[..., :, :-1] - images[..., :, 1:],
        images[..., :-1, :] - images[..., 1:, :],
        images[..., 1:, :-1] - images[..., :-1, 1:],
        images[..., :-1, :-1] - images[..., 1:, 1:],
    )
    if reduction == "norm":
        return torch.stack([torch.linalg.vector_norm(d) for d in diffs]).sum()
    if reduction == "mean":
        return torch.stack([d.pow(2).mean() for d in diffs]).sum()
    raise ValueError(f"total_variation: reduction must be 'norm' or 'mean', got {reduction!r}")
