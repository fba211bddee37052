"""Wide ResNets (Zagoruyko & Komodakis, 2016), the pre-activation variant used by ZSKT / CDFKD-MFS.

WRN-d-k: a 3x3 stem conv to 16 channels, then three groups of (d - 4) / 6 pre-activation
blocks of 16k / 32k / 64k channels with strides 1 / 2 / 2. At 32 px the group maps are
32 / 16 / 8 px. The network's final BN + ReLU sits inside the last stage, so that
stage's map is the activated one the classifier pools.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from cdfkd.models.base import GlobalPool, StagedClassifier, init_weights, register_model


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3, plus identity or a 1x1 projection of the activated input."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(act))))
        # As in the reference WRN: a projection reads the activated input, identity the raw one.
        return out + (x if self.shortcut is None else self.shortcut(act))


def _group(c_in: int, c_out: int, blocks: int, stride: int) -> list[nn.Module]:
    return [
        PreActBlock(c_in if i == 0 else c_out, c_out, stride if i == 0 else 1)
        for i in range(blocks)
    ]


class WideResNet(StagedClassifier):
    """Stages stem (conv), block1, block2, block3 (+ final BN-ReLU); ``widths`` per stage."""

    stem_stages = 1

    def __init__(
        self, num_classes: int, in_channels: int, depth: int, widths: Sequence[int]
    ) -> None:
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n + 4, got {depth}")
        n = (depth - 4) // 6
        c0, c1, c2, c3 = widths
        stages = [
            ("stem", nn.Conv2d(in_channels, c0, 3, padding=1, bias=False)),
            ("block1", nn.Sequential(*_group(c0, c1, n, 1))),
            ("block2", nn.Sequential(*_group(c1, c2, n, 2))),
            (
                "block3",
                nn.Sequential(*_group(c2, c3, n, 2), nn.BatchNorm2d(c3), nn.ReLU(inplace=True)),
            ),
        ]
        super().__init__(stages, GlobalPool(), feature_dim=c3, num_classes=num_classes)
        self.widths = tuple(widths)
        init_weights(self)
        nn.init.zeros_(self.classifier.bias)


def _register(depth: int, k: int) -> None:
    name = f"wrn_{depth}_{k}"

    @register_model(name, image_sizes=(16, 64))
    def build(num_classes: int, in_channels: int, image_size: int, widths=None) -> WideResNet:
        return WideResNet(num_classes, in_channels, depth, widths or (16, 16 * k, 32 * k, 64 * k))

    n = (depth - 4) // 6
    build.__doc__ = f"WRN-{depth}-{k}: widths 16/{16 * k}/{32 * k}/{64 * k}, {n} blocks per group."


for _depth, _k in ((16, 1), (16, 2), (40, 1), (40, 2)):
    _register(_depth, _k)
