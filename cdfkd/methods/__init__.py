"""Distillation methods: one module each, registered by name, one interface (see base.py)."""

from __future__ import annotations

# Importing a method module registers it; the registry key, the file name and
# the config value are the same string.
from cdfkd.methods import (  # noqa: F401
    cdfkd,
    cdfkd_mfs,
    cgdd,
    dafl,
    deepinversion,
    dfad,
    kd_real,
)
from cdfkd.methods.base import (
    LOSS_NAMES,
    METHODS,
    DistillMethod,
    MethodConfig,
    create_method,
    list_methods,
    method_config_class,
)

__all__ = [
    "LOSS_NAMES",
    "METHODS",
    "DistillMethod",
    "MethodConfig",
    "create_method",
    "list_methods",
    "method_config_class",
]
