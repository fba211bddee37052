"""What every generator shares: the registry, the latent interface and label sampling."""

from __future__ import annotations

import torch
from torch import nn

from cdfkd.registry import Registry

__all__ = ["GENERATORS", "LatentGenerator", "sample_labels"]

#: name -> factory ``(*, channels, image_size, num_classes, nz, width, **kw) -> LatentGenerator``
GENERATORS: Registry = Registry("generator")


def sample_labels(
    batch_size: int,
    num_classes: int,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
    balanced: bool = True,
) -> torch.Tensor:
    """Class ids for a batch, shape ``(batch_size,)``, dtype long.

    ``balanced=True``: ``arange(B) % C`` in a random order, so every class
    appears ``floor(B/C)`` or ``ceil(B/C)`` times; otherwise i.i.d. uniform.
    ``generator`` (on ``device``) makes the draw reproducible.
    """
    if batch_size < 1 or num_classes < 1:
        raise ValueError(
            f"need batch_size >= 1 and num_classes >= 1, got {batch_size}, {num_classes}"
        )
    if balanced:
        labels = torch.arange(batch_size, device=device) % num_classes
        return labels[torch.randperm(batch_size, device=device, generator=generator)]
    return torch.randint(num_classes, (batch_size,), device=device, generator=generator)


class LatentGenerator(nn.Module):
    """Base class: maps noise ``z (B, nz)`` (and, if ``conditional``, labels ``y (B,)``)
    to images ``(B, channels, image_size, image_size)``.

    Methods call ``z, y = G.sample(B, device, rng)`` then ``G(z, y)``; an
    unconditional generator's ``sample`` returns ``y = None``, so the same two
    lines drive both kinds and no method compares generator kinds.
    """

    conditional: bool = False

    def __init__(self, nz: int, channels: int, image_size: int, num_classes: int | None) -> None:
        super().__init__()
        if nz < 1:
            raise ValueError(f"generator nz (latent size) must be >= 1, got {nz}")
        self.nz = nz
        self.channels = channels
        self.image_size = image_size
        self.num_classes = num_classes

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)

    def sample(
        self,
        batch_size: int,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
        balanced: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Draw ``z ~ N(0, I)`` of shape ``(B, nz)`` and, for conditional generators,
        labels ``y (B,)`` (class-balanced unless ``balanced=False``; see
        :func:`sample_labels`); ``y`` is ``None`` for unconditional ones.

        The draw happens where ``generator`` lives (a method keeps one CPU stream, so a
        run draws the same latents on any device) and the result is moved to ``device``.
        """
        where = generator.device if generator is not None else device
        z = torch.randn(batch_size, self.nz, device=where, generator=generator)
        y = None
        if self.conditional:
            assert self.num_classes is not None  # every conditional generator has classes
            y = sample_labels(batch_size, self.num_classes, where, generator, balanced=balanced)
        if device is not None:
            z = z.to(device)
            y = None if y is None else y.to(device)
        return z, y

    def _check_z(self, z: torch.Tensor) -> None:
        if z.dim() != 2 or z.shape[1] != self.nz:
            raise ValueError(
                f"z must be (B, {self.nz}), got {tuple(z.shape)}; draw it with sample()"
            )
