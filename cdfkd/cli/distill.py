"""``cdfkd distill`` and ``cdfkd aggregate``: one distillation run, and header aggregation afterwards."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cdfkd.cli.common import Subparsers, add_trust, apply_trust, command, pct


@command
def _distill(sub: Subparsers) -> None:
    p = sub.add_parser(
        "distill",
        help="distil a teacher ensemble into a student with one method (a YAML config)",
        description="Validate the config, then train generator and student; writes OUT/result.json, "
        "samples.png, checkpoint.pt and student.pt.",
    )
    p.add_argument("--config", required=True, help="YAML config (see configs/)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set method.alpha=0.5 (repeatable)",
    )
    p.add_argument("--out", default=None, help="run folder (default: runs/<config name>)")
    p.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its checkpoint"
    )
    p.add_argument(
        "--few-shot",
        type=int,
        default=None,
        metavar="M",
        help="train the header aggregation on M real labelled samples per class at the end",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--skip-validation-set",
        action="store_true",
        help="do not build the teachers' synthetic validation set when their folder has none "
        "(it takes minutes on CPU for large teachers): the run then has no selection_score; "
        "`cdfkd teachers validation-set DIR` builds it later",
    )
    add_trust(p)
    p.set_defaults(func=_run_distill)


def _run_distill(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from cdfkd.config import load_config
    from cdfkd.runs import RunDir
    from cdfkd.tracking.protocol import JsonlLogger, MultiLogger
    from cdfkd.train import preflight, run

    apply_trust(args)
    overrides = list(args.overrides)
    if args.few_shot is not None:
        overrides.append(f"aggregation.few_shot={args.few_shot}")
    cfg = load_config(args.config, overrides)
    preflight(cfg)
    out = Path(args.out or Path("runs") / Path(args.config).stem)
    # an altered set is refused before the folder is made; skipped, the folder's own set
    # (if any) is still read and verified by run()
    validation = None if args.skip_validation_set else _validation_set(cfg)
    RunDir(out).prepare(args.resume)  # before any logger writes into the folder
    bar = tqdm(
        total=cfg.train.steps,
        desc=f"{cfg.method.name}",
        unit="step",
        file=sys.stderr,
        disable=args.no_progress,
        dynamic_ncols=True,
    )
    shown: dict = {}

    def on_progress(step: int, total: int, losses: dict) -> None:
        if bar.n == 0 and step > 1:
            bar.update(step - 1)  # resumed: start the bar where the run is
        bar.update(1)
        if step % 10 == 0 or step == total:
            shown.update({k.removeprefix("loss/"): f"{v:.3g}" for k, v in losses.items()})
            bar.set_postfix(shown, refresh=False)

    def on_eval(step: int, metrics: dict, _out: Path) -> None:
        shown["acc"] = pct(metrics.get("student_accuracy"))
        shown["rel"] = pct(metrics.get("relative_accuracy"))

    mlf = _mlflow_logger(cfg, out) if cfg.tracking.enabled else None
    logger = MultiLogger(JsonlLogger(out), mlf)
    try:
        result = run(
            cfg,
            out,
            logger=logger,
            resume=args.resume,
            on_progress=on_progress,
            on_eval=on_eval,
            validation=validation,
        )
    except KeyboardInterrupt:
        logger.close("KILLED")
        raise
    except BaseException:
        logger.close("FAILED")
        raise
    finally:
        bar.close()
    logger.close("FINISHED")
    ref = result["reference"]
    print(
        f"{result['method']} on {result['dataset']}: student accuracy {pct(result['student_accuracy'])} %, "
        f"relative accuracy {pct(result['relative_accuracy'])} % of {ref['kind']} ({pct(ref['accuracy'])} %)"
    )
    if len(result["header_accuracies"]) > 1:
        print("headers: " + ", ".join(f"{pct(a)} %" for a in result["header_accuracies"]))
    if "aggregation" in result:
        _print_aggregation(result["aggregation"])
    if "few_shot_estimate" in result:
        f = result["few_shot_estimate"]
        print(
            f"accuracy on {f['samples']} real labelled samples ({f['per_class']}/class): "
            f"{pct(f['accuracy'])} % ({pct(f['low'])}-{pct(f['high'])} %, "
            f"{100 * f['confidence']:.0f} % Wilson interval)"
        )
    if result.get("selection_score") is not None:
        print(
            f"selection_score {result['selection_score']:.4f} "
            f"({result['selection']['score']} on the teachers' validation set)"
        )
    print(
        f"proxy {result['proxy']:.4f}; {result['student_params']} params, {result['student_macs']} MACs; "
        f"{result['steps']} steps in {result['wall_seconds']:.0f} s; wrote {out}/result.json"
    )
    if mlf is not None and mlf.run_id:
        print(f"MLflow run {mlf.run_id} in experiment {mlf.experiment} at {mlf.tracking_uri}")
    return 0


def _validation_set(cfg):
    """The teachers' synthetic validation set (selection_score), built and cached in their
    folder first when it has none; an altered one is refused with the fix."""
    from cdfkd.device import resolve_device
    from cdfkd.selection import ensure_validation_set

    return ensure_validation_set(
        cfg.teachers.path,
        device=resolve_device(cfg.train.device),
        progress=lambda line: print(line, file=sys.stderr),
    )


def _mlflow_logger(cfg, out: Path):
    """The run folder's MLflow logger; the URI: config, else $MLFLOW_TRACKING_URI, else ./mlflow.db."""
    from cdfkd.teachers import ensemble_id_of_dir
    from cdfkd.tracking.mlflow_logger import MLflowLogger
    from cdfkd.tracking.tags import standard_tags
    from cdfkd.tracking.uri import DEFAULT_EXPERIMENT

    t = cfg.tracking
    teachers_id = ensemble_id_of_dir(cfg.teachers.path)
    return MLflowLogger(
        out,
        t.uri,
        t.experiment or DEFAULT_EXPERIMENT,
        run_name=t.run_name or out.name,
        params={"teachers.ensemble_id": teachers_id} if teachers_id else None,
        tags=standard_tags("distill", teachers_id),
        log_models=t.log_model,
    )


@command
def _aggregate(sub: Subparsers) -> None:
    p = sub.add_parser(
        "aggregate",
        help="learn the attention aggregation of a finished run's headers from M real samples per class",
        description="Train CDFKD-MFS's attention-based aggregation on M labelled samples per class "
        "(checkpoint chosen on a held-out part of them, never the test set) and compare it with "
        "plain averaging on the test set; updates RUN_DIR/result.json.",
    )
    p.add_argument("run_dir", help="a finished `cdfkd distill` run folder")
    p.add_argument(
        "--few-shot",
        type=int,
        required=True,
        metavar="M",
        help="labelled samples per class (1-100)",
    )
    p.add_argument("--data-root", default=None, help="dataset root (default: the run's)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: the run's)")
    add_trust(p)
    p.set_defaults(func=_run_aggregate)


def _run_aggregate(args: argparse.Namespace) -> int:
    from cdfkd.aggregation import aggregate_run
    from cdfkd.errors import ConfigError
    from cdfkd.runs import RESULT, RunDir

    apply_trust(args)
    run_dir = Path(args.run_dir)
    if not RunDir(run_dir).finished:
        raise ConfigError(
            f"{run_dir} holds no finished run (no {RESULT}): run `cdfkd distill` first"
        )
    agg = aggregate_run(run_dir, args.few_shot, device=args.device, data_root=args.data_root)
    _print_aggregation(agg)
    print(f"updated {run_dir / RESULT}")
    return 0


def _print_aggregation(agg: dict) -> None:
    print(
        f"aggregation with {agg['few_shot']} samples/class (selection: {agg['selection']}): "
        f"averaging {pct(agg['averaging_accuracy'])} % -> attention {pct(agg['aggregated_accuracy'])} %"
    )
