"""The small metric-logger interface the training loop writes to.

``JsonlLogger`` keeps every record in the run folder (so nothing depends on a
tracking server being up); MLflow and Ray report through other implementations
of the same four calls.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Protocol


class MetricLogger(Protocol):
    def log_params(self, params: dict) -> None: ...
    def set_tags(self, tags: dict) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifact(self, path: str | Path) -> None: ...
    def close(self, status: str = "FINISHED") -> None: ...


class NullLogger:
    def log_params(self, params: dict) -> None:
        pass

    def set_tags(self, tags: dict) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: str | Path) -> None:
        pass

    def close(self, status: str = "FINISHED") -> None:
        pass


class JsonlLogger(NullLogger):
    """Appends ``{"step", "time", **metrics}`` lines to ``<dir>/metrics.jsonl``."""

    def __init__(self, directory: str | Path) -> None:
        self.path = Path(directory) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        row = {"step": step, "time": time.time()}
        row.update({k: (v if math.isfinite(v) else str(v)) for k, v in metrics.items()})
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


class MultiLogger(NullLogger):
    """Fans every call out to several loggers."""

    def __init__(self, *loggers: MetricLogger) -> None:
        self.loggers = [lg for lg in loggers if lg is not None]

    def log_params(self, params: dict) -> None:
        for lg in self.loggers:
            lg.log_params(params)

    def set_tags(self, tags: dict) -> None:
        for lg in self.loggers:
            lg.set_tags(tags)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for lg in self.loggers:
            lg.log_metrics(metrics, step)

    def log_artifact(self, path: str | Path) -> None:
        for lg in self.loggers:
            lg.log_artifact(path)

    def close(self, status: str = "FINISHED") -> None:
        for lg in self.loggers:
            lg.close(status)


def flatten(d: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}} -> {"a.b": 1}`` (lists and tuples are kept as values)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
