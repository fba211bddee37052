"""``cdfkd sweep`` and ``cdfkd cluster check``: the Ray layer's commands (cdfkd.tune is
imported only inside their handlers)."""

from __future__ import annotations

import argparse
import os
import sys

from cdfkd.cli.common import Subparsers, add_trust, apply_trust, command


@command
def _sweep(sub: Subparsers) -> None:
    p = sub.add_parser(
        "sweep",
        help="search loss weights and header structures with Ray Tune + Optuna (a sweep spec)",
        description="Validate the sweep spec, train the teachers if the spec says how and they are "
        "missing, then run the trials on a local Ray or a cluster; writes results.csv in the "
        "experiment folder and prints the best trial (or the Pareto front).",
    )
    p.add_argument("spec", help="sweep spec YAML (e.g. tune/quickstart.yaml)")
    p.add_argument(
        "--address",
        default=None,
        help="join a Ray cluster: auto (this node's) or ray://HOST:PORT; default: embedded local Ray",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted sweep: finished trials are kept, unfinished ones resume",
    )
    p.add_argument("--name", default=None, help="experiment name (default: the spec's name)")
    add_trust(p)
    p.set_defaults(func=_run_sweep)


@command
def _cluster(sub: Subparsers) -> None:
    p = sub.add_parser(
        "cluster",
        help="check a Ray cluster file (cluster.yaml) or a KubeRay manifest offline",
        description="Validate a cluster-launcher file against Ray's schema and cdfkd's needs "
        "(token authentication, a private dashboard, security groups, a shared file system, "
        "autoscaling that stops idle workers, the same Ray as here) and list the "
        "<PLACEHOLDERS> still to fill in; a KubeRay RayCluster/RayJob manifest "
        "(deploy/kuberay/) gets the same checks against KubeRay's API. With --spec, check that "
        "a worker type offers every resource the sweep's trials ask for, that they fit one, "
        "and that its storage_path is on the shared file system. Exit 1 while anything is an "
        "error or still to fill in.",
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    c = actions.add_parser("check", help="report what `ray up` or `kubectl apply` would trip on")
    c.add_argument(
        "file",
        nargs="?",
        default="cluster.yaml",
        help="cluster.yaml or a KubeRay manifest (default: ./cluster.yaml)",
    )
    c.add_argument("--spec", default=None, help="a sweep spec meant for this cluster")
    c.set_defaults(func=_run_cluster_check)


def _run_cluster_check(args: argparse.Namespace) -> int:
    from cdfkd.tune.cluster import check_cluster, launch_command

    findings = check_cluster(args.file, args.spec)
    for finding in findings:
        print(finding)
    blocking = [f for f in findings if f.level != "warning"]
    warnings = len(findings) - len(blocking)
    launch = launch_command(args.file)
    if blocking:
        print(
            f"{args.file}: {len(blocking)} to fix or fill in"
            + (f", {warnings} warning(s)" if warnings else "")
            + f" before `{launch}`"
        )
        return 1
    print(f"{args.file}: ready for `{launch}`" + (f" ({warnings} warning(s))" if warnings else ""))
    return 0


def _run_sweep(args: argparse.Namespace) -> int:
    # Ray's own console output (experiment banners, log dedup notices) would
    # bury the progress table; everything Ray writes goes to its log files.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    from cdfkd.tune.run import run_sweep

    apply_trust(args)
    summary = run_sweep(
        args.spec,
        address=args.address,
        resume=args.resume,
        name=args.name,
        trust=list(args.trust or []),
        write=lambda line: print(line, file=sys.stderr, flush=True),
    )
    rows = summary["rows"]
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    print(
        f"{len(rows)} trials: " + ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items()))
    )
    if "best" in summary:
        b = summary["best"]
        # The best trial by the spec's objective (which may not be the test set's figure).
        rel = b.get("relative_accuracy")
        rel_text = "-" if rel is None else f"{rel:.4f}"
        print(f"best trial {b['trial_id']} by the objective: relative accuracy {rel_text}")
        if b.get("path"):
            print(f"deploy it: cdfkd export {b['path']}/run --format onnx --int8")
    print(f"results: {summary['experiment_dir']}/results.csv")
    return 0
