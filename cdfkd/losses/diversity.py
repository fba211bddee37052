"""Within-class similarity of features: a diversity term for synthesised images."""

from __future__ import annotations

import torch

__all__ = ["within_class_similarity"]


def within_class_similarity(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity between the features of distinct samples of the same label.

    ``mean_{i != j, y_i = y_j} cos(f_i, f_j)`` over every such pair of ``features``
    (B, D) and ``labels`` (B,); minimising it spreads each class's samples apart (the
    diversity term of synthesis from teachers, in the spirit of DeepInversion's
    competition and CMI's contrastive term, without a second network). 0 when no label
    has two samples. Returns ``()`` with a graph to ``features``.
    """
    if features.dim() != 2 or labels.shape != features.shape[:1]:
        raise ValueError(
            f"within_class_similarity: expected features (B, D) and labels (B,), got "
            f"{tuple(features.shape)} and {tuple(labels.shape)}"
        )
    f = torch.nn.functional.normalize(features.float(), dim=1)
    same = labels.unsqueeze(0) == labels.unsqueeze(1)
    same.fill_diagonal_(False)
    pairs = same.sum()
    if pairs == 0:
        return features.sum() * 0.0
    return (f @ f.T)[same].sum() / pairs
