"""Optuna parameter importances of the loss weights and header structure.

The study is rebuilt from the MLflow runs (one FrozenTrial per finished run,
objective = relative accuracy, the run id in its user attributes), with each
parameter's distribution inferred from its values: ints -> IntDistribution,
floats -> FloatDistribution, anything else -> CategoricalDistribution. A
conditional parameter (missing on some runs) becomes categorical with "None"
as one of its values, so fANOVA, which needs every parameter on every trial,
still sees the structure choice it encodes. A sweep's Optuna journal can be read
instead; it has the true distributions but not the run ids.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

import pandas as pd

from cdfkd.reports.query import PARAM, ReportError
from cdfkd.reports.tables import column, finished, varying_params

log = logging.getLogger(__name__)

#: what the importances are computed over: loss weights and student structure
IMPORTANCE_PREFIXES = (PARAM + "method.", PARAM + "student.")
COLUMNS = ["experiment", "param", "importance", "n_trials", "source", "run_ids"]
MIN_TRIALS = 2


@contextmanager
def _quiet_optuna():
    # Optuna logs every study creation at INFO on its own stderr handler.
    import optuna

    before = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield optuna
    finally:
        optuna.logging.set_verbosity(before)


def _distribution(values: pd.Series):
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    present = values.dropna()
    if values.isna().any() or values.dtype == object or str(values.dtype) in ("string", "str"):
        return CategoricalDistribution(
            sorted({str(v) for v in values.astype("string").fillna("None")})
        )
    if str(values.dtype) == "Int64" or pd.api.types.is_integer_dtype(values):
        return IntDistribution(int(present.min()), int(present.max()))
    return FloatDistribution(float(present.min()), float(present.max()))


def _evaluate(
    study, experiment: str, source: str, run_ids: str, n: int
) -> tuple[pd.DataFrame, list[str]]:
    import optuna

    try:
        scores = optuna.importance.get_param_importances(
            study,
            evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0),
            target=(lambda t: t.values[0]) if len(study.directions) > 1 else None,
        )
    except (RuntimeError, ValueError) as err:
        return pd.DataFrame(columns=COLUMNS), [f"{experiment}: no parameter importances ({err})."]
    rows = [
        {
            "experiment": experiment,
            "param": k,
            "importance": float(v),
            "n_trials": n,
            "source": source,
            "run_ids": run_ids,
        }
        for k, v in scores.items()
    ]
    notes = []
    if n < 5:
        notes.append(f"{experiment}: importances from only {n} trials are a rough indication.")
    return pd.DataFrame(rows, columns=COLUMNS), notes


def param_importances(trials: pd.DataFrame, experiment: str) -> tuple[pd.DataFrame, list[str]]:
    """fANOVA importances of the varying ``method.*``/``student.*`` params of one experiment.

    Returns (rows with :data:`COLUMNS`, notes). Fewer than two finished runs or
    no varying parameter give no rows and a note saying why.
    """
    from optuna.distributions import CategoricalDistribution, IntDistribution
    from optuna.trial import create_trial

    done = finished(trials[trials["experiment"] == experiment])
    if len(done) < MIN_TRIALS:
        return pd.DataFrame(columns=COLUMNS), [
            f"{experiment}: parameter importances need at least {MIN_TRIALS} finished runs with a "
            f"relative accuracy; it has {len(done)}."
        ]
    params = varying_params(done, IMPORTANCE_PREFIXES)
    if not params:
        return pd.DataFrame(columns=COLUMNS), [
            f"{experiment}: no parameter importances: every loss weight and structure parameter "
            f"(method.*, student.*) is the same in all {len(done)} runs."
        ]
    dists = {p.removeprefix(PARAM): _distribution(done[p]) for p in params}
    rel = column(done, "relative_accuracy")
    with _quiet_optuna() as optuna:
        study = optuna.create_study(direction="maximize", study_name=experiment)
        for i, row in done.iterrows():
            values: dict[str, str | int | float] = {}
            for p in params:
                key, v = p.removeprefix(PARAM), row[p]
                if isinstance(dists[key], CategoricalDistribution):
                    values[key] = "None" if pd.isna(v) else str(v)
                else:
                    values[key] = int(v) if isinstance(dists[key], IntDistribution) else float(v)
            study.add_trial(
                create_trial(
                    value=float(rel[i]),
                    params=values,
                    distributions=dists,
                    user_attrs={"run_id": row["run_id"]},
                )
            )
        return _evaluate(study, experiment, "runs", " ".join(done["run_id"]), len(done))


def journal_importances(
    path: str | Path, study_name: str, experiment: str | None = None
) -> tuple[pd.DataFrame, list[str]]:
    """fANOVA importances from a sweep's Optuna journal (``<experiment dir>/optuna.log``).

    The study name is the sweep name.

    With two objectives the first one (the sweep's ``objective.metric``) is the target;
    conditional parameters (absent from some trials) are left out, as fANOVA needs
    every parameter on every trial.
    """
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    path = Path(path)
    experiment = experiment or study_name
    if not path.is_file():
        raise ReportError(
            f"no Optuna journal at {path}: pass the sweep's <storage_path>/<name>/optuna.log"
        )
    with _quiet_optuna() as optuna:
        storage = JournalStorage(JournalFileBackend(str(path)))
        try:
            study = optuna.load_study(study_name=study_name, storage=storage)
        except KeyError:
            names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
            raise ReportError(
                f"the journal {path} has no study {study_name!r}; it has: "
                f"{', '.join(names) or 'none'}"
            ) from None
        done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if len(done) < MIN_TRIALS:
            return pd.DataFrame(columns=COLUMNS), [
                f"{experiment}: parameter importances need at least {MIN_TRIALS} complete trials; "
                f"the journal {path} has {len(done)}."
            ]
        numbers = " ".join(f"optuna#{t.number}" for t in done)
        return _evaluate(study, experiment, f"journal {path}", numbers, len(done))
