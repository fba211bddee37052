"""cdfkd: data-free knowledge distillation (CGDD, CDFKD-MFS and baselines) as a library.

The public API is small; everything else is reached through these names.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "build_config",
    "create_generator",
    "create_method",
    "create_model",
    "create_student",
    "list_datasets",
    "list_generators",
    "list_methods",
    "list_models",
    "load_config",
    "load_dataset",
    "load_ensemble",
    "run",
]

_LAZY = {
    "build_config": "cdfkd.config",
    "load_config": "cdfkd.config",
    "load_dataset": "cdfkd.data",
    "list_datasets": "cdfkd.data",
    "create_model": "cdfkd.models",
    "create_student": "cdfkd.models",
    "list_models": "cdfkd.models",
    "create_generator": "cdfkd.generators",
    "list_generators": "cdfkd.generators",
    "create_method": "cdfkd.methods",
    "list_methods": "cdfkd.methods",
    "load_ensemble": "cdfkd.teachers",
    "run": "cdfkd.train",
}


def __getattr__(name: str):
    # Imports are deferred so `cdfkd --help` and the Ray layer's workers start fast.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cdfkd' has no attribute {name!r}")
