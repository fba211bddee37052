"""``cdfkd teachers train|import|eval``: teacher ensembles trained here or elsewhere, re-checked."""

from __future__ import annotations

import argparse
import sys

from cdfkd.cli.common import (
    Subparsers,
    add_device,
    add_model_kwargs,
    add_trust,
    apply_trust,
    command,
    model_kwargs,
    pct,
    setup_device,
    table,
)


@command
def _teachers(sub: Subparsers) -> None:
    p = sub.add_parser(
        "teachers",
        help="train teacher ensembles, import trained ones, verify saved ones",
        description="Train an ensemble of teachers on real data, import teachers trained "
        "elsewhere, or re-check a saved ensemble.",
    )
    actions = p.add_subparsers(title="actions", metavar="ACTION", required=True)

    t = actions.add_parser(
        "train",
        help="train N teachers and write DIR/ensemble.json",
        description="Train N teachers (seeds S..S+N-1) with the dataset's recipe (SGD, cosine LR); "
        "omitted options take the recipe's defaults (cdfkd.data.dataset_spec(NAME).recipe).",
    )
    t.add_argument("--dataset", required=True, help="dataset name (cdfkd.data.list_datasets())")
    t.add_argument(
        "--arch",
        required=True,
        help="teacher model: a zoo name (cdfkd.models.list_models()), torchvision:<name> or "
        "package.module:function",
    )
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
    add_model_kwargs(t)
    add_device(t)
    t.set_defaults(func=_teachers_train)

    i = actions.add_parser(
        "import",
        help="check and evaluate teachers trained elsewhere and write DIR/ensemble.json",
        description="Build ARCH for the dataset, load each weights file into it (safetensors, or "
        "a torch state dict read with weights_only=True), check the inputs it takes and its "
        "logits, measure its test accuracy when the data is here, and write a verified "
        "ensemble folder. A package.module:function arch is trusted for this command (it is "
        "named here); later commands that load the folder need --trust MODULE.",
    )
    i.add_argument("--arch", required=True, help="zoo name, torchvision:<name> or pkg.mod:fn")
    i.add_argument(
        "--weights", nargs="+", required=True, metavar="FILE", help="one weights file per teacher"
    )
    i.add_argument("--dataset", required=True, help="dataset name (cdfkd.data.list_datasets())")
    i.add_argument("--out", required=True, help="ensemble directory to write")
    i.add_argument("--data-root", default="data", help="dataset root folder (default: data)")
    i.add_argument("--image-size", type=int, default=None, help="input side (default: dataset's)")
    i.add_argument("--split-seed", type=int, default=0, help="split seed (digits, caltech101)")
    i.add_argument(
        "--mean",
        type=float,
        nargs="+",
        default=None,
        help="per-channel input mean, used only when the dataset cannot be loaded here",
    )
    i.add_argument("--std", type=float, nargs="+", default=None, help="per-channel std (same)")
    i.add_argument("--no-download", action="store_true", help="never download datasets")
    i.add_argument("--overwrite", action="store_true", help="replace an ensemble already in --out")
    add_model_kwargs(i)
    add_trust(i)
    add_device(i)
    i.set_defaults(func=_teachers_import)

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
    add_trust(e)
    add_device(e)
    e.set_defaults(func=_teachers_eval)

    v = actions.add_parser(
        "validation-set",
        help="build (or verify) the synthetic validation set that selection_score is computed on",
        description="Synthesise class-balanced images from the teachers alone (BN-statistics "
        "inversion, DeepInversion-style, with a diversity term) and store them in DIR with their "
        "sha256 in DIR/ensemble.json. Sweeps and `cdfkd distill` build it themselves when it is "
        "missing; an existing set is verified and kept unless --rebuild.",
    )
    v.add_argument("dir", help="ensemble directory")
    v.add_argument("--per-class", type=int, default=None, help="images per class (default 50)")
    v.add_argument("--iterations", type=int, default=None, help="optimiser steps (default 200)")
    v.add_argument("--seed", type=int, default=None, help="synthesis seed (default 0)")
    v.add_argument("--rebuild", action="store_true", help="replace the set the folder has")
    v.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_trust(v)
    add_device(v)
    v.set_defaults(func=_teachers_validation_set)


def _teachers_train(args: argparse.Namespace) -> int:
    import time

    from tqdm import tqdm

    from cdfkd.teachers import TeacherTrainConfig, TrainProgress, train_ensemble

    apply_trust(args, args.arch)  # the arch is named on this command line
    device = setup_device(args)
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
        model_kwargs=model_kwargs(args) or None,
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
                f"teacher {p.teacher}: test accuracy {pct(p.test_accuracy)} %", file=sys.stderr
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
    _print_manifest(manifest)
    print(f"wrote {args.out}/ensemble.json in {time.perf_counter() - t0:.1f} s on {device}")
    return 0


def _print_manifest(manifest: dict) -> None:
    rows = [
        [str(i), t["file"], str(t["seed"]), pct(t["test_accuracy"]), t["sha256"][:12]]
        for i, t in enumerate(manifest["teachers"])
    ]
    print(table(["#", "file", "seed", "test acc %", "sha256"], rows))
    print(f"ensemble (mean logits): {pct(manifest['ensemble_accuracy'])} %")


def _teachers_import(args: argparse.Namespace) -> int:
    from cdfkd.teachers import import_ensemble

    apply_trust(args, args.arch)  # the arch is named on this command line
    device = setup_device(args)
    manifest = import_ensemble(
        args.arch,
        args.weights,
        args.dataset,
        args.out,
        data_root=args.data_root,
        image_size=args.image_size,
        split_seed=args.split_seed,
        download=not args.no_download,
        model_kwargs=model_kwargs(args),
        mean=args.mean,
        std=args.std,
        device=device,
        overwrite=args.overwrite,
    )
    _print_manifest(manifest)
    if manifest["ensemble_accuracy"] is None:
        print(f"{args.dataset} is not available here: accuracies not measured")
    print(f"wrote {args.out}/ensemble.json (verified: every file re-read and its hash checked)")
    return 0


def _train_with_ray(args: argparse.Namespace, cfg, bar) -> dict:
    # The Ray layer sits above the library; it is imported only for --ray.
    from cdfkd.tune.teachers import train_ensemble_on_ray

    return train_ensemble_on_ray(
        cfg,
        args.out,
        address=args.address,
        data_root=args.data_root,
        cpus_per_teacher=args.cpus_per_teacher,
        gpus_per_teacher=args.gpus_per_teacher,
        overwrite=args.overwrite,
        progress=lambda line: (bar.update(cfg.epochs), bar.write(line, file=sys.stderr)),
    )


def _teachers_eval(args: argparse.Namespace) -> int:
    from cdfkd.teachers import check_ensemble_dir

    apply_trust(args)
    device = setup_device(args)
    report = check_ensemble_dir(
        args.dir,
        device,
        data_root=args.data_root,
        download=not args.no_download,
        tolerance=args.tolerance,
        batch_size=args.batch_size,
    )
    rows = [
        [r.file, r.arch, str(r.seed), pct(r.recorded), pct(r.measured), r.problem or "ok"]
        for r in report.rows
    ]
    rows.append(
        [
            "ensemble",
            "-",
            "-",
            pct(report.ensemble_recorded),
            pct(report.ensemble_measured),
            "ok" if not report.problems else "FAILED",
        ]
    )
    print(table(["teacher", "arch", "seed", "recorded %", "measured %", "status"], rows))
    if report.samples:
        print(f"{report.dataset} test set: {report.samples} samples, device {device}")
    if report.ok:
        print("OK: every hash matches and every accuracy is within tolerance")
        return 0
    for problem in report.problems:
        print(f"problem: {problem}", file=sys.stderr)
    print(f"FAILED: {args.dir} did not verify", file=sys.stderr)
    return 1


def _teachers_validation_set(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from cdfkd.selection import SELECTION_SCORE, ValidationSetConfig, ensure_validation_set

    apply_trust(args)
    device = setup_device(args)
    given = {"per_class": args.per_class, "iterations": args.iterations, "seed": args.seed}
    cfg = ValidationSetConfig(**{k: v for k, v in given.items() if v is not None})
    bar = tqdm(
        total=None, desc="validation set", unit="step", file=sys.stderr, disable=args.no_progress
    )

    def step(done: int, total: int, loss: float) -> None:
        bar.total = total
        bar.update(done - bar.n)
        bar.set_postfix(loss=f"{loss:.3f}")

    try:
        vs = ensure_validation_set(
            args.dir,
            cfg=cfg,
            rebuild=args.rebuild,
            device=device,
            progress=lambda line: bar.write(line, file=sys.stderr),
            build_progress=step,
        )
    finally:
        bar.close()
    e = vs.entry
    counts = vs.class_counts()
    cpu = e.get("cpu_seconds")
    print(
        f"{args.dir}: validation set {e.get('file')} (sha256 {str(e.get('sha256'))[:12]}...), "
        f"{len(vs.targets)} images, {min(counts)}-{max(counts)} per class"
        + (f", built in {cpu:.0f} CPU-s" if cpu is not None else "")
    )
    print(f"selection_score ({SELECTION_SCORE}) of every run on these teachers is computed on it")
    return 0
