"""Where MLflow records go, and how long one request may take.

- ``resolve_tracking_uri``: the config's URI, else ``$MLFLOW_TRACKING_URI``, else the
  embedded ``sqlite:///<cwd>/mlflow.db``; always absolute (trials run in temporary
  working directories).
- ``bound_http_requests``: MLflow's own HTTP defaults (7 retries with exponential
  back-off, 120 s timeout) would stall training, or a sweep's wrap-up, for minutes per
  call while a server is down. cdfkd processes try once, with a short timeout; the
  outbox's back-off between attempts is the retry. Set process-wide, once, and only
  where the user has not set ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` /
  ``MLFLOW_HTTP_REQUEST_TIMEOUT`` themselves.
- ``using_tracking_uri``: the one wrapper around MLflow's private ``_use_tracking_uri``
  (``tests/test_mlflow.py`` pins its behaviour): MLflow's fluent calls (``log_model``,
  ``register_model``, ``load_model``) read a process-global URI.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

#: the experiment of `cdfkd distill` runs whose config names none
DEFAULT_EXPERIMENT = "cdfkd-distill"


def resolve_tracking_uri(uri: str | None = None) -> str:
    """An absolute tracking URI: ``uri``, else $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db.

    Relative sqlite and file paths are made absolute against the current directory,
    because Tune trials run in temporary working directories.
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or "mlflow.db"
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///") :]
        return (
            uri
            if path.startswith("/") or path == ":memory:"
            else f"sqlite:///{Path(path).resolve()}"
        )
    if uri.startswith("file:"):
        path = uri[len("file:") :].removeprefix("//")
        return f"file://{Path(path).resolve()}"
    if "://" in uri or uri in ("databricks", "uc") or uri.startswith("databricks"):
        return uri
    # A bare path: a .db file is a sqlite store, anything else a file store.
    bare = Path(uri).expanduser().resolve()
    return f"sqlite:///{bare}" if bare.suffix == ".db" else f"file://{bare}"


@dataclass(frozen=True)
class RetryPolicy:
    """How long one attempt may take, and how long to wait after a failed one.

    One HTTP try per attempt: the back-off between attempts is the retry, so a hung
    server costs training at most ``http_timeout_s`` per ``max_delay_s``.
    """

    first_delay_s: float = 2.0
    max_delay_s: float = 120.0
    http_timeout_s: int = 15
    http_retries: int = 0


def bound_http_requests(policy: RetryPolicy | None = None) -> None:
    """Make MLflow's HTTP calls in this process try once with a short timeout (see above)."""
    policy = policy or RetryPolicy()
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(policy.http_retries))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(policy.http_timeout_s))


@contextlib.contextmanager
def using_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's fluent API pointed at ``uri`` inside, restored (even to "unset") afterwards."""
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    with _use_tracking_uri(uri):
        yield
