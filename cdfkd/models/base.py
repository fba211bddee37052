"""The contract every zoo model and multi-header student follows.

A model is a sequence of named stages (each ends where a feature map is worth
exposing: attention transfer and feature losses read them), a pooling part
that turns the last stage into an embedding, and a linear classifier.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from cdfkd.registry import Registry

MODELS: Registry = Registry("model")


class FeatureOutput(NamedTuple):
    """What ``forward(x, return_features=True)`` returns.

    Single-header models:  logits (B, C); stages: list of (B, C_k, H_k, W_k); embedding (B, D).
    Multi-header students and teacher ensembles: logits (H, B, C) stacked over
    headers (or teachers); stages: one list of maps per header; embedding: one
    (B, D_h) tensor per header (a list, since teachers may differ in D).
    """

    logits: torch.Tensor
    stages: list
    embedding: torch.Tensor | list[torch.Tensor]


class StagedClassifier(nn.Module):
    """``stages`` (ordered, named) -> ``pool`` (-> ``feature_dim`` embedding) -> ``classifier``."""

    def __init__(
        self,
        stages: list[tuple[str, nn.Module]],
        pool: nn.Module,
        feature_dim: int,
        num_classes: int,
    ) -> None:
        super().__init__()
        self.stages = nn.ModuleDict(dict(stages))
        self.pool = pool
        self.classifier = nn.Linear(feature_dim, num_classes)
        self.feature_dim = feature_dim
        self.num_classes = num_classes

    @property
    def stage_names(self) -> list[str]:
        return list(self.stages.keys())

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps = []
        for stage in self.stages.values():
            x = stage(x)
            maps.append(x)
        return maps

    def forward(self, x: torch.Tensor, return_features: bool = False):
        maps = self.forward_stages(x)
        embedding = self.pool(maps[-1])
        logits = self.classifier(embedding)
        if return_features:
            return FeatureOutput(logits, maps, embedding)
        return logits

    # Leading stages that only prepare the input (a stem): multi-header students
    # do not fuse from them. Zoo families override this.
    stem_stages: int = 0

    def bn_layers(self) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
        """Every BatchNorm layer in forward order (BN-statistics hooks attach here)."""
        return bn_layers(self)


def bn_layers(module: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """Every BatchNorm layer of ``module`` in registration (= forward) order, with its name."""
    return [
        (name, m)
        for name, m in module.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]


def init_weights(module: nn.Module) -> None:
    """Kaiming-normal (fan_out) convolutions, BN at identity: the usual ResNet recipe."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def register_model(name: str, *, image_sizes: tuple[int, int]) -> Callable:
    """Register ``fn(num_classes, in_channels, image_size, widths=None)`` as zoo model ``name``.

    The registered builder first validates its inputs (``ValueError`` naming the valid
    range) and exposes ``image_sizes`` (inclusive min, max square side in pixels).
    ``widths`` overrides the per-stage output channels (multi-header students use it
    to build narrower private copies of stages).
    """
    lo, hi = image_sizes

    def decorator(fn: Callable[..., StagedClassifier]) -> Callable[..., StagedClassifier]:
        @functools.wraps(fn)
        def build(num_classes: int, in_channels: int, image_size: int, **kw) -> StagedClassifier:
            if not lo <= image_size <= hi:
                raise ValueError(
                    f"image_size={image_size} is out of range for {name} (valid: {lo}..{hi})"
                )
            if in_channels < 1:
                raise ValueError(f"in_channels={in_channels} must be >= 1 for {name}")
            if num_classes < 1:
                raise ValueError(f"num_classes={num_classes} must be >= 1 for {name}")
            return fn(num_classes, in_channels, image_size, **kw)

        build.image_sizes = image_sizes  # type: ignore[attr-defined]  # read by the zoo's tests
        MODELS.register(name)(build)
        return build

    return decorator


class GlobalPool(nn.Module):
    """Adaptive average pooling to 1x1, flattened: (B, C, H, W) -> (B, C)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
