"""Which student stage mimics which teacher stage, and the attention-transfer term over them.

CGDD's student mimics the teachers' spatial attention maps (Zagoruyko &
Komodakis 2017) at matching stages. A pair ``(s, t)`` means "student stage s
mimics teacher stage t"; indices count from 0 over the model's stages and may
be negative (from the end, as in Python), which names "the last stage" of
teachers with different depths. Maps of different sizes are matched by
:func:`cdfkd.losses.attention_transfer` (area pooling to the smaller size).

Headers and teachers are paired as the KD targets are
(:func:`cdfkd.methods.base.teacher_targets`): with H == N headers, header i
mimics teacher i; with one header, it mimics every teacher and the terms are
averaged over teachers.
"""

from __future__ import annotations

import torch

from cdfkd.losses import attention_transfer

__all__ = [
    "default_stage_pairs",
    "ensemble_attention_transfer",
    "probe_stage_shapes",
    "validate_stage_pairs",
]

StageShapes = list[list[tuple[int, ...]]]  # per header / per teacher: (C, H, W) of each stage


@torch.no_grad()
def probe_stage_shapes(
    student, teachers, channels: int, image_size: int, device
) -> tuple[StageShapes, StageShapes]:
    """Stage map shapes ``(C, H, W)`` per student header and per teacher, from one zero image.

    The student runs in eval mode for the probe (its BN running statistics are
    not touched) and gets its previous mode back; nothing random is drawn.
    """
    x = torch.zeros(1, channels, image_size, image_size, device=device)
    was_training = student.training
    student.eval()
    try:
        s_out = student(x, return_features=True)
    finally:
        student.train(was_training)
    t_out = teachers(x, return_features=True)
    s_stages = s_out.stages if s_out.logits.dim() == 3 else [s_out.stages]
    return (
        [[tuple(m.shape[1:]) for m in header] for header in s_stages],
        [[tuple(m.shape[1:]) for m in teacher] for teacher in t_out.stages],
    )


def validate_stage_pairs(
    pairs: list[tuple[int, int]], student_shapes: StageShapes, teacher_shapes: StageShapes
) -> list[tuple[int, int]]:
    """Check each index against every header and teacher; ``ValueError`` names the valid range."""
    if not pairs:
        raise ValueError(
            "at_stages is empty: list [student_stage, teacher_stage] pairs, or set gamma=0"
        )
    n_s = min(len(h) for h in student_shapes)
    n_t = min(len(t) for t in teacher_shapes)
    for s, t in pairs:
        if not -n_s <= s < n_s:
            raise ValueError(
                f"at_stages pair [{s}, {t}]: student stage {s} does not exist; the student has "
                f"{n_s} stages per header (valid: {-n_s}..{n_s - 1})"
            )
        if not -n_t <= t < n_t:
            raise ValueError(
                f"at_stages pair [{s}, {t}]: teacher stage {t} does not exist; the shallowest "
                f"teacher has {n_t} stages (valid: {-n_t}..{n_t - 1})"
            )
    return [(int(s), int(t)) for s, t in pairs]


def default_stage_pairs(
    student_shapes: StageShapes, teacher_shapes: StageShapes
) -> list[tuple[int, int]]:
    """The last k stages of both, k = min(stage counts), less pairs with a 1x1 map.

    A 1x1 map's normalised attention is the constant 1, so its term is always
    zero (LeNet-5's last stage at 32 px). Returns negative indices (from the
    end); possibly empty (then attention transfer has nothing to compare).
    """
    k = min(min(len(h) for h in student_shapes), min(len(t) for t in teacher_shapes))
    pairs = []
    for j in range(-k, 0):
        maps = [h[j] for h in student_shapes] + [t[j] for t in teacher_shapes]
        if all(shape[-2] * shape[-1] > 1 for shape in maps):
            pairs.append((j, j))
    return pairs


def ensemble_attention_transfer(
    student_stages: list[list[torch.Tensor]],
    teacher_stages: list[list[torch.Tensor]],
    pairs: list[tuple[int, int]],
) -> torch.Tensor:
    """Attention transfer summed over ``pairs``, averaged over (header, teacher) matches.

    ``student_stages``: one list of maps per header (H lists); ``teacher_stages``:
    one per teacher (N lists). H == N: header i vs teacher i; H == 1: the header
    vs each teacher. Returns ``()``.
    """
    h, n = len(student_stages), len(teacher_stages)
    if h == n:
        matches = [(i, i) for i in range(n)]
    elif h == 1:
        matches = [(0, i) for i in range(n)]
    else:
        raise ValueError(
            f"attention transfer: {h} headers cannot be matched to {n} teachers (need 1 or {n})"
        )
    terms = [
        attention_transfer(
            [student_stages[a][s] for s, _ in pairs], [teacher_stages[b][t] for _, t in pairs]
        )
        for a, b in matches
    ]
    return torch.stack(terms).mean()
