"""A compact live table of the sweep's trials, in place of Ray's own console output."""

from __future__ import annotations

import time
from collections.abc import Callable

from ray.tune import Callback

_METRIC_COLUMNS = (
    ("relative_accuracy", "rel_acc"),
    ("student_accuracy", "acc"),
    ("validation_accuracy", "val_acc"),
    ("selection_score", "sel_score"),
    ("steps_per_second", "steps/s"),
)


def _short(key: str) -> str:
    return key.split(".")[-1]


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


class ProgressTable(Callback):
    """Prints the table at most every ``interval`` seconds and whenever a trial ends."""

    def __init__(self, spec, write: Callable[[str], None], interval: float = 30.0) -> None:
        self.params = list(spec.search)
        self.metric = spec.objective.metric
        self.write = write
        self.interval = interval
        self._last = 0.0
        self._rows: dict[str, dict] = {}

    def _update(self, trial, status: str, result: dict | None = None) -> None:
        row = self._rows.setdefault(trial.trial_id, {"params": dict(trial.config)})
        row["status"] = status
        if result:
            row.update({k: result.get(k, row.get(k)) for k, _ in _METRIC_COLUMNS})
            row["step"] = result.get("step", row.get("step"))
            if result.get("failed"):
                row["status"] = str(result.get("failure", "nonfinite")).upper()

    def _render(self) -> str:
        head = [
            "trial",
            "status",
            *(_short(p) for p in self.params),
            "step",
            *(c for _, c in _METRIC_COLUMNS),
        ]
        lines = [head]
        for tid, row in sorted(self._rows.items()):
            cells = [
                tid,
                row["status"],
                *(_fmt(row["params"].get(p)) for p in self.params),
                _fmt(row.get("step")),
            ]
            cells += [_fmt(row.get(k)) for k, _ in _METRIC_COLUMNS]
            lines.append(cells)
        widths = [max(len(str(r[i])) for r in lines) for i in range(len(head))]
        return "\n".join(
            "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in lines
        )

    def _maybe_print(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last >= self.interval:
            self._last = now
            self.write(self._render())

    def on_trial_start(self, iteration, trials, trial, **info):
        self._update(trial, "RUNNING")
        self._maybe_print()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._update(trial, "RUNNING", result)
        self._maybe_print()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._update(trial, "DONE", trial.last_result)
        self._maybe_print(force=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._update(trial, "ERROR", trial.last_result)
        self._maybe_print(force=True)

    def final(self, summary: dict) -> None:
        self.write(self._render())
        self.write(f"results: {summary['experiment_dir']}/results.csv")
        if "best" in summary:
            b = summary["best"]
            params = {k.removeprefix("param:"): v for k, v in b.items() if k.startswith("param:")}
            self.write(
                f"best trial {b['trial_id']}: {self.metric}={_fmt(b[self.metric])} params={params}"
            )
        for p in summary.get("pareto", []):
            self.write(
                f"pareto {p['trial_id']}: {self.metric}={_fmt(p[self.metric])} params={p['student_params']}"
            )
