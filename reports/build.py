"""``build_report``: MLflow runs -> tables, plots, sample grids, index.html, report.md and CSVs."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from cdfkd.reports import plots
from cdfkd.reports.html import ReportContent, pct, render_html, render_markdown
from cdfkd.reports.importance import COLUMNS as IMPORTANCE_COLUMNS
from cdfkd.reports.importance import journal_importances, param_importances
from cdfkd.reports.query import fetch_artifact, load_runs, metric_history
from cdfkd.reports.tables import (
    best_table,
    column,
    comparison_table,
    finished,
    pareto_mask,
    runs_table,
)

log = logging.getLogger(__name__)

SAMPLES_ARTIFACT = "samples.png"


def build_report(
    experiments: list[str] | str,
    out_dir: str | Path,
    tracking_uri: str | None = None,
    *,
    top_k: int = 3,
    journals: Mapping[str, str | Path] | None = None,
) -> dict[str, Path]:
    """Write the report of one experiment, or several side by side, to ``out_dir``.

    ``experiments``: MLflow experiment names (a sweep's experiment is its name;
    distill runs default to ``cdfkd-distill``). ``tracking_uri``: None reads
    ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` in the working
    directory. ``top_k``: best runs per experiment listed and shown as sample
    grids. ``journals``: ``{experiment: path to its optuna.log}``, used for the
    parameter importances instead of rebuilding the study from the runs.

    Returns ``{relative path: absolute path}`` of every file written: index.html,
    report.md, runs.csv, comparison.csv, best.csv, importances.csv, plots/*.png
    and samples/<run_id>.png. Raises :class:`~cdfkd.reports.query.ReportError`
    for an unknown experiment (naming the known ones), an experiment without
    runs, or a tracking store that cannot be reached.
    """
    names = [experiments] if isinstance(experiments, str) else list(experiments)
    runs = load_runs(names, tracking_uri)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    notes: list[str] = []

    def keep(rel: str) -> str:
        written[rel] = (out / rel).resolve()
        return rel

    trials = runs.trials
    done = finished(trials)
    left_out = trials.loc[~trials["run_id"].isin(done["run_id"]), "run_id"].tolist()
    if left_out:
        notes.append(
            f"{len(left_out)} run(s) did not finish (KILLED: stopped early by the scheduler; "
            "FAILED; RUNNING) or logged no relative_accuracy: they are left out of the tables "
            f"and plots except the history (dashed) and All runs: {' '.join(left_out)}."
        )
    color_by = "experiment" if len(runs.experiments) > 1 else "method"

    # Tables: every number keeps its run ids.
    comparison = comparison_table(trials)
    best = best_table(trials, top_k)
    importances, imp_notes = _importances(trials, runs.experiments, journals or {})
    notes += imp_notes
    for name, frame in (
        ("runs.csv", runs_table(trials)),
        ("comparison.csv", comparison),
        ("best.csv", best),
        ("importances.csv", importances),
    ):
        frame.to_csv(out / keep(name), index=False)

    # Plots: each is skipped with a note when its data was not logged.
    figures: list[tuple[str, str, str]] = []

    def figure(title: str, rel: str, made: Path | None, caption: str, missing: str) -> None:
        if made is None:
            notes.append(f"No {title.lower()} plot: {missing}.")
        else:
            figures.append((title, keep(rel), caption))

    history = metric_history(runs, trials["run_id"].tolist())
    figure(
        "Relative accuracy over time",
        "plots/history.png",
        plots.history_plot(history, trials, out / "plots/history.png", color_by),
        f"One line per run ({history['run_id'].nunique()} runs, listed under All runs; dashed: "
        "did not finish), left against wall time, right against training step; each "
        "experiment's best finished run is labelled with its run id.",
        "no run logged a relative_accuracy history",
    )
    figure(
        "Pareto front",
        "plots/pareto.png",
        plots.pareto_plot(done, out / "plots/pareto.png", color_by),
        "Higher relative accuracy and fewer parameters (MACs) are better; circled runs are not "
        f"dominated. Front by params: {_front_caption(done)}.",
        "no finished run logged student_params or student_macs",
    )
    figure(
        "Accuracy by header structure",
        "plots/structure.png",
        plots.structure_plot(done, out / "plots/structure.png", color_by),
        "Each point is a run (its structure in the param:student.* columns of runs.csv); the black "
        "bar is the structure's mean relative accuracy.",
        "no finished run",
    )
    proxy_path, rho = plots.proxy_plot(done, out / "plots/proxy.png", color_by)
    n_proxy = int((column(done, "proxy").notna() & column(done, "relative_accuracy").notna()).sum())
    figure(
        "Proxy vs true relative accuracy",
        "plots/proxy.png",
        proxy_path,
        f"Spearman rank correlation {'n/a (< 3 runs)' if math.isnan(rho) else f'{rho:.3f}'}"
        f" over {n_proxy} runs: how well the data-free proxy would have ranked them.",
        "no finished run logged the proxy metric",
    )
    sel_path, sel_rho, regret, picked = plots.selection_plot(
        done, out / "plots/selection.png", color_by
    )
    n_sel = int(
        (column(done, "selection_score").notna() & column(done, "relative_accuracy").notna()).sum()
    )
    figure(
        "Selection score vs true relative accuracy",
        "plots/selection.png",
        sel_path,
        f"Spearman rank correlation "
        f"{'n/a (< 3 runs)' if math.isnan(sel_rho) else f'{sel_rho:.3f}'} over {n_sel} runs; "
        f"the run with the highest selection_score ({picked}, circled) is "
        f"{pct(regret)} points of relative accuracy below the truly best one (the regret of "
        "choosing without labels). The score needs no labelled data; the test-set accuracy "
        "is shown to evaluate it, never to choose." + _few_shot_caption(done),
        "no finished run logged selection_score (teachers without a validation set: "
        "`cdfkd teachers validation-set DIR`)",
    )
    if not importances.empty:
        figure(
            "Parameter importances",
            "plots/importances.png",
            plots.importance_plot(importances, out / "plots/importances.png"),
            "Bars from importances.csv (its run_ids column lists the runs of each study).",
            "no importances",
        )

    # Sample grids of the best runs, copied from their artifacts.
    samples = []
    for _, r in best.iterrows():
        rel = f"samples/{r['run_id']}.png"
        if fetch_artifact(runs, r["run_id"], SAMPLES_ARTIFACT, out / rel) is None:
            notes.append(
                f"Run {r['run_id']} ({r['experiment']}, rank {r['rank']}) "
                f"logged no {SAMPLES_ARTIFACT}."
            )
            continue
        samples.append(
            (
                keep(rel),
                f"{r['experiment']} · {r['method']} · rank {r['rank']} · relative "
                f"accuracy {pct(r['relative_accuracy'])} % · run {r['run_id']}",
            )
        )

    title = (
        f"cdfkd report: {names[0]}"
        if len(runs.experiments) == 1
        else "cdfkd comparison: " + " vs ".join(runs.experiments)
    )
    content = ReportContent(
        title=title,
        uri=runs.uri,
        experiments=runs.experiments,
        parents=runs.parents,
        comparison=comparison,
        best=best,
        importances=importances,
        runs=trials,
        plots=figures,
        samples=samples,
        notes=notes,
        files=["report.md", "runs.csv", "comparison.csv", "best.csv", "importances.csv"],
    )
    (out / keep("report.md")).write_text(render_markdown(content), encoding="utf-8")
    (out / keep("index.html")).write_text(render_html(content), encoding="utf-8")
    log.info(
        "report of %s written to %s (%d files)", ", ".join(runs.experiments), out, len(written)
    )
    return dict(sorted(written.items()))


def _few_shot_caption(done: pd.DataFrame) -> str:
    """How the few-shot accuracy estimate (M labelled samples per class) ranks, if logged."""
    from cdfkd.metrics import spearman

    few, rel = column(done, "few_shot_accuracy"), column(done, "relative_accuracy")
    ok = few.notna() & rel.notna()
    if ok.sum() < 3:
        return ""
    rho = spearman(few[ok].tolist(), rel[ok].tolist())
    return (
        f" With a few real labelled samples (few_shot_accuracy, {int(ok.sum())} runs) the "
        f"Spearman correlation is {rho:.3f}."
    )


def _front_caption(done: pd.DataFrame) -> str:
    parts = []
    for _, g in done.groupby("experiment", sort=False):
        front = g[pareto_mask(g)]
        for rel, size, run_id in zip(
            column(front, "relative_accuracy"),
            column(front, "student_params"),
            front["run_id"],
            strict=True,
        ):
            parts.append(f"{run_id} ({pct(rel)} %, {size:,.0f} params)")
    return "; ".join(parts) or "none"


def _importances(
    trials: pd.DataFrame, experiments: dict[str, str], journals: Mapping[str, str | Path]
) -> tuple[pd.DataFrame, list[str]]:
    unknown = set(journals) - set(experiments)
    if unknown:
        from cdfkd.reports.query import ReportError

        raise ReportError(
            f"journals given for experiments not in the report: {', '.join(sorted(unknown))}; "
            f"the report covers {', '.join(experiments)}"
        )
    frames, notes = [], []
    for name in experiments:
        if name in journals:
            frame, n = journal_importances(journals[name], study_name=name, experiment=name)
        else:
            frame, n = param_importances(trials, name)
        frames.append(frame)
        notes += n
    frames = [f for f in frames if not f.empty]
    table = (
        pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=IMPORTANCE_COLUMNS)
    )
    return table, notes
