"""Multi-header students: one shared body, H headers (one per teacher), structure as data.

Two families, both built over any zoo backbone (torchvision and user backbones:
``cdfkd.models.wrapped_students``):

* ``mfs`` - CDFKD-MFS (Hao et al., TMM 2022) multi-level feature sharing. The whole trunk
  (every stage) is shared. Each header is a private chain of light SepConv encoders: encoder
  k reads trunk stage k concatenated with the header's previous encoder output, so a header
  draws on every trunk level from ``fuse_from`` on.
* ``branch`` - the earlier CDFKD (Hao et al., ICME 2021): stages ``[0, share_until)`` are
  shared, each header owns a copy of the remaining stages (width x ``header_width``) plus
  its own pool and classifier.

Every student returns logits stacked over headers, (H, B, C); with ``return_features``
a ``FeatureOutput`` whose ``stages`` and ``embedding`` are per-header lists.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cdfkd.models.base import (
    FeatureOutput,
    GlobalPool,
    StagedClassifier,
    bn_layers,
    init_weights,
)

FAMILIES = ("mfs", "branch")
HEADER_WIDTH_MAX = 4.0  # header_width must lie in (0, HEADER_WIDTH_MAX]


def _scaled(channels: int, width: float) -> int:
    return max(1, round(width * channels))


def _stage_channels(model: StagedClassifier) -> list[int]:
    # ``widths`` lists the stages' output channels first (LeNet appends its fc width).
    widths: tuple[int, ...] = model.widths  # type: ignore[assignment]  # set by every zoo model
    return list(widths[: len(model.stages)])


class SepConv(nn.Sequential):
    """Bias-free separable encoder, halving the map: dw3x3/2-pw1x1-BN-ReLU-dw3x3-pw1x1-BN-ReLU."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_in, 3, stride=2, padding=1, groups=c_in, bias=False),
            nn.Conv2d(c_in, c_in, 1, bias=False),
            nn.BatchNorm2d(c_in),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_in, c_in, 3, padding=1, groups=c_in, bias=False),
            nn.Conv2d(c_in, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        )


class MFSHeader(nn.Module):
    """Encoders over trunk maps ``[fuse_from:]`` -> global pool -> linear classifier."""

    def __init__(self, trunk_channels: list[int], num_classes: int, width: float) -> None:
        super().__init__()
        encoders, prev = [], 0
        for k, c in enumerate(trunk_channels):
            # Encoder k outputs (width x) the channels of the next trunk level, the last
            # one those of the last level, as in the reference mhresnet8x / mhwrn4x.
            c_out = _scaled(trunk_channels[min(k + 1, len(trunk_channels) - 1)], width)
            encoders.append(SepConv(c + prev, c_out))
            prev = c_out
        self.encoders = nn.ModuleList(encoders)
        self.pool = GlobalPool()
        self.classifier = nn.Linear(prev, num_classes)
        self.feature_dim = prev

    def forward(self, trunk_maps: list[torch.Tensor]):
        maps, a = [], None
        for encoder, u in zip(self.encoders, trunk_maps, strict=True):
            if a is not None:
                # A stride-2 encoder halves its input, which matches the next trunk level for
                # ResNets/WRNs; LeNet's 5x5 valid convs do not (14 -> 7 vs 5), so resample the
                # header map onto the trunk map's grid (adaptive average pooling) to concatenate.
                if a.shape[-2:] != u.shape[-2:]:
                    a = F.adaptive_avg_pool2d(a, (u.shape[-2], u.shape[-1]))
                u = torch.cat([u, a], dim=1)
            a = encoder(u)
            maps.append(a)
        embedding = self.pool(a)
        return self.classifier(embedding), maps, embedding


class MultiHeadStudent(nn.Module):
    """What every multi-header student shares: ``heads``, BN layers, the output format."""

    heads: nn.ModuleList

    @property
    def num_headers(self) -> int:
        return len(self.heads)

    def bn_layers(self) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
        """Every BatchNorm layer (shared body first, then header by header)."""
        return bn_layers(self)

    @staticmethod
    def _output(outs: list, shared_maps: list | None, return_features: bool):
        logits = torch.stack([o[0] for o in outs])
        if not return_features:
            return logits
        stages = [(shared_maps or []) + list(o[1]) for o in outs]
        return FeatureOutput(logits, stages, [o[2] for o in outs])


class MFSStudent(MultiHeadStudent):
    """Shared trunk (all stages of ``backbone``) + H ``MFSHeader``s reading stages ``fuse_from..``.

    ``forward(x)`` -> (H, B, C); features: per header its encoder maps (encoder k's map has
    the size of trunk stage k+1) and its (B, feature_dim) embedding.
    """

    def __init__(self, trunk: StagedClassifier, headers: int, fuse_from: int, width: float):
        super().__init__()
        self.trunk = trunk.stages
        self.fuse_from = fuse_from
        channels = _stage_channels(trunk)[fuse_from:]
        self.heads = nn.ModuleList(
            MFSHeader(channels, trunk.num_classes, width) for _ in range(headers)
        )
        init_weights(self.heads)
        self.feature_dim = self.heads[0].feature_dim
        self.num_classes = trunk.num_classes

    def forward(self, x: torch.Tensor, return_features: bool = False):
        maps = []
        for stage in self.trunk.values():
            x = stage(x)
            maps.append(x)
        outs = [head(maps[self.fuse_from :]) for head in self.heads]
        return self._output(outs, None, return_features)


class BranchStudent(MultiHeadStudent):
    """Shared stages ``[0, share_until)`` + H private ``StagedClassifier`` tails.

    ``forward(x)`` -> (H, B, C); features: per header the shared maps followed by its own
    stage maps, and its (B, feature_dim) embedding.
    """

    def __init__(self, shared: list[tuple[str, nn.Module]], tails: list[StagedClassifier]):
        super().__init__()
        self.shared = nn.ModuleDict(dict(shared))
        self.heads = nn.ModuleList(tails)
        self.feature_dim = tails[0].feature_dim
        self.num_classes = tails[0].num_classes

    def forward(self, x: torch.Tensor, return_features: bool = False):
        maps = []
        for stage in self.shared.values():
            x = stage(x)
            maps.append(x)
        outs = []
        head: StagedClassifier
        for head in self.heads:  # type: ignore[assignment]
            private = head.forward_stages(x)
            embedding = head.pool(private[-1])
            outs.append((head.classifier(embedding), private, embedding))
        return self._output(outs, maps, return_features)


def zoo_branch_student(
    build,
    num_classes: int,
    in_channels: int,
    image_size: int,
    headers: int,
    share_until: int,
    header_width: float,
) -> BranchStudent:
    """A ``BranchStudent`` over zoo builder ``build``: its first ``share_until`` stages shared."""
    body = build(num_classes, in_channels, image_size)
    # A private copy is a whole model whose widths from share_until on are scaled; its first
    # private stage therefore takes the shared output channels. Its shared part is dropped.
    widths = [c if i < share_until else _scaled(c, header_width) for i, c in enumerate(body.widths)]
    tails = []
    for _ in range(headers):
        full = build(num_classes, in_channels, image_size, widths=widths)
        private = list(full.stages.items())[share_until:]
        tail = StagedClassifier(private, full.pool, full.feature_dim, num_classes)
        tail.classifier = full.classifier
        tails.append(tail)
    return BranchStudent(list(body.stages.items())[:share_until], tails)
