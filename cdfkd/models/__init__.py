"""The model zoo: ``create_model(name, ...)`` over the ``model`` registry.

One family per file, registered by name. Every model is a ``StagedClassifier``
(named stages -> pool -> linear classifier) with BatchNorm after its convolutions.
Multi-header students (``create_student``) wrap any zoo backbone.
"""

from __future__ import annotations

# Importing a family file registers its models.
from cdfkd.models import lenet, resnet_cifar, resnet_imagenet, wrn  # noqa: F401
from cdfkd.models.base import MODELS, FeatureOutput, GlobalPool, StagedClassifier
from cdfkd.models.multihead import (
    FAMILIES,
    BranchStudent,
    MFSStudent,
    create_student,
    student_structure_space,
)
from cdfkd.models.profile import count_macs, count_params

__all__ = [
    "FAMILIES",
    "BranchStudent",
    "FeatureOutput",
    "GlobalPool",
    "MFSStudent",
    "StagedClassifier",
    "count_macs",
    "count_params",
    "create_model",
    "create_student",
    "list_models",
    "student_structure_space",
]


def create_model(
    name: str, num_classes: int, in_channels: int = 3, image_size: int = 32, **kw
) -> StagedClassifier:
    """Build zoo model ``name`` for (in_channels, image_size, image_size) inputs.

    Unknown names raise ``KeyError`` listing the known ones; an image size or channel
    count the model cannot take raises ``ValueError`` naming the valid range.
    ``widths`` (keyword) overrides the per-stage output channels.
    """
    return MODELS.get(name)(num_classes, in_channels, image_size, **kw)


def list_models() -> list[str]:
    """Registered zoo model names, sorted."""
    return MODELS.names()
