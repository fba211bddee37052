"""Read runs from an MLflow tracking store into pandas (the only module here that calls MLflow).

Everything here only reads: no run, experiment or database is created. The
runs of the chosen experiments become one frame with a row per run:

- identity columns (:data:`ID_COLUMNS`): ``experiment``, ``run_id``, ``status``,
  ``run_kind`` and the contract tags (``method``, ``dataset``, ``reference``, ...);
- a column per metric, named as logged (``relative_accuracy``, ``loss/adv``), holding
  its latest value;
- a column ``param:<dotted key>`` per parameter (``param:method.alpha``), the
  same vocabulary as the sweep's ``results.csv``; values are typed back from
  MLflow's strings (int, float, or str; ``"None"`` becomes missing).
"""

from __future__ import annotations

import logging
import os
import shutil
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from cdfkd.errors import ConfigError

log = logging.getLogger(__name__)

#: tags of the logging contract kept as plain columns
CONTRACT_TAGS = (
    "run_kind",
    "method",
    "dataset",
    "reference",
    "sweep",
    "trial_id",
    "teacher_ensemble_hash",
    "git_commit",
    "cdfkd_version",
)
ID_COLUMNS = [
    "experiment",
    "run_id",
    "run_name",
    "status",
    "run_kind",
    "method",
    "dataset",
    "reference",
    "seed",
    "sweep",
    "trial_id",
    "parent_run_id",
    "start_time",
    "end_time",
]
PARAM = "param:"
_PARENT_TAG = "mlflow.parentRunId"
_FIX = (
    "pass --tracking-uri with the store the runs were logged to (default: $MLFLOW_TRACKING_URI, "
    "else sqlite:///mlflow.db in the working directory)"
)


class ReportError(ConfigError):
    """A report cannot be built; the message names the problem and the fix."""


@dataclass
class RunSet:
    """The runs a report reads: ``trials`` (trial and distill runs) and ``parents`` (sweep runs)."""

    uri: str
    experiments: dict[str, str]  # name -> experiment id, in the order asked for
    trials: pd.DataFrame
    parents: pd.DataFrame
    client: Any  # mlflow.MlflowClient, for histories and artifacts


def open_store(tracking_uri: str | None):
    """``(MlflowClient, resolved uri)`` after checking the store exists or the server answers.

    The URI is resolved as the loggers resolve it (``cdfkd.tracking.uri``): None
    means ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` in the working
    directory; a bare ``*.db`` path is a sqlite store.
    """
    import mlflow

    from cdfkd.tracking.uri import bound_http_requests, resolve_tracking_uri

    bound_http_requests()
    uri = resolve_tracking_uri(tracking_uri)
    check_store(uri)
    return mlflow.MlflowClient(tracking_uri=uri), uri


def check_store(uri: str, timeout: float = 5.0) -> None:
    """Raise :class:`ReportError` for a server that does not answer or a missing local store.

    Done before MLflow sees the URI: its HTTP client retries for minutes, and a
    missing sqlite file would be created empty rather than reported.
    """
    parsed = urllib.parse.urlparse(uri)
    scheme = parsed.scheme.lower()
    if scheme in ("http", "https"):
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()
        except urllib.error.HTTPError:
            return  # it answered; auth or a proxy may refuse /health, MLflow's own calls will tell
        except (urllib.error.URLError, OSError, ValueError) as err:
            reason = getattr(err, "reason", err)
            raise ReportError(
                f"cannot reach the MLflow tracking server at {uri} ({reason}): start it, e.g. "
                "`mlflow server --backend-store-uri sqlite:///mlflow.db --port 5000`, or "
                "pass --tracking-uri sqlite:///path/to/mlflow.db to read a local store directly"
            ) from None
    elif scheme == "sqlite":
        # sqlite:///rel.db is relative to the working directory, sqlite:////abs.db absolute
        path = uri[len("sqlite:///") :].split("?")[0] if uri.startswith("sqlite:///") else ""
        if path and path != ":memory:" and not Path(path).is_file():
            raise ReportError(
                f"no MLflow store at {uri}: {Path(path).resolve()} does not exist; {_FIX}"
            )
    elif scheme in ("", "file") and len(scheme) != 1:  # len 1: a Windows drive letter
        folder = Path(urllib.parse.unquote(parsed.path) if scheme == "file" else uri)
        if not folder.is_dir():
            raise ReportError(
                f"no MLflow store at {uri}: {folder.resolve()} is not a folder; {_FIX}"
            )


@contextmanager
def _store_errors(uri: str, doing: str):
    # MLflow raises its own, SQLAlchemy's and requests' exceptions; the user needs
    # to know which store failed and what to do, not which library noticed.
    try:
        yield
    except ReportError:
        raise
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ReportError(
            f"cannot {doing} from the MLflow store at {uri} ({type(err).__name__}: {first}); "
            f"check that it is an MLflow store this mlflow version can read "
            f"(`mlflow db upgrade {uri}` for an old schema) or {_FIX}"
        ) from err


def find_experiments(client, uri: str, names: list[str]) -> dict[str, str]:
    """``{name: experiment_id}``; an unknown name is an error listing the known experiments."""
    from mlflow.entities import ViewType

    found: dict[str, str] = {}
    with _store_errors(uri, "list experiments"):
        for name in names:
            exp = client.get_experiment_by_name(name)
            if exp is not None and exp.lifecycle_stage == "active":
                found[name] = exp.experiment_id
                continue
            known = sorted(
                e.name for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY)
            )
            deleted = " (it was deleted: `mlflow experiments restore`)" if exp is not None else ""
            raise ReportError(
                f"no MLflow experiment named {name!r} at {uri}{deleted}; known experiments: "
                f"{', '.join(known) or 'none'}. Pass one of them, or {_FIX}"
            )
    return found


def load_runs(experiments: list[str], tracking_uri: str | None = None) -> RunSet:
    """Every run of ``experiments`` (trial/distill runs and sweep parents), one row per run."""
    if not experiments:
        raise ReportError("no experiment given: pass --experiment NAME or --compare NAME NAME ...")
    client, uri = open_store(tracking_uri)
    ids = find_experiments(client, uri, list(dict.fromkeys(experiments)))
    rows: list[dict] = []
    with _store_errors(uri, "read runs"):
        for name, exp_id in ids.items():
            before = len(rows)
            token = None
            while True:
                page = client.search_runs([exp_id], max_results=10_000, page_token=token)
                rows += [_row(name, r) for r in page]
                token = page.token
                if not token:
                    break
            if len(rows) == before:
                raise ReportError(
                    f"experiment {name!r} at {uri} has no runs: log runs to it first "
                    "(`cdfkd sweep SPEC` or `cdfkd distill` with tracking enabled), "
                    "or pick another experiment"
                )
    frame = _typed(pd.DataFrame(rows))
    parent_ids = set(frame["parent_run_id"].dropna())
    is_parent = (frame["run_kind"] == "sweep") | frame["run_id"].isin(parent_ids)
    trials, parents = (
        frame[~is_parent].reset_index(drop=True),
        frame[is_parent].reset_index(drop=True),
    )
    for name in ids:
        if not (trials["experiment"] == name).any():
            raise ReportError(
                f"experiment {name!r} at {uri} holds only sweep parent runs, no trial or distill "
                "runs: its trials have not logged yet (is the sweep still starting?), "
                "or pick another experiment"
            )
    log.info("read %d runs (%d sweep parents) from %s", len(frame), len(parents), uri)
    return RunSet(uri=uri, experiments=ids, trials=trials, parents=parents, client=client)


def _row(experiment: str, run) -> dict:
    info, data = run.info, run.data
    tags = data.tags
    row = {
        "experiment": experiment,
        "run_id": info.run_id,
        "run_name": info.run_name,
        "status": info.status,
        **{t: tags.get(t) for t in CONTRACT_TAGS},
        "parent_run_id": tags.get(_PARENT_TAG),
        "start_time": info.start_time,
        "end_time": info.end_time,
    }
    # Runs without the contract tags (logged by hand) still say what they are.
    row["method"] = row["method"] or data.params.get("method.name")
    row["dataset"] = row["dataset"] or data.params.get("data.name")
    row.update(data.metrics)
    row.update({PARAM + k: v for k, v in data.params.items()})
    return row


def _typed(frame: pd.DataFrame) -> pd.DataFrame:
    for col in ID_COLUMNS:
        if col not in frame:
            frame[col] = None
    for col in ("start_time", "end_time"):
        frame[col] = pd.to_datetime(frame[col], unit="ms", utc=True)
    for col in [c for c in frame if c.startswith(PARAM)]:
        frame[col] = coerce_param(frame[col])
    if PARAM + "train.seed" in frame:
        frame["seed"] = frame[PARAM + "train.seed"]
    rest = [c for c in frame if c not in ID_COLUMNS]
    # .copy() consolidates the column-by-column conversions above into one block.
    return frame[
        ID_COLUMNS
        + sorted(c for c in rest if not c.startswith(PARAM))
        + sorted(c for c in rest if c.startswith(PARAM))
    ].copy()


def coerce_param(values: pd.Series) -> pd.Series:
    """MLflow stores params as strings: back to int (nullable), float, or str; "None" -> missing."""
    text = values.where(values.notna() & (values != "None"), None)
    present = text.dropna().astype(str)
    if present.empty:
        return pd.Series(pd.NA, index=values.index, dtype="object")
    numbers = pd.to_numeric(present, errors="coerce")
    if numbers.isna().any():
        return text.astype("object")
    if present.str.fullmatch(r"[+-]?\d+").all():
        return pd.to_numeric(text, errors="coerce").astype("Int64")
    return pd.to_numeric(text, errors="coerce").astype("float64")


def metric_history(
    runs: RunSet, run_ids: list[str], key: str = "relative_accuracy"
) -> pd.DataFrame:
    """Every logged value of ``key``: columns run_id, step, time (UTC timestamps), value."""
    rows = []
    with _store_errors(runs.uri, f"read the history of {key!r}"):
        for run_id in run_ids:
            rows += [
                {"run_id": run_id, "step": m.step, "time": m.timestamp, "value": m.value}
                for m in runs.client.get_metric_history(run_id, key)
            ]
    frame = pd.DataFrame(rows, columns=["run_id", "step", "time", "value"])
    frame["time"] = pd.to_datetime(frame["time"], unit="ms", utc=True)
    return frame.sort_values(["run_id", "step", "time"], kind="stable").reset_index(drop=True)


@contextmanager
def _no_progress_bar():
    # MLflow draws a tqdm bar on stderr for every download unless this switch is off;
    # library code prints nothing, so it is turned off for the call and restored after.
    from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR as flag

    before = os.environ.get(flag.name)
    os.environ[flag.name] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(flag.name, None)
        else:
            os.environ[flag.name] = before


def fetch_artifact(runs: RunSet, run_id: str, name: str, dest: Path) -> Path | None:
    """Copy the run's artifact ``name`` (at its root or in a folder) to ``dest``; None if absent."""
    import tempfile

    with _store_errors(runs.uri, f"list the artifacts of run {run_id}"):
        paths = [a.path for a in runs.client.list_artifacts(run_id)]
        if name not in paths:  # one level down: some loggers put files in a folder
            for folder in [a.path for a in runs.client.list_artifacts(run_id) if a.is_dir]:
                paths += [a.path for a in runs.client.list_artifacts(run_id, folder)]
    match = next((p for p in paths if p == name or p.endswith("/" + name)), None)
    if match is None:
        return None
    with (
        tempfile.TemporaryDirectory() as tmp,
        _store_errors(runs.uri, f"download {match} of run {run_id}"),
        _no_progress_bar(),
    ):
        local = runs.client.download_artifacts(run_id, match, tmp)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(local, dest)
    return dest
