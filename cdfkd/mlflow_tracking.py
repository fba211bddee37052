"""Deprecated: ``cdfkd.mlflow_tracking`` moved to :mod:`cdfkd.tracking`.

``from cdfkd.tracking import load_registered_student`` (and the other names) is the
new path; this module forwards to it, with a ``DeprecationWarning``, until 0.3.
"""

from __future__ import annotations

import warnings

from cdfkd import tracking as _tracking


def __getattr__(name: str):
    value = getattr(_tracking, name)  # AttributeError for names cdfkd.tracking lacks
    warnings.warn(
        f"cdfkd.mlflow_tracking.{name} moved to cdfkd.tracking.{name}; "
        "cdfkd.mlflow_tracking will be removed in 0.3",
        DeprecationWarning,
        stacklevel=2,
    )
    return value
