"""The one place a sweep is set up: spec -> Ray -> Tuner(OptunaSearch, ASHA) -> results.csv."""

from __future__ import annotations

import csv
import logging
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cdfkd.errors import ConfigError
from cdfkd.metrics import RESULT_METRICS, pareto_front
from cdfkd.runs import ensure_writable

log = logging.getLogger(__name__)

RESULTS_CSV = "results.csv"
#: the sweep folder's record of what the sweep started with (its teacher ensemble)
SWEEP_JSON = "sweep.json"


def connect_ray(address: str | None, num_cpus: int | None = None) -> None:
    """Start an embedded local Ray, or join a cluster with a clear error when that fails."""
    import ray

    if ray.is_initialized():
        return
    quiet: dict[str, Any] = {
        "include_dashboard": False,
        "log_to_driver": False,
        "logging_level": logging.ERROR,
        # OpenMP threads spin-waiting on shared cores slow torch down many times over.
        "runtime_env": {"env_vars": {"OMP_WAIT_POLICY": "PASSIVE", "TQDM_DISABLE": "1"}},
    }
    if address is None:
        ray.init(num_cpus=num_cpus, **quiet)
        return
    if address != "auto":
        _probe(address)
    from ray.exceptions import AuthenticationError

    try:
        ray.init(address=address, **quiet)
    except (ConnectionError, RuntimeError, AuthenticationError) as err:
        raise ConfigError(
            f"could not connect to the Ray cluster at {address!r} ({err}).{_auth_hint(err)}"
        ) from None


def _auth_hint(err: BaseException) -> str:
    """What to do about a refused connection, from the error chain and RAY_AUTH_MODE."""
    chain: list[str] = []
    seen: BaseException | None = err
    while seen is not None:
        chain.append(f"{type(seen).__name__}: {seen}")
        seen = seen.__cause__ or seen.__context__
    text = " ".join(chain)
    where = "~/.ray/auth_token, RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN"
    if os.environ.get("RAY_AUTH_MODE") != "token":
        return (
            " Ray 2.60 clusters use token authentication: export RAY_AUTH_MODE=token and make "
            f"the cluster's token available ({where})."
        )
    if "InvalidAuthToken" in text or "AuthenticationError" in text or "token" in text.lower():
        return (
            f" The cluster refused this client's token: use the cluster's own token ({where}; "
            "`ray get-auth-token` on the head prints it), readable by this user."
        )
    return ""


def _probe(address: str, timeout: float = 3.0) -> None:
    """Fail fast when nothing listens at HOST:PORT (ray.init would retry for minutes)."""
    import socket

    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--address {address!r} is not auto, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as err:
        raise ConfigError(
            f"nothing answers at {hostport} ({err}): start the cluster there (`ray start --head`, or "
            "`ray up cluster.yaml`) or pass the head node's address"
        ) from None


def ensure_teachers(spec, base: dict, progress: Callable[[str], None]) -> str:
    """The base config's ensemble folder; trained (and cached there) when missing and the spec says how."""
    from cdfkd.device import resolve_device
    from cdfkd.teachers import TeacherTrainConfig, train_ensemble

    path = Path(base["teachers"]["path"])
    if (path / "ensemble.json").is_file():
        return str(path)
    if spec.teachers_train is None:
        raise ConfigError(
            f"no teacher ensemble at {path}: train one with `cdfkd teachers train --out {path} ...` "
            "or add a teachers_train section to the sweep spec"
        )
    t = spec.teachers_train
    progress(
        f"training {t.count} {t.arch} teachers on {t.dataset} into {path} (cached for later sweeps)"
    )
    cfg = TeacherTrainConfig.for_dataset(
        t.dataset, t.arch, count=t.count, epochs=t.epochs, seed=t.seed
    )
    train_ensemble(
        cfg, path, resolve_device("auto"), data_root=base.get("data", {}).get("root", "data")
    )
    return str(path)


def ensure_validation(spec, base: dict, ensemble, progress: Callable[[str], None]):
    """The teachers' synthetic validation set (``selection_score``): read from their folder
    (hash verified), or built there first with ``spec.validation_set`` and cached for
    later sweeps and ``cdfkd distill``. An altered set is refused with the fix."""
    from cdfkd.selection import ensure_validation_set

    return ensure_validation_set(
        base["teachers"]["path"], ensemble, spec.validation_set, progress=progress
    )


def _searcher(spec, base: dict, exp_dir: Path):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    from cdfkd.tune.space import DefineByRunSpace, ResumableOptunaSearch, make_sampler

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    obj = spec.objective
    metric = [obj.metric, obj.second_metric] if obj.multi else obj.metric
    mode = [obj.mode, obj.second_mode] if obj.multi else obj.mode
    exp_dir.mkdir(parents=True, exist_ok=True)
    # A journal file keeps the study (and the Pareto front) readable after the run.
    storage = JournalStorage(JournalFileBackend(str(exp_dir / "optuna.log")))
    return ResumableOptunaSearch(
        DefineByRunSpace(spec.search, base),
        metric=metric,
        mode=mode,
        sampler=make_sampler(spec),
        study_name=spec.name,
        storage=storage,
        points_to_evaluate=spec.points_to_evaluate or None,
    )


def run_sweep(
    spec_path: str | Path,
    *,
    address: str | None = None,
    resume: bool = False,
    name: str | None = None,
    write: Callable[[str], None] | None = None,
    callbacks: list | None = None,
    trust: list[str] | None = None,
) -> dict:
    """Run (or resume) a sweep; returns {"experiment_dir", "rows", "best" or "pareto"}.

    ``callbacks``: more ``ray.tune.Callback`` objects, beside the progress table.
    ``trust``: modules whose model builders (``arch: package.module:function``) this
    sweep may import, in the driver and in every trial (``cdfkd sweep --trust``).
    """
    from ray import tune

    from cdfkd.models import trust_modules
    from cdfkd.teachers import ensemble_to_numpy, load_ensemble
    from cdfkd.tune.mlflow_sweep import finish_sweep, start_parent
    from cdfkd.tune.progress import ProgressTable
    from cdfkd.tune.spec import load_spec
    from cdfkd.tune.trainable import distill_trainable

    trust_modules(*(trust or []))
    write = write or (lambda line: print(line, file=sys.stderr))
    spec, base = load_spec(spec_path)
    if name:
        spec.name = name
    exp_dir = Path(spec.storage_path) / spec.name
    if resume and not tune.Tuner.can_restore(str(exp_dir)):
        raise ConfigError(
            f"--resume: no sweep to resume at {exp_dir}; run without --resume to start it"
        )
    if not resume and exp_dir.exists() and any(exp_dir.glob("experiment_state-*.json")):
        raise ConfigError(
            f"sweep {spec.name!r} already exists at {exp_dir}: pass --resume or --name NEW_NAME"
        )
    # Before teachers are trained or Ray starts: a folder no trial could write to fails
    # here, and leaves nothing a later --resume would take for a sweep.
    ensure_writable(exp_dir)

    ensure_teachers(spec, base, write)
    ensemble = load_ensemble(base["teachers"]["path"], "cpu")  # hashes verified
    check_sweep_teachers(exp_dir, base["teachers"]["path"], ensemble.manifest, resume)
    validation = ensure_validation(spec, base, ensemble, write)
    connect_ray(address)
    parent, mlflow_ctx = start_parent(spec, base, exp_dir)
    objective = spec.objective.model_dump()
    res = spec.resources
    resources = {"cpu": res.cpu, "gpu": res.gpu, **res.custom}
    # One put: every trial reads the same read-only numpy weights from the object store.
    trainable = tune.with_resources(
        tune.with_parameters(
            distill_trainable,
            base=base,
            teachers=ensemble_to_numpy(ensemble),
            objective=objective,
            resources=resources,
            exp_dir=str(exp_dir.resolve()),
            mlflow=mlflow_ctx,
            validation=validation.to_numpy(),
            trusted=list(trust or []),
        ),
        resources,
    )
    table = ProgressTable(spec, write)
    if resume:
        write(f"resuming sweep {spec.name} from {exp_dir}")
        tuner = restore_tuner(exp_dir, trainable, callbacks=[table, *(callbacks or [])])
    else:
        scheduler = None
        tc_metric = tc_mode = None
        if spec.scheduler.type == "asha":
            from ray.tune.schedulers import ASHAScheduler

            evals = max(
                1,
                math.ceil(
                    base.get("train", {}).get("steps", 1000)
                    / base.get("train", {}).get("eval_every", 200)
                ),
            )
            scheduler = ASHAScheduler(
                time_attr="training_iteration",
                max_t=evals + 1,
                grace_period=spec.scheduler.grace_period,
                reduction_factor=spec.scheduler.reduction_factor,
            )
            tc_metric, tc_mode = spec.objective.metric, spec.objective.mode
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=_searcher(spec, base, exp_dir),
                scheduler=scheduler,
                metric=tc_metric,
                mode=tc_mode,
                num_samples=spec.num_samples,
                max_concurrent_trials=spec.max_concurrent_trials,
                # A trial worker keeps torch, the engine and MLflow imported for
                # the next trial: seconds of start-up per trial otherwise.
                reuse_actors=True,
            ),
            run_config=tune.RunConfig(
                name=spec.name,
                storage_path=spec.storage_path,
                verbose=0,
                callbacks=[table, *(callbacks or [])],
                failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            ),
        )
    try:
        grid = tuner.fit()
    except BaseException as err:
        if parent is not None:
            parent.close("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise
    rows = result_rows(grid, spec)
    write_results_csv(rows, exp_dir / RESULTS_CSV)
    summary: dict[str, Any] = {"experiment_dir": str(exp_dir), "rows": rows}
    done = [r for r in rows if r["status"] == "COMPLETE"]
    if spec.objective.multi:
        summary["pareto"] = front_rows(done, spec.objective)
    elif done:
        sign = 1 if spec.objective.mode == "max" else -1
        summary["best"] = max(done, key=lambda r: sign * r[spec.objective.metric])
    finish_sweep(parent, spec, summary, exp_dir, write)
    table.final(summary)
    return summary


def result_rows(grid, spec) -> list[dict]:
    """A row per trial: id, status, sampled params, final metrics, error."""
    rows = []
    for result in grid:
        m = result.metrics or {}
        if result.error is not None:
            status = "ERROR"
        elif m.get("failed"):
            status = "FAILED_" + str(m.get("failure", "nonfinite")).upper()
        elif m.get("done_final"):
            status = "COMPLETE"
        else:
            status = "STOPPED_EARLY"  # ASHA: its value comes from a shorter budget
        row = {"trial_id": m.get("trial_id") or Path(result.path).name, "status": status}
        row.update({f"param:{k}": v for k, v in (result.config or {}).items()})
        for key in (
            *RESULT_METRICS,
            "step",
            "loop_seconds",
            "time_total_s",
            "steps_per_second",
            "teachers_shared",
            "node_id",
        ):
            row[key] = m.get(key)
        row["error"] = m.get("error") or (str(result.error).splitlines()[0] if result.error else "")
        row["path"] = result.path
        rows.append(row)
    return rows


def write_results_csv(rows: list[dict], path: Path) -> None:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def check_sweep_teachers(exp_dir: Path, path: str, manifest: dict, resume: bool) -> None:
    """Record the sweep's teacher ensemble in ``exp_dir/sweep.json``; on ``--resume``,
    refuse teachers that changed since the sweep started (trials before and after
    would have learned from different ensembles)."""
    from cdfkd.files import read_json, write_json_atomic
    from cdfkd.teachers import ensemble_id

    record = exp_dir / SWEEP_JSON
    now = ensemble_id(manifest)
    started = (read_json(record) or {}).get("ensemble_id") if resume else None
    if started is not None and started != now:
        raise ConfigError(
            f"--resume: the teacher ensemble {path} changed since sweep {exp_dir.name} started "
            f"(ensemble id {now}, was {started}): restore its files, or start a new sweep "
            "with --name NEW_NAME"
        )
    if started is None:
        write_json_atomic(record, {"ensemble_id": now, "teachers_path": str(path)})


def front_rows(rows: list[dict], objective) -> list[dict]:
    """The rows on the Pareto front of (metric, mode) x (second_metric, second_mode)."""
    keys = (objective.metric, objective.second_metric)
    maximize = (objective.mode == "max", objective.second_mode == "max")
    on_front = pareto_front([tuple(float(r[k]) for k in keys) for r in rows], maximize)
    front = [r for r, keep in zip(rows, on_front, strict=True) if keep]
    sign = 1 if maximize[1] else -1
    return sorted(front, key=lambda r: sign * r[keys[1]])


def restore_tuner(exp_dir: Path, trainable, callbacks: list):
    """``Tuner.restore`` that also sets the run's callbacks.

    Ray 2.60's ``restore`` keeps the pickled ``RunConfig`` of the first run and takes no
    callbacks, so they are set on the private ``_local_tuner`` here, the one place that
    reaches into it (``tests/test_tune.py`` pins the behaviour).
    """
    from ray import tune

    tuner = tune.Tuner.restore(str(exp_dir), trainable, resume_unfinished=True, resume_errored=True)
    tuner._local_tuner._run_config.callbacks = callbacks  # type: ignore[union-attr]
    return tuner
