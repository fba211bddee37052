"""MLflow around a sweep: the parent run, what each trial is told, and the wrap-up.

The driver opens one parent run per sweep (``<experiment dir>/mlflow_run.json`` keeps
its id, so ``--resume`` continues it). Each trial gets the absolute tracking URI, the
experiment and the parent's id, and opens its own nested child run from its worker,
on whatever node it runs. At the end the driver replays what trials could not send,
ends child runs a stopped or killed trial left RUNNING, registers the best student (or
every Pareto point) and closes the parent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from cdfkd.runs import STUDENT
from cdfkd.teachers import ensemble_id_of_dir
from cdfkd.tracking.mlflow_logger import MLflowLogger
from cdfkd.tracking.model_registry import log_run_student, register_student
from cdfkd.tracking.protocol import flatten
from cdfkd.tracking.sync import sync_runs
from cdfkd.tracking.tags import standard_tags
from cdfkd.tracking.uri import resolve_tracking_uri

log = logging.getLogger(__name__)

#: MLflow status of a child run left RUNNING, by the trial's status in results.csv
_END_STATUS = {
    "COMPLETE": "FINISHED",
    "STOPPED_EARLY": "KILLED",
    "ERROR": "FAILED",
    "FAILED_NONFINITE": "FAILED",
    "FAILED_TEACHERS_CHANGED": "FAILED",
}


def start_parent(spec, base: dict, exp_dir: Path) -> tuple[MLflowLogger | None, dict | None]:
    """The parent run (created or continued) and the dict every trial gets; (None, None) if off."""
    ml = spec.mlflow
    if not ml.enabled:
        return None, None
    uri = resolve_tracking_uri(ml.tracking_uri)
    experiment = ml.experiment or spec.name
    teachers_id = ensemble_id_of_dir(base["teachers"]["path"])
    params = flatten(spec.model_dump(mode="json", exclude={"base_config", "mlflow"}))
    if teachers_id:
        params["teachers.ensemble_id"] = teachers_id
    tags = standard_tags(
        "sweep",
        teachers_id,
        sweep=spec.name,
        method=base.get("method", {}).get("name"),
        dataset=base.get("data", {}).get("name"),
    )
    parent = MLflowLogger(exp_dir, uri, experiment, run_name=spec.name, params=params, tags=tags)
    parent.start()
    trial = {
        "tracking_uri": uri,
        "experiment": experiment,
        "parent_run_id": parent.run_id,
        "parent_dir": str(Path(exp_dir).resolve()),
        "sweep": spec.name,
        "teachers_id": teachers_id,
        "log_trial_models": ml.log_trial_models,
    }
    return parent, trial


def trial_logger(
    ctx: dict, run_dir: Path, trial_id: str, trial_name: str, log_models: bool
) -> MLflowLogger:
    """A trial's child run, continued after a restart.

    The run is found again through ``run_dir/mlflow_run.json`` (the trainable carries it
    in Tune checkpoints) or, failing that, through its ``trial_id`` tag under the parent.
    """
    tid = ctx.get("teachers_id")
    return MLflowLogger(
        run_dir,
        ctx["tracking_uri"],
        ctx["experiment"],
        run_name=trial_name,
        parent_run_id=ctx.get("parent_run_id"),
        parent_dir=ctx.get("parent_dir"),
        params={"teachers.ensemble_id": tid} if tid else None,
        tags=standard_tags("trial", tid, sweep=ctx["sweep"], trial_id=trial_id),
        identity_tags={"trial_id": trial_id},
        log_models=log_models,
    )


def finish_sweep(
    parent: MLflowLogger | None, spec, summary: dict, exp_dir: Path, write: Callable[[str], None]
) -> None:
    """Replay pending records, end orphaned child runs, register students, close the parent."""
    if parent is None:
        return
    uri = parent.tracking_uri
    try:
        left = sum(r["pending"] for r in sync_runs(exp_dir))
        if left:
            write(
                f"MLflow: {left} record(s) still pending; send them later with "
                f"`cdfkd mlflow sync {exp_dir}`"
            )
        if parent.run_id is None:
            parent.start()
        if parent.run_id is not None:
            children = _child_runs(parent)
            _end_orphans(parent, children, summary["rows"])
            _register(parent, spec, summary, children, write)
    except Exception as err:  # tracking must never fail a finished sweep
        log.warning("MLflow wrap-up of sweep %s failed: %s", spec.name, err)
        write(
            f"MLflow wrap-up failed ({str(err).splitlines()[0][:200]}); "
            f"results are in {exp_dir}; `cdfkd mlflow sync {exp_dir}` sends what is pending"
        )
    rows = summary["rows"]
    metrics = {"trials": len(rows), "trials_complete": sum(r["status"] == "COMPLETE" for r in rows)}
    best = summary.get("best")
    if best is not None:
        metrics.update(
            {
                f"best/{k}": best[k]
                for k in (spec.objective.metric, "student_params", "student_macs")
                if isinstance(best.get(k), (int, float))
            }
        )
        parent.set_tags({"best_trial_id": best["trial_id"]})
    parent.log_metrics(metrics, step=0)
    csv_path = Path(exp_dir) / "results.csv"
    if csv_path.is_file():
        parent.log_artifact(csv_path)
    parent.close("FINISHED")
    if parent.run_id:
        write(f"MLflow: sweep run {parent.run_id} in experiment {parent.experiment} at {uri}")


def _child_runs(parent: MLflowLogger) -> dict:
    """trial_id -> the child Run of every trial of this sweep."""
    client = parent.client()
    runs = client.search_runs(
        [parent.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.run_id}'",
        max_results=5000,
    )
    return {r.data.tags.get("trial_id"): r for r in runs}


def _end_orphans(parent: MLflowLogger, children: dict, rows: list[dict]) -> None:
    # After fit() no trial runs: a RUNNING child belongs to a trial ASHA stopped or Ray killed.
    status = {r["trial_id"]: _END_STATUS.get(r["status"], "KILLED") for r in rows}
    client = parent.client()
    for trial_id, run in children.items():
        if run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, status.get(trial_id, "KILLED"))


def _register(
    parent: MLflowLogger, spec, summary: dict, children: dict, write: Callable[[str], None]
) -> None:
    if "pareto" in summary:
        picks = [(f"pareto-{i}", row) for i, row in enumerate(summary["pareto"])]
    else:
        picks = [("best", summary["best"])] if summary.get("best") else []
    name = spec.mlflow.register_name or f"{spec.name}-best"
    uri = parent.tracking_uri
    obj = spec.objective
    for alias, row in picks:
        run = children.get(row["trial_id"])
        if run is None:
            write(f"MLflow: no run for trial {row['trial_id']}; its student is not registered")
            continue
        model_uri = _model_uri(parent, run, Path(row["path"]) / "run")
        tags = {"sweep": spec.name, "trial_id": row["trial_id"], obj.metric: row.get(obj.metric)}
        if obj.second_metric:
            tags[obj.second_metric] = row.get(obj.second_metric)
        version = register_student(
            model_uri,
            name,
            tracking_uri=uri,
            run_id=run.info.run_id,
            tags={k: str(v) for k, v in tags.items()},
            alias=alias,
        )
        write(
            f"MLflow: registered {name} version {version} (@{alias}) from trial {row['trial_id']}"
        )


def _model_uri(parent: MLflowLogger, run, run_dir: Path) -> str:
    """The trial's logged student; logged now from student.pt + config.yaml if it has none."""
    outputs = run.outputs.model_outputs if run.outputs is not None else []
    if outputs:
        return f"models:/{outputs[-1].model_id}"
    if not (run_dir / STUDENT).is_file():
        raise FileNotFoundError(
            f"trial run {run.info.run_id} logged no model and {run_dir / STUDENT} "
            "is not on this machine: enable tracking.log_model or use shared storage"
        )
    return log_run_student(
        parent.client(), parent.tracking_uri, run.info.experiment_id, run.info.run_id, run_dir
    )
