"""Reports over MLflow runs (installed as ``cdfkd.reports``): tables, plots and a static HTML page.

Reports only read the tracking store; they never train. Dependencies point
one way: ``cdfkd.reports`` may import ``cdfkd`` and ``cdfkd.tune``, never the reverse.

    from cdfkd.reports import build_report
    paths = build_report(["digits-mfs"], "runs/report", tracking_uri="sqlite:///mlflow.db")
    paths["index.html"]  # open it in a browser, straight from disk
"""

from __future__ import annotations

__all__ = ["ReportError", "RunSet", "build_report", "load_runs"]

_LAZY = {
    "build_report": "cdfkd.reports.build",
    "ReportError": "cdfkd.reports.query",
    "RunSet": "cdfkd.reports.query",
    "load_runs": "cdfkd.reports.query",
}


def __getattr__(name: str):
    # Deferred so that registering `cdfkd report` (reports.cli) keeps `cdfkd --help`
    # free of pandas, matplotlib and MLflow imports.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cdfkd.reports' has no attribute {name!r}")
