"""Distillation methods: one module each, registered by name, one interface (see base.py)."""

from __future__ import annotations

import importlib

from cdfkd.methods.base import (
    METHODS,
    DistillMethod,
    create_method,
    list_methods,
    method_config_class,
)

# Importing a method module registers it; the registry key, the file name and
# the config value are the same string.
_BUILTIN = ("cgdd", "cdfkd_mfs", "cdfkd", "dafl", "dfad", "deepinversion", "kd_real")
for _name in _BUILTIN:
    importlib.import_module(f"cdfkd.methods.{_name}")

__all__ = ["METHODS", "DistillMethod", "create_method", "list_methods", "method_config_class"]
