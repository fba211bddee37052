"""Exported students in MLflow: the export files as artifacts of the run that trained them.

``cdfkd export RUN_DIR`` logs ``export/student.onnx`` (+ ``student.int8.onnx``) and
``export/export.json`` to the run named in ``RUN_DIR/mlflow_run.json``, through the run
folder's outbox (a server that is down gets them with ``cdfkd mlflow sync RUN_DIR``).

A sweep registers its best trial's student as a version whose source run is that trial's
run, so exporting the best trial's run folder attaches the files to the registered
student: they are artifacts of the version's run, and every registered version of the run
gets the tags ``onnx``, ``onnx_int8`` and ``export_report`` pointing at them
(``runs:/<run_id>/export/<file>``).
"""

from __future__ import annotations

import logging
from pathlib import Path

from cdfkd.files import read_json
from cdfkd.tracking.mlflow_logger import MLflowLogger
from cdfkd.tracking.outbox import RUN_FILE

log = logging.getLogger(__name__)

ARTIFACT_DIR = "export"
#: export file role -> the model-version tag that points at it
VERSION_TAGS = {"fp32": "onnx", "int8": "onnx_int8", "report": "export_report"}


def log_export(run_dir: str | Path, files: dict[str, str], tracking_uri: str | None = None) -> dict:
    """Log ``files`` (role -> path, as ``cdfkd.export.export_run`` returns them) to the run
    folder's MLflow run and tag its registered versions.

    Returns ``{"run_id", "pending", "versions": ["name/version", ...]}``, or ``{"run_id":
    None, ...}`` when the run was never logged to MLflow (tracking off).
    """
    run_dir = Path(run_dir)
    if read_json(run_dir / RUN_FILE) is None:
        return {"run_id": None, "pending": 0, "versions": []}
    logger = MLflowLogger.open(run_dir, tracking_uri)
    for path in files.values():
        logger.log_artifact(path, ARTIFACT_DIR)
    pending = logger.pending_count()
    versions: list[str] = []
    if logger.run_id and not pending:
        versions = _tag_versions(logger, logger.run_id, files)
    return {"run_id": logger.run_id, "pending": pending, "versions": versions}


def _tag_versions(logger: MLflowLogger, run_id: str, files: dict[str, str]) -> list[str]:
    try:
        client = logger.client()
        found = client.search_model_versions(f"run_id = '{run_id}'")
        for v in found:
            for role, path in files.items():
                if role in VERSION_TAGS:
                    uri = f"runs:/{run_id}/{ARTIFACT_DIR}/{Path(path).name}"
                    client.set_model_version_tag(v.name, v.version, VERSION_TAGS[role], uri)
        return [f"{v.name}/{v.version}" for v in found]
    except Exception as err:  # the files are logged; the tags are a convenience
        log.warning("could not tag the registered versions of run %s: %s", run_id, err)
        return []
