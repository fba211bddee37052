"""LeNet-5 (LeCun et al., 1998) with BatchNorm, the MNIST-scale teacher and student.

Geometry at 32 px: conv5x5 -> 28 -> pool 14, conv5x5 -> 10 -> pool 5, conv5x5 -> 1;
then fc c3 -> hidden -> C. Each convolution is conv-BN-ReLU(-pool): the BN layers
carry the statistics the BN prior of data-free methods matches. Larger inputs
(up to 64 px) leave a map bigger than 1x1 after conv3, which is average-pooled.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from cdfkd.models.base import GlobalPool, StagedClassifier, init_weights, register_model

_LENET5 = (6, 16, 120, 84)
_LENET5_HALF = (3, 8, 60, 42)


def _conv_bn_relu(c_in: int, c_out: int, pool: bool) -> nn.Sequential:
    layers = [nn.Conv2d(c_in, c_out, 5, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class LeNet5(StagedClassifier):
    """Stages conv1 (c1, 14 px), conv2 (c2, 5 px), conv3 (c3, 1 px) at 32 px input.

    ``widths = (c1, c2, c3, hidden)``: the three conv widths and the fc hidden width.
    The embedding (``feature_dim = hidden``) is the ReLU'd hidden fc layer.
    """

    stem_stages = 0

    def __init__(self, num_classes: int, in_channels: int, widths: Sequence[int]) -> None:
        c1, c2, c3, hidden = widths
        stages: list[tuple[str, nn.Module]] = [
            ("conv1", _conv_bn_relu(in_channels, c1, pool=True)),
            ("conv2", _conv_bn_relu(c1, c2, pool=True)),
            ("conv3", _conv_bn_relu(c2, c3, pool=False)),
        ]
        pool = nn.Sequential(GlobalPool(), nn.Linear(c3, hidden), nn.ReLU(inplace=True))
        super().__init__(stages, pool, feature_dim=hidden, num_classes=num_classes)
        self.widths = tuple(widths)
        init_weights(self)


@register_model("lenet5", image_sizes=(32, 64))
def lenet5(num_classes: int, in_channels: int, image_size: int, widths=None) -> LeNet5:
    """Classic LeNet-5 widths 6-16-120, fc 120-84-C (~62 K params, ~0.42 M MACs at 1x32x32)."""
    return LeNet5(num_classes, in_channels, widths or _LENET5)


@register_model("lenet5_half", image_sizes=(32, 64))
def lenet5_half(num_classes: int, in_channels: int, image_size: int, widths=None) -> LeNet5:
    """LeNet-5 at half width: 3-8-60, fc 60-42-C."""
    return LeNet5(num_classes, in_channels, widths or _LENET5_HALF)
