"""Model size and cost: parameter count and multiply-accumulates per image."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable or not; buffers such as BN statistics excluded)."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_shape: tuple[int, ...] = (1, 3, 32, 32)) -> int:
    """Multiply-accumulates of one eval-mode forward on zeros of ``input_shape`` (batch 1).

    Counted by ``torch.utils.flop_counter.FlopCounterMode`` (convolutions and matmuls;
    BN, activations and pooling are not counted), MACs = FLOPs // 2. Every module's
    train/eval mode is restored afterwards.
    """
    param = next(model.parameters(), None)
    x = torch.zeros(input_shape)
    if param is not None:
        x = x.to(param.device, param.dtype)
    modes = [(m, m.training) for m in model.modules()]  # submodules may differ (frozen BN)
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        for m, training in modes:
            m.training = training
    return counter.get_total_flops() // 2
