"""Render a report as a self-contained ``index.html`` and as ``report.md``.

The HTML has its CSS inline, no scripts, and links only to files inside the
report folder by relative path (plots/, samples/, the CSVs), so it opens from
disk or from a copied folder. Accuracies are shown in percent; the CSVs keep
the fractions.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pandas as pd

from cdfkd.metrics import RESULT_METRICS
from cdfkd.reports.query import PARAM

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:2em auto;max-width:1200px;
padding:0 1em;color:#222;line-height:1.4}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;font-size:.85em;margin:.6em 0;display:block;overflow-x:auto}
th,td{border:1px solid #ddd;padding:.25em .5em;text-align:right;vertical-align:top}
th{background:#f3f3f3}td.t,th.t{text-align:left}code{font-size:.95em;color:#444}
.notes li{color:#7a4b00}figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}
figcaption{font-size:.85em;color:#555}.grid{display:flex;flex-wrap:wrap;gap:1em}
.grid figure{max-width:30%}.meta{color:#555;font-size:.9em}
"""


@dataclass
class ReportContent:
    """What a report shows; paths are relative to the report folder."""

    title: str
    uri: str
    experiments: dict[str, str]  # name -> experiment id
    parents: pd.DataFrame  # sweep parent runs
    comparison: pd.DataFrame
    best: pd.DataFrame
    importances: pd.DataFrame
    runs: pd.DataFrame
    plots: list[tuple[str, str, str]] = field(default_factory=list)  # (title, path, caption)
    samples: list[tuple[str, str]] = field(default_factory=list)  # (path, caption)
    files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _missing(v) -> bool:
    return v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v))


def pct(v) -> str:
    """A fraction as a percentage with two decimals; "–" when missing."""
    return "–" if _missing(v) else f"{100 * float(v):.2f}"


def _count(v) -> str:
    return "–" if _missing(v) else f"{float(v):,.0f}"


def _plain(v) -> str:
    if _missing(v):
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _pm(mean, std) -> str:
    return pct(mean) if _missing(std) else f"{pct(mean)} ± {pct(std)}"


def comparison_view(t: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "experiment": t["experiment"],
            "method": t["method"],
            "dataset": t["dataset"],
            "reference": t["reference"].map(_plain),
            "runs": t["n_runs"],
            "seeds": t["seeds"],
            "relative acc. % (mean ± std)": [
                _pm(m, s)
                for m, s in zip(
                    t["relative_accuracy_mean"], t["relative_accuracy_std"], strict=True
                )
            ],
            "student acc. %": [
                _pm(m, s)
                for m, s in zip(t["student_accuracy_mean"], t["student_accuracy_std"], strict=True)
            ],
            "reference acc. %": t["reference_accuracy"].map(pct),
            "proxy %": t["proxy_mean"].map(pct),
            "params": t["student_params_mean"].map(_count),
            "MACs": t["student_macs_mean"].map(_count),
            "wall s": t["wall_seconds_mean"].map(_count),
            "run ids": t["run_ids"],
        }
    )


def _metric_view(t: pd.DataFrame) -> dict:
    return {
        "relative acc. %": t["relative_accuracy"].map(pct),
        "student acc. %": t["student_accuracy"].map(pct),
        "proxy %": t["proxy"].map(pct),
        "params": t["student_params"].map(_count),
        "MACs": t["student_macs"].map(_count),
        "wall s": t["wall_seconds"].map(_count),
    }


def best_view(t: pd.DataFrame) -> pd.DataFrame:
    params = {c.removeprefix(PARAM): t[c].map(_plain) for c in t if c.startswith(PARAM)}
    extra = {
        c.replace("_accuracy", " acc. %"): t[c].map(pct)
        for c in t
        if c.startswith(("header_", "aggregation/"))
    }
    return pd.DataFrame(
        {
            "experiment": t["experiment"],
            "rank": t["rank"],
            "run id": t["run_id"],
            "method": t["method"],
            "dataset": t["dataset"],
            "seed": t["seed"].map(_plain),
            **_metric_view(t),
            **extra,
            **params,
        }
    )


def importance_view(t: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "experiment": t["experiment"],
            "parameter": t["param"],
            "importance": t["importance"].map(lambda v: f"{v:.3f}"),
            "trials": t["n_trials"],
            "source": t["source"],
        }
    )


def runs_view(t: pd.DataFrame) -> pd.DataFrame:
    for m in RESULT_METRICS:
        if m not in t:
            t = t.assign(**{m: math.nan})
    return pd.DataFrame(
        {
            "experiment": t["experiment"],
            "run id": t["run_id"],
            "name": t["run_name"].map(_plain),
            "status": t["status"],
            "kind": t["run_kind"].map(_plain),
            "method": t["method"].map(_plain),
            "dataset": t["dataset"].map(_plain),
            "seed": t["seed"].map(_plain),
            **_metric_view(t),
        }
    )


_TEXT_COLUMNS = {
    "experiment",
    "method",
    "dataset",
    "reference",
    "seeds",
    "run ids",
    "run id",
    "name",
    "status",
    "kind",
    "parameter",
    "source",
}


def _html_table(view: pd.DataFrame) -> str:
    if view.empty:
        return "<p><em>none</em></p>"
    head = "".join(
        f'<th class="{"t" if c in _TEXT_COLUMNS else ""}">{html.escape(str(c))}</th>'
        for c in view.columns
    )
    body = []
    for row in view.itertuples(index=False):
        cells = []
        for c, v in zip(view.columns, row, strict=True):
            text = html.escape(_plain(v))
            if c in ("run id", "run ids"):
                text = f"<code>{text}</code>"
            cells.append(f'<td class="{"t" if c in _TEXT_COLUMNS else ""}">{text}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _md_table(view: pd.DataFrame) -> str:
    if view.empty:
        return "_none_"

    def cell(v) -> str:
        return _plain(v).replace("|", "\\|").replace("\n", " ")

    lines = [
        "| " + " | ".join(cell(c) for c in view.columns) + " |",
        "|" + "|".join("---" for _ in view.columns) + "|",
    ]
    lines += [
        "| " + " | ".join(cell(v) for v in row) + " |" for row in view.itertuples(index=False)
    ]
    return "\n".join(lines)


def _sections(c: ReportContent) -> list[tuple[str, str, pd.DataFrame | None]]:
    """(heading, intro, table) in report order; figures are added by the renderers."""
    return [
        (
            "Comparison",
            "Methods × datasets: mean ± sample std over the runs (seeds `train.seed`) of "
            "each method; the reference accuracy is student / relative accuracy. In a sweep a row "
            "pools every trial of its method; the best configurations follow.",
            comparison_view(c.comparison),
        ),
        (
            "Best configurations",
            "The top runs of each experiment by relative accuracy, with the "
            "parameters that vary between runs.",
            best_view(c.best),
        ),
        (
            "Parameter importances",
            "fANOVA importances (Optuna) of the loss weights and structure "
            "parameters for the relative accuracy. " + _studies(c.importances),
            importance_view(c.importances),
        ),
    ]


def _studies(t: pd.DataFrame) -> str:
    # The runs each study was built from, once per experiment rather than once per row.
    firsts = t.drop_duplicates("experiment")
    return " ".join(
        f"{r.experiment}: {r.n_trials} trials from {r.source} ({r.run_ids})."
        for r in firsts.itertuples(index=False)
    )


def _header_lines(c: ReportContent) -> list[str]:
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    exps = ", ".join(f"{n} (id {i})" for n, i in c.experiments.items())
    lines = [
        f"Tracking store: {c.uri}",
        f"Experiments: {exps}",
        f"{len(c.runs)} trial/distill run(s), {len(c.parents)} sweep parent run(s); "
        f"generated {when}",
    ]
    for _, p in c.parents.iterrows():
        lines.append(f"Sweep parent run of {p['experiment']}: {p['run_id']}")
    return lines


def render_html(c: ReportContent) -> str:
    e = html.escape
    out = [
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{e(c.title)}</title>'
        f"<style>{_CSS}</style></head><body><h1>{e(c.title)}</h1>"
    ]
    out += [f'<p class="meta">{e(line)}</p>' for line in _header_lines(c)]
    if c.notes:
        out.append(
            '<h2>Notes</h2><ul class="notes">'
            + "".join(f"<li>{e(n)}</li>" for n in c.notes)
            + "</ul>"
        )
    for heading, intro, view in _sections(c):
        out.append(f"<h2>{e(heading)}</h2><p>{e(intro)}</p>{_html_table(view)}")
    out.append("<h2>Plots</h2>")
    for title, path, caption in c.plots:
        out.append(
            f'<figure><img src="{e(path)}" alt="{e(title)}"><figcaption><b>{e(title)}.</b> '
            f"{e(caption)}</figcaption></figure>"
        )
    if c.samples:
        out.append('<h2>Generated samples of the best runs</h2><div class="grid">')
        out += [
            f'<figure><img src="{e(p)}" alt="samples {e(cap)}">'
            f"<figcaption>{e(cap)}</figcaption></figure>"
            for p, cap in c.samples
        ]
        out.append("</div>")
    out.append(f"<h2>All runs</h2>{_html_table(runs_view(c.runs))}<h2>Files</h2><ul>")
    out += [f'<li><a href="{e(f)}">{e(f)}</a></li>' for f in c.files]
    out.append("</ul></body></html>")
    return "\n".join(out) + "\n"


def render_markdown(c: ReportContent) -> str:
    out = [f"# {c.title}", ""] + [f"- {line}" for line in _header_lines(c)] + [""]
    if c.notes:
        out += ["## Notes", ""] + [f"- {n}" for n in c.notes] + [""]
    for heading, intro, view in _sections(c):
        out += [f"## {heading}", "", intro, "", _md_table(view), ""]
    out += ["## Plots", ""]
    for title, path, caption in c.plots:
        out += [f"![{title}]({path})", "", f"*{title}.* {caption}", ""]
    if c.samples:
        out += ["## Generated samples of the best runs", ""]
        for path, caption in c.samples:
            out += [f"![samples]({path})", "", caption, ""]
    out += ["## All runs", "", _md_table(runs_view(c.runs)), "", "## Files", ""]
    out += [f"- [{f}]({f})" for f in c.files]
    return "\n".join(out) + "\n"
