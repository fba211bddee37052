"""Students by structure: ``create_student`` and ``student_structure_space``, for any backbone.

One entry point for every backbone kind (``cdfkd.models.arch``): zoo backbones get the
multi-header classes of ``multihead.py``, torchvision and user backbones those of
``wrapped_students.py``. The structure is validated here, once, with the valid range in
every refusal.
"""

from __future__ import annotations

import functools
from numbers import Integral
from typing import cast

import torch
from torch import nn

from cdfkd.models.arch import create_model, is_external
from cdfkd.models.base import MODELS, StagedClassifier
from cdfkd.models.multihead import FAMILIES, HEADER_WIDTH_MAX, MFSStudent, zoo_branch_student
from cdfkd.models.wrapped import WrappedClassifier
from cdfkd.models.wrapped_students import WrappedBranchStudent, WrappedMFSStudent

#: the input a structure probe of an external backbone assumes when none is given
DEFAULT_PROBE = (3, 32)


@functools.cache
def _probe(
    backbone: str, in_channels: int, image_size: int | None, stages: tuple[str, ...] | None
) -> tuple[tuple[str, ...], int]:
    if not is_external(backbone):
        build = MODELS.get(backbone)
        with torch.device("meta"):  # structure only: no memory, no init cost
            model = build(2, 3, build.image_sizes[0])
        return tuple(model.stage_names), model.stem_stages
    size = image_size or DEFAULT_PROBE[1]
    names = list(stages) if stages else None
    try:
        with torch.device("meta"):
            model = create_model(backbone, 2, in_channels, size, stages=names)
    except (ValueError, KeyError):
        raise
    except Exception:  # some builders cannot run on meta tensors (regnet): build for real
        model = create_model(backbone, 2, in_channels, size, stages=names)
    staged = cast(StagedClassifier | WrappedClassifier, model)
    return tuple(staged.stage_names), staged.stem_stages


def student_structure_space(
    backbone: str,
    in_channels: int = DEFAULT_PROBE[0],
    image_size: int | None = None,
    stages: list[str] | None = None,
) -> dict:
    """Valid header structures for ``backbone`` (inclusive integer ranges).

    Returns ``{"stages": [stage names], "mfs": {"fuse_from": (lo, hi)},
    "branch": {"share_until": (lo, hi)}, "header_width": (0.0, 4.0)}``;
    ``header_width`` is exclusive at 0 (torchvision and user backbones: 1 only for
    ``branch``). Stage indices count from 0 over ``stages``; stem stages are shared but
    never fused from. Torchvision and user backbones are probed for ``in_channels`` x
    ``image_size`` inputs (default 3 x 32), with their ``stages`` if named.
    """
    names, stem = _probe(backbone, in_channels, image_size, tuple(stages) if stages else None)
    k = len(names)
    return {
        "stages": list(names),
        "mfs": {"fuse_from": (stem, k - 1)},
        "branch": {"share_until": (1, k - 1)},
        "header_width": (0.0, HEADER_WIDTH_MAX),
    }


def _check_range(name: str, value: int, lo: int, hi: int, backbone: str) -> None:
    if not (isinstance(value, Integral) and lo <= value <= hi):
        raise ValueError(f"{name}={value} is out of range for {backbone} (valid: {lo}..{hi})")


def create_student(
    backbone: str,
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 32,
    family: str | None = None,
    headers: int = 1,
    fuse_from: int | None = None,
    share_until: int | None = None,
    header_width: float = 1.0,
    stages: list[str] | None = None,
) -> nn.Module:
    """Build a student on ``backbone``; ``family=None`` gives the plain model.

    mfs: ``fuse_from`` (default: first non-stem stage) picks the first trunk stage the
    headers read. branch: ``share_until`` (default: all but the last stage) is the number
    of shared stages. ``header_width`` in (0, 4] scales header channels. ``stages``:
    torchvision and user backbones only, the modules whose outputs are the stages. Valid
    ranges per backbone: ``student_structure_space``; anything else raises ``ValueError``
    naming them.
    """
    external = is_external(backbone)
    build = functools.partial(create_model, backbone, stages=stages) if external else None
    if family is None:
        if headers != 1 or fuse_from is not None or share_until is not None or header_width != 1:
            raise ValueError(
                "headers, fuse_from, share_until and header_width need family='mfs' or 'branch'"
            )
        return create_model(backbone, num_classes, in_channels, image_size, stages=stages)
    if family not in FAMILIES:
        raise ValueError(f"unknown student family {family!r} (valid: {', '.join(FAMILIES)})")
    if not (isinstance(headers, Integral) and headers >= 1):
        raise ValueError(f"headers={headers} must be an integer >= 1")
    if not 0 < header_width <= HEADER_WIDTH_MAX:
        raise ValueError(
            f"header_width={header_width} is out of range (valid: (0, {HEADER_WIDTH_MAX}])"
        )
    space = student_structure_space(backbone, in_channels, image_size, stages)
    if family == "mfs":
        if share_until is not None:
            raise ValueError("share_until applies to family='branch'; mfs uses fuse_from")
        lo, hi = space["mfs"]["fuse_from"]
        fuse_from = lo if fuse_from is None else fuse_from
        _check_range("fuse_from", fuse_from, lo, hi, backbone)
        trunk = create_model(backbone, num_classes, in_channels, image_size, stages=stages)
        if external:
            return WrappedMFSStudent(trunk, headers, fuse_from, header_width)
        return MFSStudent(trunk, headers, fuse_from, header_width)

    if fuse_from is not None:
        raise ValueError("fuse_from applies to family='mfs'; branch uses share_until")
    lo, hi = space["branch"]["share_until"]
    share_until = hi if share_until is None else share_until
    _check_range("share_until", share_until, lo, hi, backbone)
    if build is None:
        zoo = MODELS.get(backbone)
        return zoo_branch_student(
            zoo, num_classes, in_channels, image_size, headers, share_until, header_width
        )
    if header_width != 1:
        raise ValueError(
            f"header_width={header_width}: {backbone} is built as published, so branch headers "
            "keep its width (header_width=1); use family mfs (its headers scale) or a zoo "
            "backbone to change it"
        )
    return WrappedBranchStudent(
        functools.partial(build, num_classes, in_channels, image_size),
        headers,
        share_until,
    )
