"""The ``cdfkd`` command line (also ``python -m cdfkd``).

Each top-level subcommand is one ``@command`` function that adds its parser and
sets ``func`` (called with the parsed args; returns the exit code). Heavy
imports happen inside the handlers so ``cdfkd --help`` stays quick.
Exit codes: 0 success, 1 a failure reported on stderr, 2 usage errors, 130 Ctrl-C.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

log = logging.getLogger("cdfkd")

_Subparsers = argparse._SubParsersAction
_COMMANDS: list[Callable[[_Subparsers], None]] = []


def command(add: Callable[[_Subparsers], None]) -> Callable[[_Subparsers], None]:
    """Register a function that adds one subcommand to the top-level parser."""
    _COMMANDS.append(add)
    return add


# Modules that add subcommands with @command. The sweep and report commands live
# in the packages above the library (cdfkd.tune, cdfkd.reports), which import
# Ray, Optuna and MLflow only when their command runs.
_COMMAND_MODULES = ("cdfkd.cli_distill", "cdfkd.cli_mlflow", "cdfkd.tune.cli", "cdfkd.reports.cli")


def _load_command_modules() -> None:
    import importlib

    for name in _COMMAND_MODULES:
        importlib.import_module(name)


def build_parser() -> argparse.ArgumentParser:
    _load_command_modules()
    parser = argparse.ArgumentParser(
        prog="cdfkd",
        description="Data-free knowledge distillation from teacher ensembles "
        "(CGDD, CDFKD-MFS and baselines).",
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)"
    )
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    for add in _COMMANDS:
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
    from cdfkd.data import DatasetUnavailableError
    from cdfkd.train import NonFiniteLossError

    try:
        return int(args.func(args) or 0)
    except (ValueError, KeyError, DatasetUnavailableError, NonFiniteLossError) as err:
        # User-facing errors (EnsembleError, ConfigError, unknown names, bad values)
        # carry their fix in the message; -vv adds the traceback.
        log.debug("traceback", exc_info=True)
        text = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"cdfkd: error: {text}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("cdfkd: interrupted", file=sys.stderr)
        return 130


# ----------------------------------------------------------------------------- shared helpers


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    p.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: all cores)"
    )


def _setup_device(args: argparse.Namespace):
    import torch

    from cdfkd.train import resolve_device

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    return resolve_device(args.device)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    lines = [
        "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


# ----------------------------------------------------------------------------- teachers


@command
def _teachers(sub: _Subparsers) -> None:
    p = sub.add_parser(
        "teachers",
        help="train teacher ensembles and verify saved ones",
        description="Train an ensemble of teachers on real data, or re-check a saved one.",
    )
    actions = p.add_subparsers(title="actions", metavar="ACTION", required=True)

    t = actions.add_parser(
        "train",
        help="train N teachers and write DIR/ensemble.json",
        description="Train N teachers (seeds S..S+N-1) with the dataset's recipe (SGD, cosine LR); "
        "omitted options take the recipe's defaults (cdfkd.teachers.RECIPES).",
    )
    t.add_argument("--dataset", required=True, help="dataset name (cdfkd.data.list_datasets())")
    t.add_argument("--arch", required=True, help="teacher model (cdfkd.models.list_models())")
    t.add_argument("--count", type=int, default=3, help="number of teachers (default 3)")
    t.add_argument("--epochs", type=int, default=None, help="epochs per teacher")
    t.add_argument("--out", required=True, help="ensemble directory to write")
    t.add_argument("--seed", type=int, default=0, help="teacher i uses seed + i (default 0)")
    t.add_argument("--data-root", default="data", help="dataset root folder (default: data)")
    t.add_argument("--batch-size", type=int, default=None)
    t.add_argument("--lr", type=float, default=None, help="peak learning rate")
    t.add_argument("--image-size", type=int, default=None, help="input side (default: dataset's)")
    t.add_argument(
        "--workers", type=int, default=None, help="DataLoader worker processes (default 0)"
    )
    t.add_argument("--no-download", action="store_true", help="never download datasets")
    t.add_argument("--overwrite", action="store_true", help="replace an ensemble already in --out")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument(
        "--ray",
        action="store_true",
        help="train the N teachers as parallel Ray tasks (local Ray, or --address)",
    )
    t.add_argument(
        "--address", default=None, help="with --ray: join this Ray cluster (auto or HOST:PORT)"
    )
    t.add_argument("--cpus-per-teacher", type=float, default=1.0, help="with --ray (default 1)")
    t.add_argument("--gpus-per-teacher", type=float, default=0.0, help="with --ray (default 0)")
    _add_device(t)
    t.set_defaults(func=_teachers_train)

    e = actions.add_parser(
        "eval",
        help="verify hashes and re-evaluate teachers and ensemble",
        description="Verify every teacher file's sha256, re-evaluate each teacher and the "
        "mean-logit ensemble on the test set and print a table; exit 1 on any problem.",
    )
    e.add_argument("dir", help="ensemble directory")
    e.add_argument(
        "--data-root", default=None, help="dataset root (default: the one used for training)"
    )
    e.add_argument(
        "--tolerance", type=float, default=0.01, help="allowed accuracy drift (default 0.01)"
    )
    e.add_argument("--batch-size", type=int, default=512)
    e.add_argument("--no-download", action="store_true", help="never download datasets")
    _add_device(e)
    e.set_defaults(func=_teachers_eval)


def _teachers_train(args: argparse.Namespace) -> int:
    import time

    from tqdm import tqdm

    from cdfkd.teachers import TeacherTrainConfig, TrainProgress, train_ensemble

    device = _setup_device(args)
    cfg = TeacherTrainConfig.for_dataset(
        args.dataset,
        args.arch,
        count=args.count,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        image_size=args.image_size,
        num_workers=args.workers,
    )
    bar = tqdm(
        total=cfg.count * cfg.epochs,
        desc=f"{cfg.arch} on {cfg.dataset}",
        unit="epoch",
        file=sys.stderr,
        disable=args.no_progress,
        dynamic_ncols=True,
    )

    def progress(p: TrainProgress) -> None:
        bar.update(1)
        bar.set_postfix(teacher=f"{p.teacher + 1}/{p.teachers}", loss=f"{p.loss:.3f}")
        if p.test_accuracy is not None:
            bar.write(
                f"teacher {p.teacher}: test accuracy {_pct(p.test_accuracy)} %", file=sys.stderr
            )

    t0 = time.perf_counter()
    try:
        if args.ray:
            manifest = _train_with_ray(args, cfg, bar)
        else:
            manifest = train_ensemble(
                cfg,
                args.out,
                device,
                data_root=args.data_root,
                download=not args.no_download,
                progress=progress,
                overwrite=args.overwrite,
            )
    finally:
        bar.close()
    rows = [
        [str(i), t["file"], str(t["seed"]), _pct(t["test_accuracy"]), t["sha256"][:12]]
        for i, t in enumerate(manifest["teachers"])
    ]
    print(_table(["#", "file", "seed", "test acc %", "sha256"], rows))
    print(f"ensemble (mean logits): {_pct(manifest['ensemble_accuracy'])} %")
    print(f"wrote {args.out}/ensemble.json in {time.perf_counter() - t0:.1f} s on {device}")
    return 0


def _train_with_ray(args: argparse.Namespace, cfg, bar) -> dict:
    # The Ray layer sits above the library; it is imported only for --ray.
    import ray

    from cdfkd.teachers import EnsembleError
    from cdfkd.tune.actors import train_ensemble_ray
    from cdfkd.tune.run import connect_ray

    if (Path(args.out) / "ensemble.json").exists() and not args.overwrite:
        raise EnsembleError(
            f"{args.out} already holds an ensemble: choose another --out or --overwrite"
        )
    connect_ray(args.address)
    try:
        return train_ensemble_ray(
            cfg,
            args.out,
            data_root=args.data_root,
            cpus_per_teacher=args.cpus_per_teacher,
            gpus_per_teacher=args.gpus_per_teacher,
            progress=lambda line: (bar.update(cfg.epochs), bar.write(line, file=sys.stderr)),
        )
    finally:
        ray.shutdown()


def _teachers_eval(args: argparse.Namespace) -> int:
    from cdfkd.teachers import check_ensemble_dir

    device = _setup_device(args)
    report = check_ensemble_dir(
        args.dir,
        device,
        data_root=args.data_root,
        download=not args.no_download,
        tolerance=args.tolerance,
        batch_size=args.batch_size,
    )
    rows = [
        [r.file, r.arch, str(r.seed), _pct(r.recorded), _pct(r.measured), r.problem or "ok"]
        for r in report.rows
    ]
    rows.append(
        [
            "ensemble",
            "-",
            "-",
            _pct(report.ensemble_recorded),
            _pct(report.ensemble_measured),
            "ok" if not report.problems else "FAILED",
        ]
    )
    print(_table(["teacher", "arch", "seed", "recorded %", "measured %", "status"], rows))
    if report.samples:
        print(f"{report.dataset} test set: {report.samples} samples, device {device}")
    if report.ok:
        print("OK: every hash matches and every accuracy is within tolerance")
        return 0
    for problem in report.problems:
        print(f"problem: {problem}", file=sys.stderr)
    print(f"FAILED: {args.dir} did not verify", file=sys.stderr)
    return 1
