"""Tracking: the logger protocol the engine writes to, and MLflow behind it.

- ``protocol``: ``MetricLogger`` (params, tags, metrics, artifacts, the model, close),
  ``NullLogger``, ``JsonlLogger`` (the run folder's ``metrics.jsonl``), ``MultiLogger``,
  ``flatten``. The only module the engine imports; it needs no MLflow.
- ``uri``: ``resolve_tracking_uri`` (config, else $MLFLOW_TRACKING_URI, else
  ./mlflow.db; absolute), ``RetryPolicy``, ``DEFAULT_EXPERIMENT``.
- ``mlflow_logger``: ``MLflowLogger``, one MLflow run per run folder, with an outbox
  (``outbox``) that keeps what an unreachable server could not receive; ``sync``:
  ``sync_runs`` (``cdfkd mlflow sync DIR``) replays it.
- ``export``: the header-averaging ``ServingStudent`` and ``torch.export`` programs.
- ``exports``: ``log_export``, the files of ``cdfkd export`` logged to their run (and
  tagged on its registered versions).
- ``model_registry``: log a student as a ``pt2`` model, register it, load it back
  (``load_registered_student``: a model that maps (B, C, H, W) images to (B, C) logits).
- ``tags``: ``git_commit``, ``standard_tags``.

MLflow is imported only by these modules, and only when one of them is used: names
are looked up lazily, so ``import cdfkd.tracking`` costs nothing.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "MetricLogger": "protocol",
    "NullLogger": "protocol",
    "JsonlLogger": "protocol",
    "MultiLogger": "protocol",
    "flatten": "protocol",
    "DEFAULT_EXPERIMENT": "uri",
    "RetryPolicy": "uri",
    "resolve_tracking_uri": "uri",
    "MLflowLogger": "mlflow_logger",
    "sync_runs": "sync",
    "ServingStudent": "export",
    "serving_module": "export",
    "log_export": "exports",
    "register_student": "model_registry",
    "load_registered_student": "model_registry",
    "student_from_run_dir": "model_registry",
    "git_commit": "tags",
    "standard_tags": "tags",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"cdfkd.tracking.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'cdfkd.tracking' has no attribute {name!r}")
