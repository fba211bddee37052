"""``cdfkd mlflow sync DIR``: replay what run folders could not send while MLflow was unreachable."""

from __future__ import annotations

from pathlib import Path

from cdfkd.errors import ConfigError
from cdfkd.tracking.mlflow_logger import MLflowLogger
from cdfkd.tracking.outbox import RUN_FILE


def sync_runs(path: str | Path, tracking_uri: str | None = None) -> list[dict]:
    """Replay the pending records of every run folder under ``path`` (parents before children).

    Returns one ``{"run_dir", "run_id", "sent", "pending", "rejected"}`` per folder. After
    a failure to reach a tracking URI, later folders logging there are not tried.
    """
    root = Path(path)
    if not root.exists():
        raise ConfigError(f"{root} does not exist: give a run folder or an experiment folder")
    folders = sorted({p.parent for p in root.rglob(RUN_FILE)}, key=lambda p: (len(p.parts), str(p)))
    if not folders:
        raise ConfigError(f"no {RUN_FILE} under {root}: nothing there was logged to MLflow")
    out, down = [], set()
    for folder in folders:
        lg = MLflowLogger.open(folder, tracking_uri)
        uri = lg.tracking_uri
        if uri in down:
            row = {"sent": 0, "pending": lg.pending_count(), "rejected": 0}
        else:
            row = lg.replay()
            if row["pending"]:
                down.add(uri)
        out.append({"run_dir": str(folder), "run_id": lg.run_id, **row})
    return out
