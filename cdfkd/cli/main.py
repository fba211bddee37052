"""The ``cdfkd`` command line (also ``python -m cdfkd``).

Each top-level subcommand is one ``@command`` function in a module of this package
that adds its parser and sets ``func`` (called with the parsed args; returns the exit
code). Heavy imports happen inside the handlers so ``cdfkd --help`` stays quick; the
sweep and report handlers are the only code under ``cdfkd/`` that imports
``cdfkd.tune`` and ``cdfkd.reports`` (the layers above the library).
Exit codes: 0 success, 1 a failure reported on stderr, 2 usage errors, 130 Ctrl-C.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence

# Importing a command module registers its subcommands, in this order in --help.
from cdfkd.cli import distill, export, mlflow, report, sweep, teachers  # noqa: F401
from cdfkd.cli.common import COMMANDS

log = logging.getLogger("cdfkd")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cdfkd",
        description="Data-free knowledge distillation from teacher ensembles "
        "(CGDD, CDFKD-MFS and baselines).",
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)"
    )
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # OpenMP threads that spin while waiting make every op ~40x slower when the
    # cores are shared (measured: lenet5 step 1.1 s vs 25 ms on 2 busy cores).
    # Only effective before torch is first imported, which happens below.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help(sys.stderr)
        return 2
    level = logging.WARNING - 10 * min(args.verbose, 2)
    # MLflow announces database migrations and runs at INFO on stderr; keep the
    # command's own output readable unless -v asks for more.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", logging.getLevelName(level))
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )
    from cdfkd.errors import USER_ERRORS

    _terminate_as_interrupt()
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as err:
        # User-facing errors (EnsembleError, ConfigError, unknown names, bad values)
        # carry their fix in the message; -vv adds the traceback.
        log.debug("traceback", exc_info=True)
        text = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"cdfkd: error: {text}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("cdfkd: interrupted", file=sys.stderr)
        return 130


def _terminate_as_interrupt() -> None:
    """SIGTERM (``ray job stop``, ``kill``, a scheduler's stop) ends a command like Ctrl-C:
    runs and sweeps close their MLflow runs as KILLED and keep their checkpoints, so
    ``--resume`` continues them, instead of dying without a word."""
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be set from the main thread

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
