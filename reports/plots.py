"""The report's figures as PNGs, drawn on matplotlib's Agg canvas (no display, no pyplot state).

Each function takes the runs it plots (finished runs, see :func:`tables.finished`),
writes one PNG and returns its path, or None when there is nothing to draw.
Points are coloured by ``color_by`` (``method`` for one experiment,
``experiment`` when several are compared); the runs worth naming (the Pareto
front, each experiment's best) are labelled with their short run ids.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter

from cdfkd.reports.tables import column, pareto_mask, structure_labels


def _figure(ncols: int = 1, width: float = 7.0, height: float = 4.2):
    fig = Figure(
        figsize=(width * ncols if ncols > 1 else width, height), dpi=100, layout="constrained"
    )
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _palette(keys) -> dict:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return {k: cmap(i % 10) for i, k in enumerate(dict.fromkeys(keys))}


def _group(frame: pd.DataFrame, color_by: str) -> pd.Series:
    return frame[color_by].fillna("?").astype(str)


def _short(run_id: str) -> str:
    return str(run_id)[:8]


def _log_if_wide(ax, values: pd.Series, axis: str = "x") -> None:
    v = values[values > 0]
    if len(v) and v.max() / v.min() > 20:
        (ax.set_xscale if axis == "x" else ax.set_yscale)("log")


def history_plot(
    history: pd.DataFrame, runs: pd.DataFrame, path: Path, color_by: str
) -> Path | None:
    """Relative accuracy of every run at each evaluation, against wall time and against step.

    ``history``: run_id, step, time, value (from :func:`query.metric_history`);
    ``runs``: every run, finished or not (not finished: dashed, never labelled).
    Time is seconds since the experiment's first run started, so sweeps overlay.
    """
    if history.empty:
        return None
    cols = list(dict.fromkeys(["run_id", "experiment", color_by, "start_time", "status"]))
    h = history.merge(runs[cols].drop_duplicates("run_id"), on="run_id", how="inner")
    if h.empty:
        return None
    origin = runs.groupby("experiment")["start_time"].min()
    h["seconds"] = (h["time"] - h["experiment"].map(origin)).dt.total_seconds()
    h["group"] = _group(h, color_by)
    colors = _palette(h["group"])
    fig, (ax_t, ax_s) = _figure(ncols=2, width=5.5)
    seen = set()
    for _, g in h.groupby("run_id", sort=False):
        group, done = g["group"].iloc[0], g["status"].iloc[0] == "FINISHED"
        label = None if group in seen or not done else group
        if done:
            seen.add(group)
        style = {"linestyle": "-" if done else "--", "alpha": 0.8 if done else 0.45}
        for ax, x in ((ax_t, "seconds"), (ax_s, "step")):
            ax.plot(
                g[x],
                g["value"],
                marker="o",
                markersize=3,
                linewidth=1,
                color=colors[group],
                label=label,
                **style,
            )
    last = h[h["status"] == "FINISHED"].sort_values(["step", "time"]).groupby("run_id").tail(1)
    for _, best in last.loc[last.groupby("experiment")["value"].idxmax()].iterrows():
        ax_s.annotate(
            _short(best["run_id"]),
            (best["step"], best["value"]),
            fontsize=7,
            xytext=(3, 3),
            textcoords="offset points",
        )
    ax_t.set_xlabel("seconds since the experiment's first run started")
    ax_s.set_xlabel("training step")
    for ax in (ax_t, ax_s):
        ax.set_ylabel("relative accuracy")
        ax.grid(alpha=0.3)
    ax_s.legend(title=color_by, fontsize=8)
    fig.suptitle(f"Relative accuracy per run over time ({h['run_id'].nunique()} runs)")
    return _save(fig, path)


def pareto_plot(runs: pd.DataFrame, path: Path, color_by: str) -> Path | None:
    """Relative accuracy against student params (and MACs); each experiment's front joined."""
    costs = [c for c in ("student_params", "student_macs") if column(runs, c).notna().any()]
    if not costs or column(runs, "relative_accuracy").notna().sum() == 0:
        return None
    group = _group(runs, color_by)
    colors = _palette(group)
    exp_colors = _palette(runs["experiment"])
    fig, axes = _figure(ncols=len(costs), width=5.5 if len(costs) > 1 else 7.0)
    rel = column(runs, "relative_accuracy")
    for ax, cost in zip(axes, costs, strict=True):
        x = column(runs, cost)
        for key in colors:
            sel = group == key
            ax.scatter(x[sel], rel[sel], s=24, alpha=0.6, color=colors[key], label=key)
        for exp, g in runs.groupby("experiment", sort=False):
            front = g[pareto_mask(g, cost)].assign(
                _x=column(g, cost), _y=column(g, "relative_accuracy")
            )
            front = front.sort_values("_x")
            edge = exp_colors[exp] if runs["experiment"].nunique() > 1 else "black"
            ax.step(
                front["_x"],
                front["_y"],
                where="post",
                color=edge,
                linewidth=1.2,
                label=f"front: {exp}" if len(exp_colors) > 1 else "Pareto front",
            )
            ax.scatter(
                front["_x"], front["_y"], s=70, facecolors="none", edgecolors=edge, linewidths=1.5
            )
            for _, r in front.iterrows():
                ax.annotate(
                    _short(r["run_id"]),
                    (r["_x"], r["_y"]),
                    fontsize=7,
                    xytext=(4, -9),
                    textcoords="offset points",
                )
        _log_if_wide(ax, x)
        ax.xaxis.set_major_formatter(EngFormatter())  # 55k, 1.2M: sizes span orders of magnitude
        ax.set_xlabel(cost.replace("_", " "))
        ax.set_ylabel("relative accuracy")
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=8)
    fig.suptitle("Pareto front: relative accuracy vs student size (circled: not dominated)")
    return _save(fig, path)


def structure_plot(runs: pd.DataFrame, path: Path, color_by: str) -> Path | None:
    """Relative accuracy of the runs grouped by header structure; a bar marks each group's mean."""
    rel = column(runs, "relative_accuracy")
    if rel.notna().sum() == 0:
        return None
    labels = structure_labels(runs)
    means = rel.groupby(labels).mean().sort_values(ascending=False)
    pos = {label: i for i, label in enumerate(means.index)}
    group = _group(runs, color_by)
    colors = _palette(group)
    fig, (ax,) = _figure(width=max(6.0, 1.1 * len(pos) + 2), height=4.6)
    offsets = group.map({k: j for j, k in enumerate(colors)})
    spread = 0.5 / max(1, len(colors))
    for key in colors:
        sel = (group == key) & rel.notna()
        x = labels[sel].map(pos) + (offsets[sel] - (len(colors) - 1) / 2) * spread
        ax.scatter(x, rel[sel], s=26, alpha=0.75, color=colors[key], label=key)
    ax.hlines(
        means.values,
        [p - 0.35 for p in pos.values()],
        [p + 0.35 for p in pos.values()],
        color="black",
        linewidth=2,
        label="group mean",
    )
    ax.set_xticks(list(pos.values()), list(pos), rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("relative accuracy")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, title=color_by)
    ax.set_title(
        f"Relative accuracy by header structure "
        f"({len(pos)} structures, {int(rel.notna().sum())} runs)"
    )
    return _save(fig, path)


def proxy_plot(runs: pd.DataFrame, path: Path, color_by: str) -> tuple[Path | None, float]:
    """Data-free proxy against true relative accuracy; returns (path, Spearman rho of all runs)."""
    from cdfkd.metrics import spearman

    proxy, rel = column(runs, "proxy"), column(runs, "relative_accuracy")
    ok = proxy.notna() & rel.notna()
    if not ok.any():
        return None, math.nan
    rho = spearman(proxy[ok].tolist(), rel[ok].tolist())
    group = _group(runs, color_by)
    colors = _palette(group[ok])
    fig, (ax,) = _figure(width=6.0, height=4.6)
    for key in colors:
        sel = ok & (group == key)
        r = spearman(proxy[sel].tolist(), rel[sel].tolist())
        label = key if math.isnan(r) else f"{key} (ρ={r:.2f})"
        ax.scatter(proxy[sel], rel[sel], s=28, alpha=0.75, color=colors[key], label=label)
    rho_text = "n/a (needs 3 runs)" if math.isnan(rho) else f"{rho:.3f}"
    ax.set_title(f"Proxy vs true relative accuracy: Spearman ρ = {rho_text} (n = {int(ok.sum())})")
    ax.set_xlabel("data-free proxy (student-teacher agreement on generated images)")
    ax.set_ylabel("relative accuracy (test set)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title=color_by)
    return _save(fig, path), rho


def selection_plot(
    runs: pd.DataFrame, path: Path, color_by: str
) -> tuple[Path | None, float, float, str | None]:
    """``selection_score`` (data-free) against true relative accuracy, the pick circled.

    Returns (path, Spearman rho, regret of the pick in relative accuracy, picked run id):
    regret = best relative accuracy - that of the run with the highest selection_score.
    """
    from cdfkd.metrics import pick_regret, spearman

    score, rel = column(runs, "selection_score"), column(runs, "relative_accuracy")
    ok = score.notna() & rel.notna()
    if not ok.any():
        return None, math.nan, math.nan, None
    rho = spearman(score[ok].tolist(), rel[ok].tolist())
    regret = pick_regret(score[ok].tolist(), rel[ok].tolist())
    picked = score[ok].idxmax()
    group = _group(runs, color_by)
    colors = _palette(group[ok])
    fig, (ax,) = _figure(width=6.0, height=4.6)
    for key in colors:
        sel = ok & (group == key)
        ax.scatter(score[sel], rel[sel], s=28, alpha=0.75, color=colors[key], label=key)
    ax.scatter(
        [score[picked]], [rel[picked]], s=110, facecolors="none", edgecolors="black", linewidths=1.5
    )
    ax.annotate(
        f"pick {_short(runs.loc[picked, 'run_id'])}",
        (score[picked], rel[picked]),
        fontsize=7,
        xytext=(4, -10),
        textcoords="offset points",
    )
    rho_text = "n/a (needs 3 runs)" if math.isnan(rho) else f"{rho:.3f}"
    ax.set_title(
        f"selection_score vs true relative accuracy: Spearman ρ = {rho_text}, "
        f"regret {100 * regret:.1f} pts (n = {int(ok.sum())})",
        fontsize=9,
    )
    ax.set_xlabel("selection_score (on the teachers' synthetic validation set, no labels)")
    ax.set_ylabel("relative accuracy (test set)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title=color_by)
    return _save(fig, path), rho, regret, str(runs.loc[picked, "run_id"])


def importance_plot(importances: pd.DataFrame, path: Path) -> Path | None:
    """Horizontal bars of each parameter's importance, one colour per experiment."""
    if importances.empty:
        return None
    params = list(dict.fromkeys(importances.sort_values("importance", ascending=False)["param"]))
    exps = list(dict.fromkeys(importances["experiment"]))
    colors = _palette(exps)
    fig, (ax,) = _figure(width=7.0, height=max(2.5, 0.45 * len(params) * len(exps) + 1.2))
    height = 0.8 / len(exps)
    for j, exp in enumerate(exps):
        sub = importances[importances["experiment"] == exp].set_index("param")["importance"]
        ys = [i + (j - (len(exps) - 1) / 2) * height for i in range(len(params))]
        ax.barh(ys, [sub.get(p, 0.0) for p in params], height=height, color=colors[exp], label=exp)
    ax.set_yticks(range(len(params)), params, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("importance (fANOVA, sums to 1 per experiment)")
    ax.grid(alpha=0.3, axis="x")
    ax.legend(fontsize=8)
    ax.set_title("Parameter importances for relative accuracy")
    return _save(fig, path)
