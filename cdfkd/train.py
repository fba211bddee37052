"""The distillation loop: ``run(cfg, out_dir) -> result``. The CLI and the sweep both call it."""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from cdfkd.config import ConfigError, ExperimentConfig
from cdfkd.metrics import agreement_proxy, evaluate_headers, reference_accuracy, relative_accuracy

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
RESULT = "result.json"


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN or inf; the run stopped and its last good checkpoint is kept."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name} but CUDA is not available here: use cpu or auto")
    return device


def _loader(ds, batch_size: int, device: torch.device):
    # Its own generator: iterating a DataLoader otherwise draws a seed from the
    # global RNG, and evaluation must not shift what training draws next.
    return torch.utils.data.DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=False,
        num_workers=0,
        pin_memory=device.type == "cuda",
        generator=torch.Generator(),
    )


def _save_atomic(obj: dict, path: Path) -> None:
    # A crash mid-write must not destroy the last good checkpoint.
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, corrupt or not ours
        raise ConfigError(
            f"checkpoint {path} cannot be read ({type(err).__name__}: {err}); "
            "delete it to start over, or restore it from a backup"
        ) from None


def save_sample_grid(method, info, path: Path) -> Path | None:
    """De-normalised generated samples as a PNG grid (one row per class for conditional generators)."""
    from torchvision.utils import save_image

    images, ncol = method.sample_images()
    if images.numel() == 0:
        return None
    mean = torch.tensor(info.mean, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(info.std, device=images.device).view(1, -1, 1, 1)
    save_image((images * std + mean).clamp(0, 1).cpu(), path, nrow=ncol, padding=1)
    return path


def preflight(cfg: ExperimentConfig, teachers=None) -> None:
    """Checks that need the file system, done before any data is loaded or any step runs.

    Collects every problem (missing teacher ensemble, a student structure the
    teachers' geometry or count cannot take, a missing kd_real reference) into
    one ConfigError.
    """
    from cdfkd.teachers import read_manifest

    problems = []
    geometry = None
    if teachers is not None:
        geometry = (
            teachers.info.channels,
            teachers.info.image_size,
            teachers.info.num_classes,
            teachers.num_teachers,
        )
    else:
        try:
            m = read_manifest(cfg.teachers.path)
            info = m.info()
            geometry = (info.channels, info.image_size, m.num_classes, len(m.teachers))
        except (ValueError, OSError) as err:
            problems.append(f"teachers.path: {err}")
    if geometry is not None:
        channels, size, classes, count = geometry
        s = cfg.student
        if s.headers not in (1, count):
            problems.append(
                f"student.headers={s.headers}: with {count} teachers use 1 header or {count}"
            )
        else:
            try:
                s.build(classes, channels, size)
            except (ValueError, KeyError) as err:
                problems.append(f"student: {err.args[0] if err.args else err}")
    if cfg.reference.kind == "kd_real" and not Path(cfg.reference.result).is_file():
        problems.append(
            f"reference.result: {cfg.reference.result} does not exist (run a kd_real distill first)"
        )
    if problems:
        raise ConfigError("the config cannot run:\n" + "\n".join(f"  {p}" for p in problems))


def run(
    cfg: ExperimentConfig,
    out_dir: str | Path,
    *,
    logger=None,
    resume: bool = False,
    teachers=None,
    on_progress: Callable[[int, int, dict], None] | None = None,
    on_eval: Callable[[int, dict, Path], None] | None = None,
) -> dict:
    """Distil ``cfg.teachers`` into a student with ``cfg.method``; write and return result.json.

    ``teachers`` may be passed in (the sweep ships one ensemble to every trial);
    ``on_progress(step, total, losses)`` is called after every step and
    ``on_eval(step, metrics, out_dir)`` after each evaluation and checkpoint.
    """
    from cdfkd.aggregation import run_aggregation
    from cdfkd.methods import create_method
    from cdfkd.models import count_macs, count_params
    from cdfkd.teachers import load_ensemble
    from cdfkd.tracking import NullLogger, flatten

    preflight(cfg, teachers)
    logger = logger or NullLogger()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / CHECKPOINT
    if ckpt_path.exists() and not resume:
        raise ConfigError(
            f"{out} already holds a run: pass --resume to continue it, or choose another --out"
        )
    if resume and not ckpt_path.exists():
        raise ConfigError(f"--resume: no {CHECKPOINT} in {out}; run without --resume to start")
    t_start = time.time()
    tc = cfg.train
    device = resolve_device(tc.device)
    if tc.threads:
        torch.set_num_threads(tc.threads)

    # Data: the test split for evaluation; the train split only for kd_real and few-shot.
    d = cfg.data
    train_ds, test_ds, info = d.load()
    test_loader = _loader(test_ds, tc.eval_batch_size, device)

    # Teachers: the one way in is a verified ensemble directory.
    if teachers is None:
        teachers = load_ensemble(
            cfg.teachers.path, device, expect_num_classes=info.num_classes, mode=cfg.teachers.mode
        )
    t_info = teachers.info
    if (t_info.channels, t_info.image_size) != (info.channels, info.image_size):
        raise ConfigError(
            f"teachers expect {t_info.channels}x{t_info.image_size}px inputs but data gives "
            f"{info.channels}x{info.image_size}px: set data.image_size={t_info.image_size}"
        )
    manifest = teachers.manifest
    kd_ref = None
    if cfg.reference.kind == "kd_real":
        kd_ref = json.loads(Path(cfg.reference.result).read_text())
    ref_acc = reference_accuracy(cfg.reference.kind, manifest, kd_ref)
    teacher_accs = [t.get("test_accuracy") for t in manifest["teachers"]]
    if ref_acc is None or None in teacher_accs:
        # An ensemble saved without its accuracies: measure them on this test set.
        measured = evaluate_headers(teachers, test_loader, device)
        teacher_accs = measured["header_accuracy"]
        manifest = {
            **manifest,
            "ensemble_accuracy": measured["accuracy"],
            "teachers": [
                {**t, "test_accuracy": a}
                for t, a in zip(manifest["teachers"], teacher_accs, strict=True)
            ],
        }
        ref_acc = reference_accuracy(cfg.reference.kind, manifest, kd_ref)

    method = create_method(cfg, teachers, info, device, train_data=train_ds)
    if resume:
        method.load_state_dict(load_checkpoint(ckpt_path))
        log.info("resumed %s at step %d", out, method.step_count)
    if not resume or not (out / "config.yaml").exists():
        # A trial resumed in a new Ray session starts from an empty folder.
        (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    logger.log_params(flatten(cfg.to_dict()))
    logger.set_tags({"method": cfg.method.name, "dataset": d.name, "reference": cfg.reference.kind})

    def evaluate(final: bool) -> dict:
        ev = method.evaluate(test_loader, None if final else tc.max_eval_samples)
        proxy = agreement_proxy(
            method.predict,
            lambda x: teachers(x).mean(0),
            method.proxy_batches(4, min(tc.batch_size, 256)),
            info.num_classes,
        )
        return {
            "student_accuracy": ev["accuracy"],
            "relative_accuracy": relative_accuracy(ev["accuracy"], ref_acc),
            "proxy": proxy,
            **{f"header_{i}_accuracy": a for i, a in enumerate(ev["header_accuracy"])},
        }

    # Train: each step is one generator/student round of the method.
    total = tc.steps
    metrics: dict = {}
    t_train = time.time()
    steps_at_start = method.step_count
    while method.step_count < total:
        losses = method.step()
        step = method.step_count
        values = torch.stack([v.float() for v in losses.values()])
        if not torch.isfinite(values).all():
            bad = next(k for k, v in losses.items() if not torch.isfinite(v))
            kept = (
                f"last good checkpoint kept at {ckpt_path}"
                if ckpt_path.exists()
                else "no checkpoint yet"
            )
            raise NonFiniteLossError(
                f"loss {bad!r} became {losses[bad].item()} at step {step}; {kept}. "
                "Lower the learning rates or the loss weights, then resume or restart"
            )
        scalars = {f"loss/{k}": v for k, v in zip(losses, values.tolist(), strict=True)}
        if on_progress is not None:
            on_progress(step, total, scalars)
        if step % tc.eval_every == 0 or step == total:
            metrics = evaluate(final=False)
            elapsed = time.time() - t_train
            metrics["steps_per_second"] = (step - steps_at_start) / max(elapsed, 1e-9)
            logger.log_metrics({**scalars, **metrics}, step)
        if step % tc.checkpoint_every == 0 or step == total:
            _save_atomic(method.state_dict(), ckpt_path)
        if on_eval is not None and (step % tc.eval_every == 0 or step == total):
            on_eval(step, metrics, out)

    loop_seconds = time.time() - t_train
    # Final: full test set, proxy, sizes, samples, optional few-shot aggregation.
    final = evaluate(final=True)
    c, s = info.channels, info.image_size
    result = {
        "method": cfg.method.name,
        "dataset": d.name,
        "teachers": {
            "path": str(cfg.teachers.path),
            "archs": list(teachers.archs),
            "accuracies": teacher_accs,
            "ensemble_accuracy": manifest["ensemble_accuracy"],
        },
        "student_accuracy": final["student_accuracy"],
        "header_accuracies": [final[k] for k in sorted(final) if k.startswith("header_")],
        "relative_accuracy": final["relative_accuracy"],
        "reference": {
            "kind": cfg.reference.kind,
            "accuracy": ref_acc,
            "name": cfg.reference.name or cfg.reference.kind,
        },
        "proxy": final["proxy"],
        "student_params": count_params(method.student),
        "student_macs": count_macs(method.student, (1, c, s, s)),
        "steps": method.step_count,
        "wall_seconds": time.time() - t_start,
        "loop_seconds": loop_seconds,
        "device": str(device),
        "host": platform.node(),
        "config": cfg.to_dict(),
    }
    torch.save(method.student.state_dict(), out / "student.pt")
    grid = save_sample_grid(method, info, out / "samples.png")
    if cfg.aggregation.few_shot > 0:
        # The few real samples are seen as they are, without training-time augmentation.
        plain_train, _, _ = d.load(augment=False)
        result["aggregation"] = run_aggregation(
            method, plain_train, test_loader, cfg.aggregation, device, out
        )
    (out / RESULT).write_text(json.dumps(result, indent=2))
    agg = result.get("aggregation") or {}
    logger.log_metrics(
        {
            **final,
            **{k: result[k] for k in ("student_params", "student_macs", "wall_seconds")},
            **{
                f"aggregation/{k}": agg[k]
                for k in ("averaging_accuracy", "aggregated_accuracy")
                if k in agg
            },
        },
        method.step_count,
    )
    for artifact in (out / "config.yaml", out / RESULT, grid):
        if artifact is not None and artifact.exists():
            logger.log_artifact(artifact)
    # Model: loggers that keep models (MLflow) get the student and an example input batch.
    for lg in getattr(logger, "loggers", [logger]):
        if hasattr(lg, "log_model"):
            lg.log_model(method.student, next(iter(test_loader))[0])
    return result
