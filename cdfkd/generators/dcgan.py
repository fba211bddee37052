"""The DAFL/DFAD generator body and the unconditional generator built on it.

DAFL (Chen et al. ICCV 2019) design, used by CDFKD, DFAD and CDFKD-MFS on
32 px images: Linear(nz -> width * s0^2) -> BN -> [up x2 -> conv3x3 -> BN ->
LeakyReLU 0.2] x n -> conv3x3 -> tanh -> BN(channels, affine=False). The
output is a per-channel standardised image, fed to the teachers as is.

Larger images get more up-sampling stages from the same rule (``_plan``):
32 px starts from 8x8 with 2 stages (DAFL), 64 px from 8x8 with 3, 128 px
from 8x8 with 4 (the reference's Caltech-101 seed), 224 px from 14x14 with 4
(its mini-ImageNet seed). Channel widths halve towards the output and end at
``width // 2``.
"""

from __future__ import annotations

import torch
from torch import nn

from cdfkd.generators.base import GENERATORS, LatentGenerator

__all__ = ["DCGANBody", "DCGANGenerator"]


def _plan(image_size: int) -> tuple[int, int]:
    """``(seed_size, n_up)``: halve while the result stays an integer >= 8; at least 2 stages."""
    if image_size < 8 or image_size % 4:
        raise ValueError(
            f"generator image_size must be a multiple of 4 and >= 8, got {image_size}; "
            "resize the dataset (DatasetInfo.image_size) to e.g. 32"
        )
    n_up, size = 0, image_size
    while size % 2 == 0 and size // 2 >= 8:
        size //= 2
        n_up += 1
    if n_up < 2:
        n_up, size = 2, image_size // 4
    return size, n_up


def _up_stage(c_in: int, c_out: int) -> nn.Sequential:
    # Bias-free conv: the BatchNorm right after it would cancel a bias anyway.
    # BN eps stays at the 1e-5 default: the DAFL reference passes 0.8 as the
    # second positional argument (eps), where momentum was probably meant.
    return nn.Sequential(
        nn.Upsample(scale_factor=2, mode="nearest"),
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.LeakyReLU(0.2, inplace=True),
    )


class DCGANBody(nn.Module):
    """Latent vector ``(B, in_features)`` -> image ``(B, channels, image_size, image_size)``.

    Shared by the unconditional and conditional generators: they differ only
    in what they feed it. Stage i = 1..n_up-1 outputs ``width * 2^(n_up-1-i)``
    channels and the last stage ``width // 2``; the seed has stage 1's width
    (32 px, width 128: seed 128 -> 128 -> 64, as in DAFL; 128 px: seed 512 ->
    512 -> 256 -> 128 -> 64).
    ``output_bn=False`` drops the final affine-free BN (then the output is tanh
    in [-1, 1], as in the reference's Caltech-101 generator).
    """

    def __init__(
        self,
        in_features: int,
        channels: int,
        image_size: int,
        width: int = 128,
        output_bn: bool = True,
    ) -> None:
        super().__init__()
        if width < 2:
            raise ValueError(
                f"generator width must be >= 2 (last stage: width // 2 channels), got {width}"
            )
        self.seed_size, n_up = _plan(image_size)
        widths = [width * 2 ** (n_up - 1 - i) for i in range(1, n_up)] + [width // 2]
        self.seed_channels = widths[0]
        self.project = nn.Linear(in_features, self.seed_channels * self.seed_size**2)
        self.seed_bn = nn.BatchNorm2d(self.seed_channels)
        c_in = [self.seed_channels, *widths[:-1]]
        self.stages = nn.Sequential(*(_up_stage(a, b) for a, b in zip(c_in, widths, strict=True)))
        self.to_image = nn.Sequential(nn.Conv2d(widths[-1], channels, 3, padding=1), nn.Tanh())
        self.output_norm = nn.BatchNorm2d(channels, affine=False) if output_bn else nn.Identity()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = self.project(h).view(h.shape[0], self.seed_channels, self.seed_size, self.seed_size)
        x = self.stages(self.seed_bn(x))
        return self.output_norm(self.to_image(x))


class DCGANGenerator(LatentGenerator):
    """Unconditional generator ``G(z)`` (DAFL, DFAD, CDFKD-MFS): ``z (B, nz)`` -> ``(B, C, S, S)``.

    ``forward(z, y=None)`` rejects labels: passing one means the method was
    wired to the wrong generator.
    """

    conditional = False

    def __init__(
        self,
        channels: int,
        image_size: int,
        nz: int = 100,
        width: int = 128,
        output_bn: bool = True,
    ) -> None:
        super().__init__(nz, channels, image_size, num_classes=None)
        self.body = DCGANBody(nz, channels, image_size, width=width, output_bn=output_bn)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if y is not None:
            raise ValueError(
                "unconditional generator got labels y; call G(z) or use the 'conditional' generator"
            )
        self._check_z(z)
        return self.body(z)


@GENERATORS.register("dcgan")
def _dcgan(*, channels: int, image_size: int, num_classes: int, nz: int, width: int, **kw):
    return DCGANGenerator(channels, image_size, nz=nz, width=width, **kw)
