"""``cdfkd report``: the report of one experiment, or several side by side, from MLflow runs."""

from __future__ import annotations

import argparse
from pathlib import Path

from cdfkd.cli.common import Subparsers, command


@command
def _report(sub: Subparsers) -> None:
    p = sub.add_parser(
        "report",
        help="tables, plots and a static HTML page of a sweep's (or several sweeps') MLflow runs",
        description="Read the runs of MLflow experiments and write OUT/index.html (opens "
        "from disk), report.md, runs.csv, comparison.csv, best.csv, importances.csv, plots/ and "
        "the best runs' sample grids in samples/. Only reads the tracking store.",
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--experiment",
        metavar="NAME",
        help="one MLflow experiment (a sweep's name; distill runs: cdfkd-distill)",
    )
    which.add_argument(
        "--compare",
        nargs="+",
        metavar="NAME",
        help="several experiments side by side (one table, plots coloured by experiment)",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="report folder to write")
    p.add_argument(
        "--tracking-uri",
        default=None,
        metavar="URI",
        help="MLflow store, e.g. sqlite:///mlflow.db or http://host:5000 "
        "(default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)",
    )
    p.add_argument(
        "--top-k",
        type=int,
        default=3,
        metavar="K",
        help="best runs listed per experiment, with their sample grids (default 3)",
    )
    p.add_argument(
        "--journal",
        action="append",
        default=[],
        metavar="[NAME=]PATH",
        help="a sweep's Optuna journal (<storage_path>/<name>/optuna.log) for the parameter "
        "importances instead of rebuilding the study from the runs; NAME= picks the experiment "
        "with --compare (repeatable)",
    )
    p.set_defaults(func=_run_report)


def _journals(specs: list[str], experiments: list[str]) -> dict[str, str]:
    from cdfkd.reports.query import ReportError

    out = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            if len(experiments) != 1:
                raise ReportError(
                    f"--journal {spec}: with --compare say which experiment it belongs to "
                    "(--journal NAME=PATH)"
                )
            name, path = experiments[0], spec
        out[name] = path
    return out


def _run_report(args: argparse.Namespace) -> int:
    from cdfkd.reports import build_report
    from cdfkd.reports.query import ReportError

    if args.top_k < 1:
        raise ReportError(f"--top-k {args.top_k}: give at least 1")
    experiments = args.compare or [args.experiment]
    paths = build_report(
        experiments,
        args.out,
        args.tracking_uri,
        top_k=args.top_k,
        journals=_journals(args.journal, experiments),
    )
    index = paths["index.html"]
    pngs = sum(1 for k in paths if k.endswith(".png"))
    print(f"wrote {len(paths)} files ({pngs} images) to {Path(args.out)}")
    print(f"open {index.as_uri()} in a browser (no server needed)")
    print(f"tables: {Path(args.out) / 'comparison.csv'}, best.csv, importances.csv, runs.csv")
    from cdfkd.tracking.uri import resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri)
    print(
        f"MLflow UI on these runs: mlflow ui --backend-store-uri {uri}  (then open http://127.0.0.1:5000)"
    )
    return 0
