"""ImageNet-style ResNet-18/34 (He et al., 2016) for 64-224 px inputs, from torchvision.

torchvision's ``resnet18`` / ``resnet34`` (``weights=None``) with its modules re-arranged
into stages: stem (7x7 stride-2 conv-BN-ReLU + 3x3 stride-2 max-pool), layer1..layer4.
At 224 px the stage maps are 56/56/28/14/7 px; at 64 px 16/16/8/4/2 px.
"""

from __future__ import annotations

from collections.abc import Sequence

import torchvision
from torch import nn

from cdfkd.models.base import GlobalPool, StagedClassifier, init_weights, register_model
from cdfkd.models.resnet_cifar import RESNET_BLOCKS, RESNET_WIDTHS, make_layers


class ImageNetResNet(StagedClassifier):
    """Stages stem, layer1..layer4; ``widths`` = (stem, layer1..layer4).

    With the default widths the layers are torchvision's own modules; other widths
    (narrower private stages of multi-header students) rebuild them from the same
    torchvision BasicBlock.
    """

    stem_stages = 1

    def __init__(
        self, num_classes: int, in_channels: int, arch: str, widths: Sequence[int]
    ) -> None:
        tv = getattr(torchvision.models, arch)(weights=None)
        if in_channels != 3 or widths[0] != tv.conv1.out_channels:
            tv.conv1 = nn.Conv2d(in_channels, widths[0], 7, stride=2, padding=3, bias=False)
            tv.bn1 = nn.BatchNorm2d(widths[0])
        stem = nn.Sequential(tv.conv1, tv.bn1, tv.relu, tv.maxpool)
        if tuple(widths) == RESNET_WIDTHS:
            layers = [(f"layer{i}", getattr(tv, f"layer{i}")) for i in range(1, 5)]
        else:
            layers = make_layers(widths, RESNET_BLOCKS[arch])
        super().__init__(
            [("stem", stem), *layers], GlobalPool(), feature_dim=widths[-1], num_classes=num_classes
        )
        self.widths = tuple(widths)
        init_weights(self)  # torchvision's recipe, repeated for any replaced module


@register_model("resnet18_imagenet", image_sizes=(64, 224))
def resnet18_imagenet(num_classes: int, in_channels: int, image_size: int, widths=None):
    """torchvision ResNet-18 (11.7 M params at 1000 classes, 1.82 G MACs at 3x224x224)."""
    return ImageNetResNet(num_classes, in_channels, "resnet18", widths or RESNET_WIDTHS)


@register_model("resnet34_imagenet", image_sizes=(64, 224))
def resnet34_imagenet(num_classes: int, in_channels: int, image_size: int, widths=None):
    """torchvision ResNet-34 (21.8 M params at 1000 classes, 3.67 G MACs at 3x224x224)."""
    return ImageNetResNet(num_classes, in_channels, "resnet34", widths or RESNET_WIDTHS)
