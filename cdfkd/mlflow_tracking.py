"""MLflow tracking for cdfkd runs: the public entry points.

- ``MLflowLogger`` (``cdfkd/mlflow_logger.py``): the metric-logger interface on one MLflow
  run per run folder, with an outbox (``cdfkd/mlflow_outbox.py``) that keeps what an
  unreachable server could not receive; ``sync_runs`` (``cdfkd mlflow sync DIR``) replays it.
- ``resolve_tracking_uri``: config, else $MLFLOW_TRACKING_URI, else ./mlflow.db; absolute.
- ``git_commit``, ``ensemble_id``, ``standard_tags``: what every run is tagged with.
- ``register_student``, ``load_registered_student`` (``cdfkd/mlflow_models.py``): the
  Model Registry; a loaded student maps (B, C, H, W) images to (B, C) logits.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from cdfkd.config import ConfigError
from cdfkd.mlflow_logger import DEFAULT_EXPERIMENT, MLflowLogger, resolve_tracking_uri
from cdfkd.mlflow_models import load_registered_student, register_student
from cdfkd.mlflow_outbox import MLFLOW_FILES, RUN_FILE, STATE_FILES, RetryPolicy

__all__ = [
    "DEFAULT_EXPERIMENT",
    "MLFLOW_FILES",
    "RUN_FILE",
    "STATE_FILES",
    "MLflowLogger",
    "RetryPolicy",
    "ensemble_id",
    "ensemble_id_of_dir",
    "git_commit",
    "load_registered_student",
    "register_student",
    "resolve_tracking_uri",
    "standard_tags",
    "sync_runs",
]


def git_commit(start: str | Path | None = None) -> str:
    """``git rev-parse HEAD`` of ``start`` (default: cwd), else of cdfkd's, else "unknown"."""
    for where in (Path(start or Path.cwd()), Path(__file__).resolve().parent):
        try:
            out = subprocess.run(
                ["git", "rev-parse", "HEAD"],
                cwd=where,
                capture_output=True,
                text=True,
                timeout=5,
                check=False,
            )
        except (OSError, subprocess.SubprocessError):
            continue
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    return "unknown"


def ensemble_id(manifest) -> str:
    """A 12-hex-digit id of a teacher ensemble: sha256 of its teachers' sha256 list, in order."""
    import hashlib

    teachers = (
        manifest["teachers"] if isinstance(manifest, dict) else manifest.model_dump()["teachers"]
    )
    return hashlib.sha256("\n".join(t["sha256"] for t in teachers).encode()).hexdigest()[:12]


def ensemble_id_of_dir(path: str | Path) -> str | None:
    """The id of the ensemble folder ``path``; None when it has no readable manifest."""
    from cdfkd.teachers import EnsembleError, read_manifest

    try:
        return ensemble_id(read_manifest(path))
    except (EnsembleError, OSError):
        return None


def standard_tags(run_kind: str, teachers_id: str | None = None, **extra) -> dict[str, str]:
    """Every run's tags: run_kind, git_commit, cdfkd_version, teacher_ensemble_hash + extras."""
    from cdfkd.teachers.manifest import cdfkd_version

    tags = {"run_kind": run_kind, "git_commit": git_commit(), "cdfkd_version": cdfkd_version()}
    if teachers_id:
        tags["teacher_ensemble_hash"] = teachers_id
    tags.update({k: str(v) for k, v in extra.items() if v is not None})
    return tags


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
        uri = lg._want["tracking_uri"]
        if uri in down:
            lg._activate()
            row = {"sent": 0, "pending": len(lg._queue), "rejected": 0}
        else:
            row = lg.replay()
            if row["pending"]:
                down.add(uri)
        out.append({"run_dir": str(folder), "run_id": lg.run_id, **row})
    return out
