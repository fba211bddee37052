"""``cdfkd mlflow sync DIR``: send what a run could not send while MLflow was unreachable."""

from __future__ import annotations

import argparse

from cdfkd.cli.common import Subparsers, command, table


@command
def _mlflow(sub: Subparsers) -> None:
    p = sub.add_parser(
        "mlflow",
        help="MLflow tracking: replay records buffered while the tracking server was unreachable",
        description="Runs log to MLflow as they go; what could not be sent waits in the run "
        "folder (mlflow_pending.jsonl). These actions send it.",
    )
    actions = p.add_subparsers(title="actions", metavar="ACTION", required=True)
    s = actions.add_parser(
        "sync",
        help="replay the pending MLflow records of a run folder or of every run under a folder",
        description="Walk DIR (a `cdfkd distill` run folder or a sweep's experiment folder) for "
        "mlflow_run.json files and send their pending records in order, parents first. Records "
        "already sent are skipped, so running it again sends nothing twice. Exit 1 while "
        "something is still pending.",
    )
    s.add_argument("dir", help="run folder or experiment folder")
    s.add_argument(
        "--tracking-uri",
        default=None,
        help="send to this URI instead of the one each run recorded (the server moved)",
    )
    s.set_defaults(func=_run_sync)


def _run_sync(args: argparse.Namespace) -> int:
    from cdfkd.tracking.sync import sync_runs

    rows = sync_runs(args.dir, tracking_uri=args.tracking_uri)
    print(
        table(
            ["run folder", "run id", "sent", "pending", "rejected"],
            [
                [
                    r["run_dir"],
                    r["run_id"] or "-",
                    str(r["sent"]),
                    str(r["pending"]),
                    str(r["rejected"]),
                ]
                for r in rows
            ],
        )
    )
    pending = sum(r["pending"] for r in rows)
    rejected = sum(r["rejected"] for r in rows)
    print(
        f"sent {sum(r['sent'] for r in rows)} record(s) from {len(rows)} run folder(s); "
        f"{pending} still pending"
        + (f"; {rejected} refused (see mlflow_rejected.jsonl)" if rejected else "")
    )
    return 1 if pending else 0
