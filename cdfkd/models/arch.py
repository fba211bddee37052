"""What an ``arch`` string names, and building it: ``create_model``.

Three kinds of names, one interface (``forward(x)`` -> logits, ``forward(x,
return_features=True)`` -> ``FeatureOutput``, ``num_classes``, ``feature_dim``):

==========================  =====================================================
``resnet18``                a zoo model (``list_models()``): a ``StagedClassifier``
``torchvision:resnet18``    a torchvision classification model (``list_torchvision_models()``)
``my_package.models:build`` your own builder (imported only when trusted, ``user_models``)
==========================  =====================================================

The last two are built as they are and wrapped (``WrappedClassifier``); their feature
plan (stages, embedding) is found once per arch, geometry and keyword arguments and
reused by every later build (a multi-header student builds its backbone H + 1 times).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable

from torch import nn

from cdfkd.models import torchvision_models as tv
from cdfkd.models.base import MODELS
from cdfkd.models.user_models import build_user_model, is_user_arch
from cdfkd.models.wrapped import FeaturePlan, WrappedClassifier, plan_features


def is_external(arch: str) -> bool:
    """Whether ``arch`` names a torchvision model or a user builder rather than a zoo model."""
    return arch.startswith(f"{tv.PREFIX}:") or is_user_arch(arch)


def _raw_builder(arch: str) -> tuple[Callable[..., nn.Module], str]:
    if arch.startswith(f"{tv.PREFIX}:"):
        name = arch.split(":", 1)[1]
        return functools.partial(tv.build_torchvision, name), tv.size_hint(name)
    return functools.partial(build_user_model, arch), ""


_PLANS: dict[str, FeaturePlan] = {}


def _plan_key(arch: str, num_classes: int, in_channels: int, image_size: int, stages, kw) -> str:
    return json.dumps([arch, num_classes, in_channels, image_size, stages, kw], default=str)


def create_model(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 32,
    stages: list[str] | None = None,
    **kw,
) -> nn.Module:
    """Build ``name`` (any of the three kinds) for (in_channels, image_size, image_size) inputs.

    ``stages``: torchvision and user models only, the module names whose outputs are the
    stage maps (default: the automatic rule of ``cdfkd.models.tracing``). Other keywords go
    to the builder (``widths`` for zoo models). Unknown names raise ``KeyError`` listing the
    known ones; inputs a model cannot take raise ``ValueError`` naming what it takes.
    """
    if not is_external(name):
        if stages is not None:
            raise ValueError(
                f"stages applies to torchvision:<name> and package.module:function archs; "
                f"zoo model {name!r} has fixed stages"
            )
        return MODELS.get(name)(num_classes, in_channels, image_size, **kw)
    if num_classes < 1 or in_channels < 1 or image_size < 1:
        raise ValueError(
            f"{name}: num_classes, in_channels and image_size must be >= 1, got "
            f"{num_classes}, {in_channels}, {image_size}"
        )
    build, hint = _raw_builder(name)
    model = build(num_classes, in_channels, image_size, **kw)
    key = _plan_key(name, num_classes, in_channels, image_size, stages, kw)
    plan = _PLANS.get(key)
    if plan is None:
        plan = plan_features(
            model,
            num_classes,
            in_channels,
            image_size,
            stages=stages,
            default_stages=tv.default_stages if name.startswith(f"{tv.PREFIX}:") else None,
            what=name,
            size_hint=hint,
        )
        _PLANS[key] = plan
    return WrappedClassifier(model, num_classes, plan, arch=name)
