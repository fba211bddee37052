"""``cdfkd export RUN_DIR --format onnx [--int8]``: a finished run's student for deployment."""

from __future__ import annotations

import argparse

from cdfkd.cli.common import Subparsers, add_trust, apply_trust, command, pct, table


@command
def _export(sub: Subparsers) -> None:
    p = sub.add_parser(
        "export",
        help="export a finished run's student as ONNX (and int8), checked with onnxruntime",
        description="Write RUN_DIR/export/student.onnx (the mean of the headers' logits, dynamic "
        "batch) and export.json: onnxruntime vs torch logits at batch 1 and 64 and both "
        "accuracies on the test images, file size and CPU latency. --int8 adds "
        "student.int8.onnx, calibrated on the run's own generated images (no real data). The "
        "files are logged to the run's MLflow run (and so to a sweep's registered student "
        "when RUN_DIR is its trial's run folder).",
    )
    p.add_argument("run_dir", help="a finished `cdfkd distill` run folder (or a trial's run/)")
    p.add_argument("--format", dest="fmt", default="onnx", choices=["onnx"], help="only onnx")
    p.add_argument("--int8", action="store_true", help="also write a static int8 file")
    p.add_argument(
        "--calibration-images",
        type=int,
        default=256,
        metavar="N",
        help="generated images to calibrate int8 on (default 256)",
    )
    p.add_argument("--data-root", default=None, help="dataset root (default: the run's)")
    p.add_argument(
        "--latency-seconds",
        type=float,
        default=1.0,
        metavar="S",
        help="time spent timing each file at each batch size (default 1)",
    )
    p.add_argument("--no-mlflow", action="store_true", help="do not log the files to MLflow")
    p.add_argument("--tracking-uri", default=None, help="log to this URI instead of the run's")
    add_trust(p)
    p.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from cdfkd.export import export_run

    apply_trust(args)
    report = export_run(
        args.run_dir,
        args.fmt,
        int8=args.int8,
        calibration_images=args.calibration_images,
        data_root=args.data_root,
        latency_budget_s=args.latency_seconds,
    )
    _print_report(report)
    if not args.no_mlflow:
        from cdfkd.tracking.exports import log_export

        logged = log_export(args.run_dir, report["files"], args.tracking_uri)
        if logged["run_id"] is None:
            print("MLflow: this run was not tracked; nothing logged")
        elif logged["pending"]:
            print(
                f"MLflow: run {logged['run_id']} is unreachable; the files wait in the outbox: "
                f"`cdfkd mlflow sync {args.run_dir}`"
            )
        else:
            print(f"MLflow: logged under export/ of run {logged['run_id']}")
            for version in logged["versions"]:
                print(f"MLflow: registered {version} tagged with the export files")
    return 0


def _print_report(r: dict) -> None:
    parity = r["parity"]
    diffs = ", ".join(f"{k.replace('_', ' ')} {v:.1e}" for k, v in parity["max_abs_diff"].items())
    print(
        f"onnxruntime vs torch on {parity['images']} {parity['source']}: max |logit diff| {diffs}"
    )
    lat = r["latency_ms_per_image"]
    rows = [
        [
            "fp32",
            f"{r['fp32']['bytes'] / 1e6:.2f}",
            pct(r["accuracy"]["onnxruntime"]),
            f"{lat['fp32']['batch_1']:.3f}",
            f"{lat['fp32']['batch_64']:.3f}",
        ]
    ]
    if "int8" in r:
        q = r["int8"]
        rows.append(
            [
                "int8",
                f"{q['bytes'] / 1e6:.2f}",
                pct(q["accuracy"]),
                f"{lat['int8']['batch_1']:.3f}",
                f"{lat['int8']['batch_64']:.3f}",
            ]
        )
    header = ["file", "MB", "accuracy %", "ms/img b1", "ms/img b64"]
    print(table(header, rows))
    print(f"torch accuracy {pct(r['accuracy']['torch'])} %; wrote {r['files']['report']}")
