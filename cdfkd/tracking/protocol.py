"""The metric-logger interface the training loop writes to, and the loggers that need no server.

The engine imports only this module of ``cdfkd.tracking`` (it imports nothing that
pulls in MLflow). ``JsonlLogger`` keeps every record in the run folder, so nothing
depends on a tracking server being up; ``MLflowLogger`` (``mlflow_logger.py``) is
the same six calls on an MLflow run.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Protocol

from torch import Tensor, nn

from cdfkd.runs import METRICS


class MetricLogger(Protocol):
    def log_params(self, params: dict) -> None: ...
    def set_tags(self, tags: dict) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifact(self, path: str | Path) -> None: ...

    def log_model(self, model: nn.Module, input_example: Tensor) -> None:
        """Keep the trained student (a classifier; ``input_example`` a (B, C, H, W) batch)."""
        ...

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

    def log_model(self, model: nn.Module, input_example: Tensor) -> None:
        pass

    def close(self, status: str = "FINISHED") -> None:
        pass


class JsonlLogger(NullLogger):
    """Appends ``{"step", "time", **metrics}`` lines to ``<dir>/metrics.jsonl``."""

    def __init__(self, directory: str | Path) -> None:
        self.path = Path(directory) / METRICS

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        row: dict[str, float | str] = {"step": step, "time": time.time()}
        row.update({k: (v if math.isfinite(v) else str(v)) for k, v in metrics.items()})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


class MultiLogger(NullLogger):
    """Fans every call out to several loggers."""

    def __init__(self, *loggers: MetricLogger | None) -> None:
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

    def log_model(self, model: nn.Module, input_example: Tensor) -> None:
        for lg in self.loggers:
            lg.log_model(model, input_example)

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
