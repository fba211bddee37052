"""The student as a program for serving: a header-averaging wrapper and ``torch.export``.

The served prediction is the one cdfkd evaluates: (B, C, H, W) images -> (B, C) logits,
the mean over headers for multi-header students (whose own forward returns (H, B, C)).
Programs are saved with ``torch.export`` (no pickle, so loading runs no code from the
artifact store) with a **dynamic batch dimension**: the example batch has two images,
because ``torch.export`` fixes a dimension of size 1.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from torch import nn


class ServingStudent(nn.Module):
    """A student for serving: (B, C, H, W) images -> (B, C) logits, averaged over headers."""

    def __init__(self, student: nn.Module) -> None:
        super().__init__()
        self.student = student

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.student(x)
        return logits.mean(0) if logits.dim() == 3 else logits


def serving_module(student: nn.Module) -> nn.Module:
    """A CPU, eval-mode copy of ``student`` in ``ServingStudent`` (the trained one is untouched)."""
    if isinstance(student, ServingStudent):
        student = student.student
    return ServingStudent(copy.deepcopy(student).to("cpu").eval()).eval()


def example_batch(images: torch.Tensor) -> np.ndarray:
    """Two float32 images (2, C, H, W): a batch of 1 would freeze the exported batch size."""
    x = images.detach().to("cpu", torch.float32)
    if x.dim() != 4:
        raise ValueError(f"input example must be a (B, C, H, W) batch, got shape {tuple(x.shape)}")
    return x[:1].repeat(2, 1, 1, 1).numpy() if x.shape[0] < 2 else x[:2].contiguous().numpy()


def save_program(module: nn.Module, example: np.ndarray, program: Path, example_path: Path) -> None:
    """``torch.export`` ``module`` with a dynamic batch to ``program``; the example as .npy."""
    from torch.export import Dim

    ep = torch.export.export(module, (torch.from_numpy(example),), dynamic_shapes=({0: Dim.AUTO},))
    torch.export.save(ep, str(program))
    np.save(example_path, example)


def load_program(program: Path, example_path: Path) -> tuple[nn.Module, np.ndarray]:
    return torch.export.load(str(program)).module(), np.load(example_path)
