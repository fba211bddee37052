"""CIFAR-style ResNet-18/34 (He et al., 2016; the DAFL / CDFKD-MFS ``resnet8x`` variant).

3x3 stride-1 stem, no max-pool, four BasicBlock stages of 64/128/256/512 channels
with strides 1/2/2/2: at 32 px the stage maps are 32/16/8/4 px.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn
from torchvision.models.resnet import BasicBlock

from cdfkd.models.base import GlobalPool, StagedClassifier, init_weights, register_model

RESNET_WIDTHS = (64, 64, 128, 256, 512)  # stem, layer1..layer4
RESNET_BLOCKS = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}


def make_layer(c_in: int, c_out: int, blocks: int, stride: int) -> nn.Sequential:
    """``blocks`` BasicBlocks (torchvision's), the first one striding and projecting if needed."""
    downsample = None
    if stride != 1 or c_in != c_out:
        downsample = nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
        )
    layers = [BasicBlock(c_in, c_out, stride, downsample)]
    layers += [BasicBlock(c_out, c_out) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


def make_layers(widths: Sequence[int], blocks: Sequence[int]) -> list[tuple[str, nn.Module]]:
    """layer1..layer4 with strides 1/2/2/2; ``widths[0]`` is the stem's output channels."""
    return [
        (f"layer{i + 1}", make_layer(widths[i], widths[i + 1], n, 1 if i == 0 else 2))
        for i, n in enumerate(blocks)
    ]


class CifarResNet(StagedClassifier):
    """Stages stem (3x3 conv-BN-ReLU), layer1..layer4; ``widths`` = (stem, layer1..layer4)."""

    stem_stages = 1

    def __init__(
        self, num_classes: int, in_channels: int, blocks: Sequence[int], widths: Sequence[int]
    ) -> None:
        stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
        stages = [("stem", stem), *make_layers(widths, blocks)]
        super().__init__(stages, GlobalPool(), feature_dim=widths[-1], num_classes=num_classes)
        self.widths = tuple(widths)
        init_weights(self)


@register_model("resnet18", image_sizes=(16, 64))
def resnet18(num_classes: int, in_channels: int, image_size: int, widths=None) -> CifarResNet:
    """CIFAR ResNet-18 (11.2 M params, 0.56 G MACs at 3x32x32)."""
    return CifarResNet(num_classes, in_channels, RESNET_BLOCKS["resnet18"], widths or RESNET_WIDTHS)


@register_model("resnet34", image_sizes=(16, 64))
def resnet34(num_classes: int, in_channels: int, image_size: int, widths=None) -> CifarResNet:
    """CIFAR ResNet-34 (21.3 M params, 1.16 G MACs at 3x32x32)."""
    return CifarResNet(num_classes, in_channels, RESNET_BLOCKS["resnet34"], widths or RESNET_WIDTHS)
