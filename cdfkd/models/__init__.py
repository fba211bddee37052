"""Models: ``create_model(arch, ...)`` for zoo, torchvision and your own classifiers.

The zoo: one family per file, registered by name. Every zoo model is a
``StagedClassifier`` (named stages -> pool -> linear classifier) with BatchNorm after its
convolutions. ``torchvision:<name>`` and ``package.module:function`` archs are built as
they are and wrapped (``WrappedClassifier``) behind the same interface (``arch.py``).
Multi-header students (``create_student``) wrap any of them.
"""

from __future__ import annotations

# Importing a family file registers its models.
from cdfkd.models import lenet, resnet_cifar, resnet_imagenet, wrn  # noqa: F401
from cdfkd.models.arch import create_model, is_external
from cdfkd.models.base import MODELS, FeatureOutput, GlobalPool, StagedClassifier
from cdfkd.models.multihead import FAMILIES, BranchStudent, MFSStudent
from cdfkd.models.profile import count_macs, count_params
from cdfkd.models.students import create_student, student_structure_space
from cdfkd.models.torchvision_models import list_torchvision_models
from cdfkd.models.user_models import (
    UntrustedCodeError,
    is_trusted,
    is_user_arch,
    trust_modules,
    trusting,
)
from cdfkd.models.wrapped import FeaturePlan, ModelCheckError, WrappedClassifier
from cdfkd.models.wrapped_students import WrappedBranchStudent, WrappedMFSStudent

__all__ = [
    "FAMILIES",
    "BranchStudent",
    "FeatureOutput",
    "FeaturePlan",
    "GlobalPool",
    "MFSStudent",
    "ModelCheckError",
    "StagedClassifier",
    "UntrustedCodeError",
    "WrappedBranchStudent",
    "WrappedClassifier",
    "WrappedMFSStudent",
    "count_macs",
    "count_params",
    "create_model",
    "create_student",
    "is_external",
    "is_trusted",
    "is_user_arch",
    "list_models",
    "list_torchvision_models",
    "student_structure_space",
    "trust_modules",
    "trusting",
]


def list_models() -> list[str]:
    """Registered zoo model names, sorted (``list_torchvision_models()`` for torchvision's)."""
    return MODELS.names()
