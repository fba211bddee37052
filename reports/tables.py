"""The report's tables: pure functions of the runs frame of :mod:`cdfkd.reports.query`.

Every table keeps the run ids its numbers come from (``run_id``, or ``run_ids``
for a row that aggregates several runs). Accuracies stay fractions in [0, 1];
formatting for people happens in :mod:`cdfkd.reports.html`.
"""

from __future__ import annotations

import math
import re

import pandas as pd

from cdfkd.metrics import RESULT_METRICS, pareto_front
from cdfkd.reports.query import PARAM

#: params that pick a random stream, not a configuration (seeds get their own column)
SEED_KEYS = (PARAM + "train.seed", PARAM + "data.split_seed", PARAM + "aggregation.seed")
#: params that never describe a configuration
_NOT_CONFIG = (PARAM + "tracking.",)
#: the knobs of the student's header structure (see cdfkd.config.StudentConfig)
STRUCTURE_KEYS = tuple(
    PARAM + "student." + k
    for k in ("arch", "family", "headers", "fuse_from", "share_until", "header_width")
)
METRICS = RESULT_METRICS


def column(frame: pd.DataFrame, name: str) -> pd.Series:
    """``frame[name]`` as floats, or all-NaN when no run logged it."""
    if name not in frame:
        return pd.Series(math.nan, index=frame.index, dtype="float64")
    return pd.to_numeric(frame[name], errors="coerce").astype("float64")


def finished(trials: pd.DataFrame) -> pd.DataFrame:
    """Runs that ended normally and logged a relative accuracy: what every table and plot uses."""
    keep = (trials["status"] == "FINISHED") & column(trials, "relative_accuracy").notna()
    return trials[keep].reset_index(drop=True)


def varying_params(trials: pd.DataFrame, prefixes: tuple[str, ...] = (PARAM,)) -> list[str]:
    """Param columns (under ``prefixes``) whose value differs between runs; seeds excluded.

    A param set on some runs and missing on others (a conditional one, such as
    ``student.fuse_from`` for the ``mfs`` family only) counts as varying.
    """
    out = []
    for col in trials:
        if not col.startswith(prefixes) or col in SEED_KEYS or col.startswith(_NOT_CONFIG):
            continue
        if trials[col].astype("string").fillna("None").nunique() > 1:
            out.append(col)
    return out


def _std(values: pd.Series) -> float:
    # Sample standard deviation (ddof=1): the spread a new seed would show; NaN for one run.
    values = values.dropna()
    return float(values.std(ddof=1)) if len(values) > 1 else math.nan


def comparison_table(trials: pd.DataFrame) -> pd.DataFrame:
    """One row per (experiment, method, dataset): mean and std over its runs (seeds).

    Columns: experiment, method, dataset, reference, n_runs, seeds,
    relative_accuracy_mean/_std, student_accuracy_mean/_std, reference_accuracy
    (student / relative accuracy, averaged), proxy_mean, student_params_mean,
    student_macs_mean, wall_seconds_mean, run_ids (space separated).
    In a sweep a row pools every trial of the method; ``best.csv`` has the configurations.
    """
    done = finished(trials)
    rows = []
    order = list(dict.fromkeys(done["experiment"]))
    keys = ["experiment", "method", "dataset"]
    for (exp, method, dataset), g in done.fillna({"method": "?", "dataset": "?"}).groupby(
        keys, sort=False
    ):
        rel, acc = column(g, "relative_accuracy"), column(g, "student_accuracy")
        ref = (acc / rel).where(rel > 0)
        seeds = sorted({str(s) for s in g["seed"].dropna()}, key=lambda s: (len(s), s))
        rows.append(
            {
                "experiment": exp,
                "method": method,
                "dataset": dataset,
                "reference": ",".join(sorted({str(r) for r in g["reference"].dropna()})) or None,
                "n_runs": len(g),
                "seeds": " ".join(seeds),
                "relative_accuracy_mean": rel.mean(),
                "relative_accuracy_std": _std(rel),
                "student_accuracy_mean": acc.mean(),
                "student_accuracy_std": _std(acc),
                "reference_accuracy": ref.mean(),
                "proxy_mean": column(g, "proxy").mean(),
                "student_params_mean": column(g, "student_params").mean(),
                "student_macs_mean": column(g, "student_macs").mean(),
                "wall_seconds_mean": column(g, "wall_seconds").mean(),
                "run_ids": " ".join(g["run_id"]),
            }
        )
    table = pd.DataFrame(
        rows,
        columns=[
            "experiment",
            "method",
            "dataset",
            "reference",
            "n_runs",
            "seeds",
            "relative_accuracy_mean",
            "relative_accuracy_std",
            "student_accuracy_mean",
            "student_accuracy_std",
            "reference_accuracy",
            "proxy_mean",
            "student_params_mean",
            "student_macs_mean",
            "wall_seconds_mean",
            "run_ids",
        ],
    )
    table["_exp"] = table["experiment"].map({e: i for i, e in enumerate(order)})
    table = table.sort_values(
        ["_exp", "dataset", "relative_accuracy_mean"], ascending=[True, True, False]
    )
    return table.drop(columns="_exp").reset_index(drop=True)


def best_table(trials: pd.DataFrame, top_k: int = 5) -> pd.DataFrame:
    """The ``top_k`` runs of each experiment by relative accuracy (smaller student breaks ties).

    Columns: experiment, rank, run_id, method, dataset, seed, the metrics of
    :data:`METRICS`, the per-header and aggregation accuracies when logged
    (``header_{i}_accuracy``, ``aggregation/...``), then every param that varies between the runs.
    """
    done = finished(trials)
    params = varying_params(done)
    extra = sorted(
        (
            c
            for c in done
            if re.fullmatch(r"header_\d+_accuracy|aggregation/\w+", c)
            and column(done, c).notna().any()
        ),
        key=lambda c: (len(c), c),
    )
    done = done.assign(_rel=column(done, "relative_accuracy"), _size=column(done, "student_params"))
    parts = []
    for _, g in done.groupby("experiment", sort=False):
        top = g.sort_values(["_rel", "_size"], ascending=[False, True], kind="stable").head(top_k)
        parts.append(top.assign(rank=range(1, len(top) + 1)))
    base = ["experiment", "rank", "run_id", "method", "dataset", "seed"]
    if not parts:
        return pd.DataFrame(columns=base + list(METRICS) + params)
    best = pd.concat(parts, ignore_index=True)
    for m in METRICS:
        best[m] = column(best, m)
    return best[base + list(METRICS) + extra + params].reset_index(drop=True)


def pareto_mask(frame: pd.DataFrame, cost: str = "student_params") -> pd.Series:
    """True for runs no other run beats on both higher relative accuracy and lower ``cost``."""
    points = list(zip(column(frame, "relative_accuracy"), column(frame, cost), strict=True))
    return pd.Series(pareto_front(points, (True, False)), index=frame.index)


def _num(v) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def structure_labels(trials: pd.DataFrame) -> pd.Series:
    """A short label of each run's student structure, e.g. ``mfs h=3 fuse_from=1 width=0.5``.

    Only the knobs that apply to the family are named (``fuse_from`` for mfs,
    ``share_until`` for branch); the backbone is named when it differs between runs.
    """

    def get(row, key):
        v = row.get(PARAM + "student." + key)
        return None if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)) else v

    archs = (
        trials[PARAM + "student.arch"].dropna().unique() if PARAM + "student.arch" in trials else []
    )
    labels = []
    for _, row in trials.iterrows():
        family, arch = get(row, "family"), get(row, "arch")
        prefix = f"{arch} " if len(archs) > 1 and arch is not None else ""
        if family is None:
            label = (
                "single header" if get(row, "headers") in (None, 1) else f"h={get(row, 'headers')}"
            )
        else:
            knob = {"mfs": "fuse_from", "branch": "share_until"}.get(str(family))
            parts = [str(family), f"h={_num(get(row, 'headers'))}"]
            if knob:
                parts.append(f"{knob}={_num(get(row, knob))}")
            if get(row, "header_width") is not None:
                parts.append(f"width={_num(get(row, 'header_width'))}")
            label = " ".join(parts)
        labels.append(prefix + label)
    return pd.Series(labels, index=trials.index, dtype="object")


def runs_table(trials: pd.DataFrame) -> pd.DataFrame:
    """Every run, every column (runs.csv); times as ISO strings."""
    out = trials.copy()
    for col in ("start_time", "end_time"):
        out[col] = out[col].map(lambda t: t.isoformat() if pd.notna(t) else None)
    return out
