"""``MLflowLogger``: the metric-logger interface on one MLflow run per run folder.

Every call becomes a record ``{"id", "kind", "time_ms", ...}`` that is sent at once when
MLflow answers. When it does not (server down, timeout, sqlite locked), that record and
every later one go to the folder's outbox (``cdfkd/tracking/outbox.py``) and are retried
at the next call after a growing delay: a dead server costs training one short failed
request per back-off period, never minutes of retries. ``cdfkd mlflow sync DIR``
replays what is left.

Replays are idempotent: metrics carry the step and timestamp of their record (MLflow
stores an identical metric once), params already logged with the same value are
skipped, tags and artifacts overwrite themselves, and sent record ids are written down.
"""

from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path
from typing import Any

from cdfkd.errors import ConfigError
from cdfkd.files import read_json, write_json_atomic
from cdfkd.tracking.export import example_batch, load_program, save_program, serving_module
from cdfkd.tracking.model_registry import log_student
from cdfkd.tracking.outbox import (
    MODEL_EXAMPLE,
    MODEL_PROGRAM,
    PENDING_FILE,
    RUN_FILE,
    Outbox,
    PermanentError,
    is_permanent,
)
from cdfkd.tracking.uri import (
    DEFAULT_EXPERIMENT,
    RetryPolicy,
    bound_http_requests,
    resolve_tracking_uri,
)

log = logging.getLogger(__name__)

_MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value


class MLflowLogger:
    """``MetricLogger`` writing to one MLflow run per run folder (created at the first call).

    ``parent_run_id`` (or ``parent_dir``, a folder whose ``mlflow_run.json`` names the
    parent once it exists) nests the run under a sweep's run. ``params`` and ``tags`` are
    logged with the first call. A folder that already has a run continues it; with
    ``identity_tags`` (a trial's id) a run carrying them under the same parent is
    continued too, when the folder lost its ``mlflow_run.json``.
    """

    def __init__(
        self,
        run_dir: str | Path,
        tracking_uri: str | None = None,
        experiment: str = DEFAULT_EXPERIMENT,
        *,
        run_name: str | None = None,
        parent_run_id: str | None = None,
        parent_dir: str | Path | None = None,
        params: dict | None = None,
        tags: dict | None = None,
        identity_tags: dict | None = None,
        log_models: bool = True,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.outbox = Outbox(self.run_dir)
        self.retry = retry or RetryPolicy()
        bound_http_requests(self.retry)
        self.log_models = log_models
        self._want: dict[str, Any] = {
            "tracking_uri": resolve_tracking_uri(tracking_uri),
            "experiment": experiment,
            "run_name": run_name,
            "parent_run_id": parent_run_id,
            "parent_dir": str(Path(parent_dir).resolve()) if parent_dir else None,
            "identity_tags": {k: str(v) for k, v in (identity_tags or {}).items()},
        }
        self._initial = (params or {}, tags or {})
        self._ident: dict[str, Any] = {}  # mlflow_run.json, once active
        self._active = False
        self._queue: list[dict] = []  # records not sent yet; each one also in the pending file
        self._on_disk: set[str] = set()
        self._client_obj = None
        self._next_try = 0.0
        self._delay = 0.0
        self._replaying = False
        self._prior_counts: dict[str, int] = {}  # key@step -> times earlier lives logged it
        self._life_counts: dict[str, int] = {}  # key@step -> times this life logged it

    @classmethod
    def open(cls, run_dir: str | Path, tracking_uri: str | None = None) -> MLflowLogger:
        """The logger of an existing run folder, for replaying its pending records."""
        ident = read_json(Path(run_dir) / RUN_FILE)
        if ident is None:
            raise ConfigError(
                f"{run_dir} has no readable {RUN_FILE}: it was never logged to MLflow"
            )
        lg = cls(run_dir, tracking_uri or ident["tracking_uri"], ident["experiment"])
        lg._replaying = True  # a server that moved: the given URI replaces the stored one
        return lg

    # -- the MetricLogger interface

    def log_params(self, params: dict) -> None:
        if params:
            self._emit("params", params={k: str(v)[:_MAX_PARAM_LENGTH] for k, v in params.items()})

    def set_tags(self, tags: dict) -> None:
        if tags:
            self._emit("tags", tags={k: str(v) for k, v in tags.items()})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Log numeric ``metrics`` at ``step``; a value an earlier life of this run folder
        already logged at that step is not logged again (see :meth:`_fresh`)."""
        values = {
            k: float(v)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        self._activate()
        values = self._fresh(values, int(step))
        if values:
            self._emit("metrics", step=int(step), metrics=values)
            # Counted once sent or in the outbox: a crash in between logs a value twice,
            # never loses one.
            write_json_atomic(self.run_dir / RUN_FILE, self._ident)

    def _fresh(self, values: dict[str, float], step: int) -> dict[str, float]:
        """Drop the values that replay what an earlier process logged for this run.

        A run resumed from a checkpoint (``--resume``, a trial restarted after its node
        was lost) computes the steps after that checkpoint again, and logs their
        evaluations a second time. The folder remembers how often each ``key@step`` was
        logged (``logged`` in mlflow_run.json); this life skips its first that-many
        occurrences, so the run's history holds every evaluation once, and a later
        second occurrence (the final full-test-set evaluation at the last step) still
        gets through.
        """
        logged = self._ident.setdefault("logged", {})
        fresh = {}
        for key, value in values.items():
            slot = f"{key}@{step}"
            seen = self._life_counts.get(slot, 0)
            self._life_counts[slot] = seen + 1
            if seen < self._prior_counts.get(slot, 0):
                continue
            logged[slot] = seen + 1
            fresh[key] = value
        if len(fresh) != len(values):
            log.info(
                "not logging %d value(s) at step %d again: an earlier run of %s logged them",
                len(values) - len(fresh),
                step,
                self.run_dir,
            )
        return fresh

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path).resolve()
        try:
            stored = str(path.relative_to(self.run_dir.resolve()))
        except ValueError:
            stored = str(path)
        self._emit("artifact", path=stored, artifact_path=artifact_path)

    def log_model(self, model, input_example, name: str = "student") -> None:
        """Log ``model`` (a classifier; (H, B, C) outputs are averaged over headers) for serving.

        ``input_example``: a batch (B, C, H, W); its first two images define the signature.
        """
        if not self.log_models:
            return
        self._emit(
            "model", name=name, _module=serving_module(model), _example=example_batch(input_example)
        )

    def close(self, status: str = "FINISHED") -> None:
        """End the run with ``status`` (FINISHED, FAILED or KILLED), one last try to send all."""
        if not self._active:
            return  # nothing was ever logged: no run to end
        self._emit("status", status=status, force=True)
        if self._queue:
            log.warning(
                "%d MLflow record(s) could not be sent; they are kept in %s: replay them with "
                "`cdfkd mlflow sync %s` once %s is reachable",
                len(self._queue),
                self.run_dir / PENDING_FILE,
                self.run_dir,
                self._ident["tracking_uri"],
            )

    # -- run identity

    @property
    def run_id(self) -> str | None:
        return self._ident.get("run_id")

    @property
    def model_uri(self) -> str | None:
        return self._ident.get("model_uri")

    @property
    def experiment_id(self) -> str | None:
        return self._ident.get("experiment_id")

    @property
    def tracking_uri(self) -> str:
        return str(self._ident["tracking_uri"] if self._active else self._want["tracking_uri"])

    @property
    def experiment(self) -> str:
        return str(self._ident["experiment"] if self._active else self._want["experiment"])

    def client(self):
        """An ``MlflowClient`` for this run's tracking (and registry) URI."""
        if self._client_obj is None:
            from mlflow import MlflowClient

            self._client_obj = MlflowClient(
                tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri
            )
        return self._client_obj

    def start(self) -> str | None:
        """Create (or continue) the run now, not at the first call; its id, None if unreachable."""
        self._activate()
        self._flush(force=True)
        return self.run_id

    def pending_count(self) -> int:
        """Records this folder still owes MLflow (its outbox, and this process's unsent ones)."""
        self._activate()
        return len(self._queue)

    def replay(self) -> dict:
        """Send this folder's pending records; returns {"sent", "pending", "rejected"} counts."""
        self._activate()
        before, rejected = len(self._queue), self.outbox.rejected_count()
        if self._queue:
            self._flush(force=True, blocking=True)
        return {
            "sent": before - len(self._queue),
            "pending": len(self._queue),
            "rejected": self.outbox.rejected_count() - rejected,
        }

    def _activate(self) -> None:
        if self._active:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        old = read_json(self.run_dir / RUN_FILE)
        want = self._want
        ident = {
            **want,
            "run_id": None,
            "experiment_id": None,
            "model_uri": None,
            "created_ms": int(time.time() * 1000),
        }
        if old is not None and (old.get("run_id") or self._replaying):
            # The folder's run exists (or is replayed as first meant): continue it.
            if (
                old.get("run_id")
                and old["tracking_uri"] != want["tracking_uri"]
                and not self._replaying
            ):
                raise ConfigError(
                    f"{self.run_dir} logs to MLflow run {old['run_id']} at "
                    f"{old['tracking_uri']}, not {want['tracking_uri']}: set the tracking URI "
                    f"back, or delete {RUN_FILE} to start a new run"
                )
            ident = {**ident, **old, "tracking_uri": want["tracking_uri"]}
        elif old is not None:
            ident["created_ms"] = old.get("created_ms", ident["created_ms"])
        self._ident, self._active = ident, True
        self._prior_counts = dict(ident.get("logged") or {})
        write_json_atomic(self.run_dir / RUN_FILE, ident)
        for rec in self.outbox.unsent():
            self._queue.append(rec)
            self._on_disk.add(rec["id"])
        if self._replaying:
            return
        params, tags = self._initial
        if old is not None:
            self._queue.append(self._record("status", status="RUNNING"))  # resumed: running again
        if params:
            self.log_params(params)
        if tags:
            self.set_tags(tags)

    def _ensure_run(self, client) -> str:
        ident = self._ident
        if ident.get("run_id"):
            return ident["run_id"]
        parent = ident.get("parent_run_id")
        if parent is None and ident.get("parent_dir"):
            parent = (read_json(Path(ident["parent_dir"]) / RUN_FILE) or {}).get("run_id")
            if parent is None:
                raise RuntimeError(f"the parent run of {ident['parent_dir']} does not exist yet")
        exp_id = _experiment_id(client, ident["experiment"])
        tags = {**(ident.get("identity_tags") or {})}
        if parent:
            tags["mlflow.parentRunId"] = parent
        found = []
        if ident.get("identity_tags"):
            # A trial restarted where its run folder is gone (a new Ray session, another
            # node) finds its run by tags rather than opening a second one.
            query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in sorted(tags.items()))
            found = client.search_runs([exp_id], filter_string=query, order_by=["start_time ASC"])
        if found:
            run = found[0]
            client.update_run(run.info.run_id, status="RUNNING")
        else:
            run = client.create_run(
                exp_id, start_time=ident["created_ms"], tags=tags, run_name=ident.get("run_name")
            )
        ident.update(run_id=run.info.run_id, experiment_id=exp_id, parent_run_id=parent)
        write_json_atomic(self.run_dir / RUN_FILE, ident)
        return run.info.run_id

    # -- records, sending, the outbox

    def _record(self, kind: str, **fields) -> dict:
        return {"id": uuid.uuid4().hex, "kind": kind, "time_ms": int(time.time() * 1000), **fields}

    def _emit(self, kind: str, force: bool = False, **fields) -> None:
        self._activate()
        self._queue.append(self._record(kind, **fields))
        self._flush(force=force)

    def _flush(self, force: bool = False, blocking: bool = False) -> None:
        if not self._queue:
            return
        if not force and time.monotonic() < self._next_try:
            self._persist()
            return
        with self.outbox.lock(blocking) as locked:
            if not locked:  # a sync is sending this folder right now
                self._persist()
                return
            sent = self.outbox.sent_ids()  # a sync may have sent some meanwhile
            self._queue = [r for r in self._queue if r["id"] not in sent]
            try:
                client = self.client()
                run_id = self._ensure_run(client) if self._queue else ""
                while self._queue:
                    rec = self._queue[0]
                    try:
                        self._send(client, run_id, rec)
                    except Exception as err:
                        if not is_permanent(err):
                            raise
                        self._reject(rec, err)
                    self._queue.pop(0)
                    if rec["id"] in self._on_disk:
                        self.outbox.mark_sent(rec["id"])
            except Exception as err:
                self._persist()
                self._back_off(err)
                return
        if self._delay:
            log.warning(
                "MLflow at %s is reachable again; buffered records sent",
                self._ident["tracking_uri"],
            )
        self._delay = 0.0

    def _back_off(self, err: Exception) -> None:
        first = self._delay == 0.0
        self._delay = (
            self.retry.first_delay_s if first else min(2 * self._delay, self.retry.max_delay_s)
        )
        self._next_try = time.monotonic() + self._delay
        msg = str(err).splitlines()[0][:300] if str(err) else type(err).__name__
        (log.warning if first else log.info)(
            "MLflow at %s failed (%s); training goes on, %d record(s) kept in %s, retry in %.0f s",
            self._ident["tracking_uri"],
            msg,
            len(self._queue),
            self.run_dir / PENDING_FILE,
            self._delay,
        )

    def _send(self, client, run_id: str, rec: dict) -> None:
        from mlflow.entities import Metric, Param, RunTag

        kind = rec["kind"]
        if kind == "params":
            have = client.get_run(run_id).data.params
            new = {k: v for k, v in rec["params"].items() if k not in have}
            changed = sorted(k for k, v in rec["params"].items() if k in have and have[k] != v)
            if changed:
                # MLflow keeps a param's first value; the change is recorded instead of failing.
                log.warning(
                    "params changed since this MLflow run started (kept the first values): %s",
                    changed,
                )
                client.set_tag(run_id, "params_changed", ",".join(changed)[:5000])
            if new:
                client.log_batch(run_id, params=[Param(k, v) for k, v in new.items()])
        elif kind == "tags":
            client.log_batch(run_id, tags=[RunTag(k, v) for k, v in rec["tags"].items()])
        elif kind == "metrics":
            metrics = [Metric(k, v, rec["time_ms"], rec["step"]) for k, v in rec["metrics"].items()]
            client.log_batch(run_id, metrics=metrics)
        elif kind == "artifact":
            path = self.run_dir / rec["path"]
            if not path.is_file():
                raise PermanentError(f"artifact {path} no longer exists")
            client.log_artifact(run_id, str(path), rec.get("artifact_path"))
        elif kind == "model":
            self._send_model(client, run_id, rec)
        elif kind == "status":
            if rec["status"] == "RUNNING":
                client.update_run(run_id, status="RUNNING")
            else:
                client.set_terminated(run_id, rec["status"], end_time=rec["time_ms"])
        else:
            raise PermanentError(f"unknown record kind {kind!r}")

    def _send_model(self, client, run_id: str, rec: dict) -> None:
        module, example = rec.get("_module"), rec.get("_example")
        if module is None or example is None:
            try:
                module, example = load_program(
                    self.run_dir / MODEL_PROGRAM, self.run_dir / MODEL_EXAMPLE
                )
            except (OSError, RuntimeError, ValueError) as err:
                raise PermanentError(f"saved student model cannot be read: {err}") from err
        uri = log_student(
            client,
            self._ident["tracking_uri"],
            self._ident["experiment_id"],
            run_id,
            module,
            example,
            name=rec.get("name", "student"),
        )
        self._ident["model_uri"] = uri
        write_json_atomic(self.run_dir / RUN_FILE, self._ident)

    def _persist(self) -> None:
        new = [r for r in self._queue if r["id"] not in self._on_disk]
        for rec in new:
            if rec["kind"] == "model" and "_module" in rec:
                # Saved as a torch.export program (no pickle), so a later sync can log it.
                save_program(
                    rec["_module"],
                    rec["_example"],
                    self.run_dir / MODEL_PROGRAM,
                    self.run_dir / MODEL_EXAMPLE,
                )
        self.outbox.add(new)
        self._on_disk.update(r["id"] for r in new)

    def _reject(self, rec: dict, err: Exception) -> None:
        log.warning(
            "MLflow refused a %s record for good (%s); it is kept in %s",
            rec["kind"],
            str(err).splitlines()[0][:300],
            self.run_dir / "mlflow_rejected.jsonl",
        )
        self.outbox.reject(rec, err)


def _experiment_id(client, name: str) -> str:
    """The id of experiment ``name``, created when missing."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name)
        except Exception:  # created meanwhile by another trial
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        raise RuntimeError(
            f"MLflow experiment {name!r} is deleted: restore it with "
            "`mlflow experiments restore` or log to another experiment"
        )
    return exp.experiment_id
