"""Attention transfer (Zagoruyko & Komodakis, ICLR 2017, "Paying More Attention to Attention").

The student mimics where the teacher's feature maps are active. For an
activation ``A`` of shape ``(B, C, H, W)`` the spatial attention map is

    Q(A) = mean_c |A_c|^p,  flattened over H*W,   a(A) = Q / ||Q||_2  (per sample).

Summing or averaging over channels gives the same ``a`` after normalisation.
CGDD uses this as the student's gamma term.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["attention_map", "attention_transfer"]


def _energy(feature: torch.Tensor, p: float) -> torch.Tensor:
    if feature.dim() != 4:
        raise ValueError(
            f"attention map needs a (B, C, H, W) feature map, got {tuple(feature.shape)}; "
            "pass convolutional stage outputs, not pooled embeddings"
        )
    return feature.abs().pow(p).mean(dim=1, keepdim=True)  # (B, 1, H, W)


def _normalise(energy: torch.Tensor) -> torch.Tensor:
    return F.normalize(energy.flatten(1), p=2, dim=1)


def attention_map(
    feature: torch.Tensor, p: float = 2, size: tuple[int, int] | None = None
) -> torch.Tensor:
    """The L2-normalised spatial attention map ``a(A)`` of one feature map.

    ``size``: if given, the channel-mean energy ``Q`` is resized to ``size`` by
    adaptive average pooling (area averaging) before normalising; this is how
    :func:`attention_transfer` matches maps of different resolutions.

    Shapes: ``feature (B, C, H, W)`` -> ``(B, H*W)`` (or ``(B, h*w)`` for ``size=(h, w)``),
    each row of unit L2 norm (a zero map stays zero).
    """
    energy = _energy(feature, p)
    if size is not None and tuple(energy.shape[-2:]) != tuple(size):
        energy = F.adaptive_avg_pool2d(energy, size)
    return _normalise(energy)


def attention_transfer(
    student_maps: Sequence[torch.Tensor],
    teacher_maps: Sequence[torch.Tensor],
    p: float = 2,
) -> torch.Tensor:
    """Attention-transfer loss summed over stage pairs (the code variant of the paper).

    ``L = sum_j mean_{b, i} (a(S_j)[b, i] - a(T_j)[b, i])^2``

    over the paired stages j, where i runs over spatial positions. This is the
    form of the authors' code and of ZSKT, used with a weight beta per pair
    (beta = 1000 in the AT code, 250 in ZSKT). The paper writes
    ``(beta/2) * sum_j || a(S_j) - a(T_j) ||_2`` (a norm, not a mean square);
    per sample the code variant equals ``||a(S_j) - a(T_j)||_2^2 / (H_j W_j)``,
    so the two weights are not interchangeable.

    Stage pairs are *summed* (as in ZSKT and the AT code), so adding a stage
    adds a term. Channel counts may differ between a pair. When the spatial
    sizes differ, the larger map's energy is area-pooled
    (``adaptive_avg_pool2d``) down to the smaller size before normalising:
    pooling keeps the energy's meaning and never invents detail that
    upsampling would. Teacher maps are used as given: detach them (or freeze
    the teacher) at the call site.

    Shapes: ``student_maps[j] (B, C_s_j, H_s_j, W_s_j)``,
    ``teacher_maps[j] (B, C_t_j, H_t_j, W_t_j)``. Returns ``()``.
    Raises ``ValueError`` if the lists are empty or differ in length, or if a
    pair differs in batch size.
    """
    if len(student_maps) != len(teacher_maps):
        raise ValueError(
            f"attention_transfer: {len(student_maps)} student maps vs "
            f"{len(teacher_maps)} teacher maps; pair every stage"
        )
    if len(student_maps) == 0:
        raise ValueError(
            "attention_transfer: no stage pairs given; pass at least one (student, teacher) map "
            "or skip the term when its weight is 0"
        )
    total = None
    for j, (s, t) in enumerate(zip(student_maps, teacher_maps, strict=True)):
        if s.shape[0] != t.shape[0]:
            raise ValueError(
                f"attention_transfer: pair {j} batch sizes differ, {s.shape[0]} vs {t.shape[0]}; "
                "feed student and teacher the same images"
            )
        size = (min(s.shape[-2], t.shape[-2]), min(s.shape[-1], t.shape[-1]))
        a_s = attention_map(s, p=p, size=size)
        a_t = attention_map(t, p=p, size=size)
        term = (a_s - a_t).pow(2).mean()
        total = term if total is None else total + term
    assert total is not None  # at least one pair (checked above)
    return total
