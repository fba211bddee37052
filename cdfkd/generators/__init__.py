"""Generators of synthetic images: unconditional ``dcgan`` and label-conditioned ``conditional``.

Pick one with :func:`create_generator`; add one by writing a file that
registers a factory in :data:`GENERATORS` and importing it here (importing a
generator module is what registers its factories).
"""

from __future__ import annotations

from cdfkd.generators.base import GENERATORS, LatentGenerator, sample_labels
from cdfkd.generators.conditional import ConditionalGenerator
from cdfkd.generators.dcgan import DCGANBody, DCGANGenerator

__all__ = [
    "GENERATORS",
    "ConditionalGenerator",
    "DCGANBody",
    "DCGANGenerator",
    "LatentGenerator",
    "create_generator",
    "list_generators",
    "sample_labels",
]


def create_generator(
    name: str,
    info,
    *,
    nz: int = 100,
    width: int = 128,
    num_classes: int | None = None,
    **kwargs,
) -> LatentGenerator:
    """Build generator ``name`` sized for a dataset.

    ``info``: any object with ``channels``, ``image_size`` and ``num_classes``
    attributes (a ``DatasetInfo``). ``num_classes`` overrides ``info.num_classes``.
    Extra keyword arguments go to the generator (e.g. ``embed_dim``,
    ``label_encoding``, ``output_bn``). Unknown names raise ``KeyError`` listing
    the known ones.
    """
    factory = GENERATORS.get(name)
    return factory(
        channels=int(info.channels),
        image_size=int(info.image_size),
        num_classes=int(info.num_classes if num_classes is None else num_classes),
        nz=nz,
        width=width,
        **kwargs,
    )


def list_generators() -> list[str]:
    """Registered generator names, sorted."""
    return GENERATORS.names()
