"""One Tune trial = one generator-student trainer running the engine's own ``run``."""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
from pathlib import Path

import ray
import torch
from ray import tune

from cdfkd.config import apply_values, build_config
from cdfkd.device import resolve_device
from cdfkd.errors import NonFiniteLossError
from cdfkd.metrics import RESULT_METRICS
from cdfkd.runs import RunDir
from cdfkd.tracking.outbox import MLFLOW_FILES, pack_state, unpack_state
from cdfkd.train import run

log = logging.getLogger(__name__)

#: reported when a trial fails with a non-finite loss, so the searcher sees a bad value
FAILED_VALUE = {"max": 0.0, "min": math.inf}


def trial_config(base: dict, sampled: dict, resources: dict) -> dict:
    """The distill config of one trial: base + sampled keys + what the trial's resources dictate."""
    raw = apply_values(base, sampled)
    train = raw.setdefault("train", {})
    # Tune checkpoints are taken at evaluations, so the two cadences must agree.
    train["checkpoint_every"] = train.get("eval_every", 200)
    train["device"] = "auto" if resources.get("gpu", 0) > 0 else "cpu"
    train["threads"] = max(1, int(resources.get("cpu", 1)))
    return raw


def distill_trainable(
    config: dict,
    *,
    base: dict,
    teachers,
    objective: dict,
    resources: dict,
    exp_dir: str,
    mlflow: dict | None = None,
    validation: dict | None = None,
    trusted: list[str] | None = None,
) -> None:
    """Tune function trainable. ``teachers`` arrives through the object store (numpy, zero-copy),
    and so does ``validation``, the ensemble's synthetic validation set
    (``ValidationSet.to_numpy()``) that ``selection_score`` is computed on.

    The run folder is ``exp_dir/<trial folder>/run``, in the sweep's storage (shared between
    nodes on a cluster), not in Ray's per-session folders: Ray leaves a reused actor's trial
    folder, and every remote node's, out of the experiment folder.

    ``mlflow``: tracking URI, experiment and parent run from the driver (None: no tracking);
    the trial logs to its own child run, kept in ``run/mlflow_run.json`` across restarts.

    ``trusted``: the modules the driver was told to trust (``cdfkd sweep --trust``), whose
    model builders a user-module ``arch`` imports; trust is per process, so every trial
    is given it again.
    """
    from cdfkd.models import trust_modules
    from cdfkd.teachers import ensemble_from_numpy

    trust_modules(*(trusted or []))
    from cdfkd.teachers.validation import ValidationSet

    raw = trial_config(base, config, resources)
    cfg = build_config(raw, source="trial config")
    changed = teachers_changed(cfg.teachers.path, teachers["manifest"])
    if changed:
        # Deterministic, like a NaN loss: a retry would find the same files. The trial
        # ends with the reason and the sweep goes on (results.csv: FAILED_TEACHERS_CHANGED).
        tune.report(failure_result(objective, "teachers_changed", changed))
        return
    torch.set_num_threads(cfg.train.threads or 1)  # trial_config always sets it
    device = resolve_device(cfg.train.device)
    ensemble = ensemble_from_numpy(teachers, device)
    shared = 1.0 if shares_memory(ensemble, teachers) else 0.0
    node_id = ray.get_runtime_context().get_node_id()

    out = Path(exp_dir) / Path(tune.get_context().get_trial_dir()).name / "run"
    run_dir = RunDir(out)
    resume = False
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        # Tune's checkpoint is the truth: the run folder may hold a newer one
        # that the (killed) driver never recorded.
        with checkpoint.as_directory() as d:
            run_dir.restore_checkpoint_from(Path(d))
            # A run folder lost with its node, or a copied experiment folder, lacks the
            # MLflow state: bring back which run it logs to and what it still owes.
            unpack_state(Path(d), out)
        resume = True
    elif out.exists():
        # Restarted from scratch: a fresh run folder, but the same MLflow run and its outbox.
        for path in out.iterdir():
            if path.is_dir():
                shutil.rmtree(path)
            elif path.name not in MLFLOW_FILES:
                path.unlink()

    # Every report carries the student's size: a second objective and the
    # progress table read it from intermediate results too.
    sizes = student_size(cfg, ensemble.info)

    def report(step: int, metrics: dict, run_dir: Path) -> None:
        payload = {**metrics, **sizes, "step": step, "teachers_shared": shared, "node_id": node_id}
        with tempfile.TemporaryDirectory() as tmp:
            RunDir(run_dir).copy_checkpoint_to(Path(tmp))
            pack_state(run_dir, Path(tmp))
            tune.report(payload, checkpoint=tune.Checkpoint.from_directory(tmp))

    ml = None
    if mlflow:
        from cdfkd.tune.mlflow_sweep import trial_logger

        ctx = tune.get_context()
        log_model = cfg.tracking.log_model and bool(mlflow.get("log_trial_models"))
        ml = trial_logger(mlflow, out, ctx.get_trial_id(), ctx.get_trial_name(), log_model)
    try:
        result = run(
            cfg,
            out,
            logger=ml,
            resume=resume,
            teachers=ensemble,
            on_eval=report,
            validation=None if validation is None else ValidationSet.from_numpy(validation),
        )
    except NonFiniteLossError as err:
        if ml is not None:
            ml.close("FAILED")
        # Deterministic: a retry would fail the same way. Finish the trial with a
        # bad objective value and the reason, so the sweep goes on.
        tune.report(failure_result(objective, "nonfinite", str(err)))
        return
    except BaseException as err:
        # SystemExit: Tune stopping the trial (ASHA); anything else fails it (Tune may retry).
        if ml is not None:
            ml.close("KILLED" if isinstance(err, (KeyboardInterrupt, SystemExit)) else "FAILED")
        raise
    if ml is not None:
        ml.close("FINISHED")
    final = {
        **{k: result[k] for k in RESULT_METRICS if result.get(k) is not None},
        "loop_seconds": result["loop_seconds"],
        "steps_per_second": result["steps"] / max(result["loop_seconds"], 1e-9),
        "step": result["steps"],
        "done_final": 1.0,
        "teachers_shared": shared,
        "node_id": node_id,
    }
    tune.report(final)


def failure_result(objective: dict, kind: str, error: str) -> dict:
    """The last result of a trial that failed for a reason no retry can fix: a bad
    objective value for the searcher, ``failure`` (``nonfinite``, ``teachers_changed``)
    and the reason."""
    return {
        objective["metric"]: FAILED_VALUE[objective["mode"]],
        "failed": 1.0,
        "failure": kind,
        "error": error,
    }


def teachers_changed(path: str, manifest: dict) -> str | None:
    """Why the ensemble folder no longer holds the teachers the sweep started with, or None.

    The trial trains on the weights the driver verified and shipped; this checks the
    folder those weights came from, where this node can read it (on a cluster without
    a shared file system it cannot, and the shipped weights are all there is).
    """
    from cdfkd.teachers import changed_teachers

    if not (Path(path) / "ensemble.json").is_file():
        return None
    problems = changed_teachers(path, manifest)
    if not problems:
        return None
    return (
        f"the teacher ensemble {path} changed since the sweep started: "
        + "; ".join(problems)
        + ". Its trials would not match the teachers on disk: restore the files, or start "
        "a new sweep (--name NEW_NAME) on the new teachers"
    )


def student_size(cfg, info) -> dict:
    """Parameters and MACs of the student this config builds."""
    from cdfkd.models import count_macs, count_params

    s = cfg.student
    student = s.build(info.num_classes, info.channels, info.image_size)
    shape = (1, info.channels, info.image_size, info.image_size)
    return {"student_params": count_params(student), "student_macs": count_macs(student, shape)}


def shares_memory(ensemble, payload: dict) -> bool:
    """True when every teacher tensor is a view of the object-store arrays (no per-trial copy)."""
    for teacher, arrays in zip(ensemble.teachers, payload["weights"], strict=True):
        for name, tensor in teacher.state_dict().items():
            if tensor.data_ptr() != arrays[name].ctypes.data:
                return False
    return True
