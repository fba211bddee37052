"""The define-by-run Optuna space built from a validated spec.

OptunaSearch pickles its space with every experiment snapshot, so the space is
an instance of a module-level class (a lambda or closure would kill the sweep
at its first snapshot).
"""

from __future__ import annotations

import contextlib

import optuna
from ray.tune.search.optuna import OptunaSearch

from cdfkd.tune.spec import Param, SweepSpec, _conditions_met, sampling_order


class DefineByRunSpace:
    """Callable ``space(trial)``: suggests each searched key whose ``when`` holds.

    Keys are sampled after the keys their conditions name (``student.fuse_from``
    after ``student.family``). Inactive keys are simply absent from the trial's
    config.
    """

    def __init__(self, params: dict[str, Param], base: dict) -> None:
        self.params = {k: params[k].model_dump() for k in sampling_order(params)}
        self.base = base

    def __call__(self, trial: optuna.Trial) -> None:
        sample: dict = {}
        for key, p in self.params.items():
            if not _conditions_met(p["when"], sample, self.base):
                continue
            if p["type"] == "categorical":
                sample[key] = trial.suggest_categorical(key, p["choices"])
            elif p["type"] == "int":
                step = int(p["step"] or 1)
                sample[key] = trial.suggest_int(
                    key, int(p["low"]), int(p["high"]), step=step, log=p["log"]
                )
            else:
                sample[key] = trial.suggest_float(
                    key, p["low"], p["high"], step=p["step"], log=p["log"]
                )
        return None


def make_sampler(spec: SweepSpec) -> optuna.samplers.BaseSampler:
    """Seeded sampler: TPE for one objective, NSGA-II for two (a Pareto front)."""
    if spec.objective.multi:
        return optuna.samplers.NSGAIISampler(
            seed=spec.seed, population_size=max(4, spec.max_concurrent_trials * 2)
        )
    # Start-up trials at least as many as run at once, so parallel start-up
    # does not launch more random trials than planned.
    startup = max(spec.max_concurrent_trials, min(10, max(2, spec.num_samples // 3)))
    return optuna.samplers.TPESampler(seed=spec.seed, n_startup_trials=startup, multivariate=True)


class ResumableOptunaSearch(OptunaSearch):
    """OptunaSearch that tolerates results it has already told the study.

    A driver killed after a trial finished in the Optuna journal but before
    Tune's next experiment snapshot replays that completion on --resume; the
    study already holds it, so telling it again must not end the sweep.
    """

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
            super().on_trial_result(trial_id, result)

    def on_trial_complete(
        self, trial_id: str, result: dict | None = None, error: bool = False
    ) -> None:
        try:
            super().on_trial_complete(trial_id, result=result, error=error)
        except optuna.exceptions.UpdateFinishedTrialError:
            self._ot_trials.pop(trial_id, None)
