"""Where tensors go: the one rule that turns ``auto``/``cpu``/``cuda``/``cuda:N`` into a device."""

from __future__ import annotations

import torch

from cdfkd.errors import ConfigError


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``auto``: CUDA when it is there (device 0, or the one Ray made visible), else CPU.

    ``cuda:N`` is checked against the devices this process can see, so a typo or a
    trial placed on a CPU-only node fails here with the fix instead of deep in torch.
    """
    if isinstance(name, torch.device):
        name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device {name!r} is not auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device {name} asked for, but CUDA is not available here: use cpu or auto"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ConfigError(
                f"device {name}: this process sees {count} CUDA device(s) (cuda:0..cuda:{count - 1})"
            )
    return device
