"""Label-conditioned generator ``G(z, y)`` for CGDD.

CGDD trains G so that the teacher classifies ``G(z, y)`` as the preset label
``y`` (cross-entropy with y as ground truth) and gives the same y to the
student as a CE target. The label enters as a learned class embedding
(default) or a one-hot vector, concatenated with z and fed to the same
:class:`~cdfkd.generators.dcgan.DCGANBody` as the unconditional generator.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cdfkd.generators.base import GENERATORS, LatentGenerator
from cdfkd.generators.dcgan import DCGANBody

__all__ = ["ConditionalGenerator"]


class ConditionalGenerator(LatentGenerator):
    """``G(z, y)``: ``z (B, nz)``, ``y (B,)`` long class ids -> ``(B, C, S, S)``.

    ``label_encoding``: ``"embedding"`` (``nn.Embedding(num_classes, embed_dim)``)
    or ``"onehot"`` (a fixed one-hot of length num_classes; ``embed_dim`` unused).
    ``y`` is required.
    """

    conditional = True

    def __init__(
        self,
        channels: int,
        image_size: int,
        num_classes: int,
        nz: int = 100,
        width: int = 128,
        embed_dim: int = 50,
        label_encoding: str = "embedding",
        output_bn: bool = True,
    ) -> None:
        super().__init__(nz, channels, image_size, num_classes=num_classes)
        if num_classes < 2:
            raise ValueError(
                f"conditional generator needs num_classes >= 2, got {num_classes}; "
                "use 'dcgan' for an unconditional one"
            )
        self.embed: nn.Embedding | None
        if label_encoding == "embedding":
            self.embed = nn.Embedding(num_classes, embed_dim)
            label_dim = embed_dim
        elif label_encoding == "onehot":
            self.embed = None
            label_dim = num_classes
        else:
            raise ValueError(
                f"label_encoding must be 'embedding' or 'onehot', got {label_encoding!r}"
            )
        self.label_encoding = label_encoding
        self.body = DCGANBody(
            nz + label_dim, channels, image_size, width=width, output_bn=output_bn
        )

    def encode_labels(self, y: torch.Tensor) -> torch.Tensor:
        """``(B,)`` class ids -> ``(B, label_dim)`` vectors in z's dtype."""
        if self.embed is not None:
            return self.embed(y)
        return F.one_hot(y, int(self.num_classes or 0)).float()

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if y is None:
            raise ValueError(
                "conditional generator needs labels y (B,) of class ids; use z, y = G.sample(B)"
            )
        self._check_z(z)
        if y.shape != (z.shape[0],) or y.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"y must be integer class ids of shape ({z.shape[0]},), "
                f"got {y.dtype} {tuple(y.shape)}; pass labels.long()"
            )
        h = torch.cat([z, self.encode_labels(y.long()).to(z.dtype)], dim=1)
        return self.body(h)


@GENERATORS.register("conditional")
def _conditional(*, channels: int, image_size: int, num_classes: int, nz: int, width: int, **kw):
    return ConditionalGenerator(channels, image_size, num_classes, nz=nz, width=width, **kw)
