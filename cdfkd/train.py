"""The distillation loop: ``run(cfg, out_dir) -> result``. The CLI and the sweep both call it.

``run`` reads as its three parts: :func:`setup` (checks, data, teachers, the method,
a resumed checkpoint), :func:`train_loop` (one method round per step, evaluations and
checkpoints at their cadence) and :func:`finish` (the final evaluation, the run
folder's result files, the logger's final records).
"""

from __future__ import annotations

import json
import logging
import math
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cdfkd.aggregation import run_aggregation
from cdfkd.config import ExperimentConfig
from cdfkd.data import DatasetInfo
from cdfkd.device import resolve_device
from cdfkd.errors import ConfigError, NonFiniteLossError
from cdfkd.methods import DistillMethod, create_method
from cdfkd.metrics import agreement_proxy, evaluate_headers, reference_accuracy, relative_accuracy
from cdfkd.models import count_macs, count_params
from cdfkd.runs import CHECKPOINT, CONFIG, RESULT, SAMPLES, RunDir, load_checkpoint
from cdfkd.selection import SELECTION_SCORE, few_shot_estimate, score_student
from cdfkd.teachers import MANIFEST, TeacherEnsemble, load_ensemble, read_manifest
from cdfkd.teachers.validation import ValidationSet, read_validation_set
from cdfkd.tracking.protocol import MetricLogger, NullLogger, flatten

__all__ = [
    "CHECKPOINT",
    "RESULT",
    "NonFiniteLossError",
    "Session",
    "finish",
    "load_checkpoint",
    "preflight",
    "run",
    "setup",
    "train_loop",
]

log = logging.getLogger(__name__)

#: ``on_progress(step, total, {"loss/<name>": 0-d tensor})``, after every step; the values
#: stay on the device (reading one waits for it: do it every few steps, as the CLI does)
ProgressFn = Callable[[int, int, dict], None]
#: ``on_eval(step, metrics, run folder)``, after each evaluation and its checkpoint
EvalFn = Callable[[int, dict, Path], None]


def run(
    cfg: ExperimentConfig,
    out_dir: str | Path,
    *,
    logger: MetricLogger | None = None,
    resume: bool = False,
    teachers: TeacherEnsemble | None = None,
    on_progress: ProgressFn | None = None,
    on_eval: EvalFn | None = None,
    validation: ValidationSet | None = None,
) -> dict:
    """Distil ``cfg.teachers`` into a student with ``cfg.method``; write and return result.json.

    ``teachers`` and ``validation`` (the synthetic validation set ``selection_score`` is
    computed on) may be passed in: the sweep ships them to every trial. Without
    ``validation`` the teachers folder's set is used when it has one (hash verified).
    """
    session = setup(
        cfg, out_dir, logger=logger, resume=resume, teachers=teachers, validation=validation
    )
    train_loop(session, on_progress, on_eval)
    return finish(session)


@dataclass
class Session:
    """What :func:`setup` builds and the loop and :func:`finish` use."""

    cfg: ExperimentConfig
    run_dir: RunDir
    device: torch.device
    info: DatasetInfo
    teachers: TeacherEnsemble
    method: DistillMethod
    train_data: torch.utils.data.Dataset
    test_loader: torch.utils.data.DataLoader
    reference: dict  # kind, accuracy, name, teacher accuracies, ensemble accuracy
    logger: MetricLogger
    started_at_step: int
    t_start: float = field(default_factory=time.time)
    loop_seconds: float = 0.0
    validation: ValidationSet | None = None  # None: no selection_score (the folder has no set)
    validation_loader: torch.utils.data.DataLoader | None = None  # data.validation_images
    #: the loop's evaluation of its last step, which is the final one: ``finish`` reuses it
    final_metrics: dict | None = None


# ----------------------------------------------------------------------------- setup


def preflight(cfg: ExperimentConfig, teachers: TeacherEnsemble | None = None) -> None:
    """Checks that need the file system, done before any data is loaded or any step runs.

    Collects every problem (missing teacher ensemble, a student structure the
    teachers' geometry or count cannot take, a missing kd_real reference) into
    one ConfigError.
    """
    problems = []
    geometry = None
    if teachers is not None:
        i = teachers.info
        geometry = (i.channels, i.image_size, i.num_classes, teachers.num_teachers)
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
    if cfg.reference.kind == "kd_real" and not Path(cfg.reference.result or "").is_file():
        problems.append(
            f"reference.result: {cfg.reference.result} does not exist (run a kd_real distill first)"
        )
    if problems:
        raise ConfigError("the config cannot run:\n" + "\n".join(f"  {p}" for p in problems))


def setup(
    cfg: ExperimentConfig,
    out_dir: str | Path,
    *,
    logger: MetricLogger | None = None,
    resume: bool = False,
    teachers: TeacherEnsemble | None = None,
    validation: ValidationSet | None = None,
) -> Session:
    """Everything before the first step; refusals come before any data is loaded."""
    preflight(cfg, teachers)
    if validation is None and (Path(cfg.teachers.path) / MANIFEST).is_file():
        validation = read_validation_set(cfg.teachers.path)  # an altered file is refused here
        if validation is None:
            log.warning(
                "%s has no validation set: no selection_score (build it with "
                "`cdfkd teachers validation-set %s`)",
                cfg.teachers.path,
                cfg.teachers.path,
            )
    run_dir = RunDir(out_dir)
    run_dir.prepare(resume)
    device = resolve_device(cfg.train.device)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    train_ds, test_ds, info = cfg.data.load()
    test_loader = eval_loader(test_ds, cfg.train.eval_batch_size, device)
    validation_ds = cfg.data.load_validation()
    validation_loader = (
        None
        if validation_ds is None
        else eval_loader(validation_ds, cfg.train.eval_batch_size, device)
    )
    if teachers is None:  # the one way in is a verified ensemble directory
        teachers = load_ensemble(
            cfg.teachers.path, device, expect_num_classes=info.num_classes, mode=cfg.teachers.mode
        )
    t = teachers.info
    if (t.channels, t.image_size) != (info.channels, info.image_size):
        raise ConfigError(
            f"teachers expect {t.channels}x{t.image_size}px inputs but data gives "
            f"{info.channels}x{info.image_size}px: set data.image_size={t.image_size}"
        )
    reference = measure_reference(cfg, teachers, test_loader, device)
    method = create_method(cfg, teachers, info, device, train_data=train_ds)
    if resume:
        method.load_state_dict(run_dir.load_checkpoint())
        log.info("resumed %s at step %d", run_dir.path, method.step_count)
    if not resume or not (run_dir / CONFIG).exists():
        run_dir.write_config(cfg)  # a trial resumed in a new Ray session has an empty folder
    logger = logger or NullLogger()
    logger.log_params(flatten(cfg.to_dict()))
    logger.set_tags(
        {"method": cfg.method.name, "dataset": info.name, "reference": cfg.reference.kind}
    )
    return Session(
        cfg, run_dir, device, info, teachers, method, train_ds, test_loader, reference, logger,
        started_at_step=method.step_count, validation=validation,
        validation_loader=validation_loader,
    )  # fmt: skip


def eval_loader(ds, batch_size: int, device: torch.device) -> torch.utils.data.DataLoader:
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


def measure_reference(cfg: ExperimentConfig, teachers, test_loader, device) -> dict:
    """The accuracy relative accuracy divides by, with the teachers' own accuracies.

    An ensemble saved without its accuracies has them measured on this test set.
    """
    manifest = teachers.manifest
    kd_ref = None
    if cfg.reference.kind == "kd_real":
        kd_ref = json.loads(Path(cfg.reference.result or "").read_text())
    ref_acc = reference_accuracy(cfg.reference.kind, manifest, kd_ref)
    teacher_accs = [t.get("test_accuracy") for t in manifest["teachers"]]
    ensemble_acc = manifest.get("ensemble_accuracy")
    if ref_acc is None or None in teacher_accs:
        measured = evaluate_headers(teachers, test_loader, device)
        teacher_accs, ensemble_acc = measured["header_accuracy"], measured["accuracy"]
        entries = [
            {**t, "test_accuracy": a}
            for t, a in zip(manifest["teachers"], teacher_accs, strict=True)
        ]
        manifest = {**manifest, "ensemble_accuracy": ensemble_acc, "teachers": entries}
        ref_acc = reference_accuracy(cfg.reference.kind, manifest, kd_ref)
    return {
        "kind": cfg.reference.kind,
        "accuracy": ref_acc,
        "name": cfg.reference.name or cfg.reference.kind,
        "teacher_accuracies": teacher_accs,
        "ensemble_accuracy": ensemble_acc,
    }


# ----------------------------------------------------------------------------- the loop


def train_loop(
    s: Session, on_progress: ProgressFn | None = None, on_eval: EvalFn | None = None
) -> None:
    """One method round per step until ``train.steps``; evaluations and checkpoints at
    their cadence (and at the last step); a non-finite loss stops the run.

    The hot loop does not wait for the device: losses stay on it (summed, and the first
    non-finite step remembered there) and are read at evaluations and checkpoints, which
    is also where a NaN is raised, naming its loss and exact step, before a checkpoint
    could save the broken state.
    """
    tc, method = s.cfg.train, s.method
    total, t0 = tc.steps, time.time()
    tracker = LossTracker()
    while method.step_count < total:
        losses = method.step()
        step = method.step_count
        tracker.add(losses, step)
        if on_progress is not None:
            on_progress(step, total, {f"loss/{k}": v for k, v in losses.items()})
        evaluate_now = step % tc.eval_every == 0 or step == total
        checkpoint_now = step % tc.checkpoint_every == 0 or step == total
        if evaluate_now or checkpoint_now:
            tracker.raise_if_nonfinite(s.run_dir)
        if evaluate_now:
            # The last step's evaluation is the final one (whole test set, every selection
            # candidate): finish() reuses it instead of computing the same numbers again.
            metrics = evaluate(s, final=step == total)
            if step == total:
                s.final_metrics = dict(metrics)
            metrics["steps_per_second"] = (step - s.started_at_step) / max(time.time() - t0, 1e-9)
            s.logger.log_metrics({**tracker.means(), **metrics}, step)
        if checkpoint_now:
            s.run_dir.save_checkpoint(method.state_dict())
        if on_eval is not None and evaluate_now:
            on_eval(step, metrics, s.run_dir.path)
    s.loop_seconds = time.time() - t0


class LossTracker:
    """Per-step losses kept on their device: running sums for the logged means, and the
    first step at which any of them was not finite (with the values of that step)."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.sums: torch.Tensor | None = None
        self.count = 0
        self.bad_step: torch.Tensor | None = None
        self.bad_values: torch.Tensor | None = None

    def add(self, losses: dict[str, torch.Tensor], step: int) -> None:
        values = torch.stack([v.detach().float() for v in losses.values()])
        if list(losses) != self.keys or self.sums is None:
            if self.sums is not None:  # a method whose loss names change mid-run: start over
                self.means()
            self.keys = list(losses)
            self.sums = torch.zeros_like(values)
            self.bad_step = torch.full((), -1, dtype=torch.long, device=values.device)
            self.bad_values = torch.zeros_like(values)
        assert self.bad_step is not None and self.bad_values is not None
        first = torch.logical_and(~torch.isfinite(values).all(), self.bad_step < 0)
        self.bad_step = torch.where(first, torch.full_like(self.bad_step, step), self.bad_step)
        self.bad_values = torch.where(first, values, self.bad_values)
        self.sums += values
        self.count += 1

    def raise_if_nonfinite(self, run_dir: RunDir) -> None:
        if self.bad_step is None or self.bad_values is None or int(self.bad_step) < 0:
            return  # the one read of the device since the last check
        bad = {k: v for k, v in zip(self.keys, self.bad_values.tolist(), strict=True)}
        raise nonfinite_error(bad, int(self.bad_step), run_dir)

    def means(self) -> dict[str, float]:
        """``{"loss/<name>": mean since the last call}``, then start the next window."""
        if self.sums is None or self.count == 0:
            return {}
        out = {
            f"loss/{k}": v / self.count for k, v in zip(self.keys, self.sums.tolist(), strict=True)
        }
        self.sums.zero_()
        self.count = 0
        return out


def nonfinite_error(losses: dict[str, float], step: int, run_dir: RunDir) -> NonFiniteLossError:
    bad = next(k for k, v in losses.items() if not math.isfinite(v))
    kept = (
        f"last good checkpoint kept at {run_dir / CHECKPOINT}"
        if run_dir.has_checkpoint
        else "no checkpoint yet"
    )
    return NonFiniteLossError(
        f"loss {bad!r} became {losses[bad]} at step {step}; {kept}. "
        "Lower the learning rates or the loss weights, then resume or restart"
    )


def evaluate(s: Session, final: bool) -> dict:
    """Accuracy on the test set (capped by ``train.max_eval_samples`` unless final), relative
    accuracy, ``validation_accuracy`` on the held-out training images (when
    ``data.validation_images`` is set), the data-free proxy and ``selection_score`` on the
    synthetic validation set (when there is one; the final evaluation adds every candidate
    as ``selection/<name>``).

    The test set only measures: nothing here chooses by it.
    """
    method, tc = s.method, s.cfg.train
    ev = method.evaluate(s.test_loader, None if final else tc.max_eval_samples)
    proxy = agreement_proxy(
        method.predict,
        lambda x: s.teachers(x).mean(0),
        method.proxy_batches(4, min(tc.batch_size, 256)),
        s.info.num_classes,
    )
    selection = {}
    if s.validation_loader is not None:  # held-out training images: what sweeps may choose by
        cap = None if final else tc.max_eval_samples
        selection["validation_accuracy"] = method.evaluate(s.validation_loader, cap)["accuracy"]
    if s.validation is not None:
        scores = score_student(method.predict, s.validation, s.device)
        selection["selection_score"] = scores[SELECTION_SCORE]
        if final:
            selection |= {f"selection/{k}": v for k, v in scores.items()}
    return {
        "student_accuracy": ev["accuracy"],
        "relative_accuracy": relative_accuracy(ev["accuracy"], s.reference["accuracy"]),
        "proxy": proxy,
        **selection,
        **{f"header_{i}_accuracy": a for i, a in enumerate(ev["header_accuracy"])},
    }


# ----------------------------------------------------------------------------- finish


def finish(s: Session) -> dict:
    """The final evaluation on the whole test set (the loop's at the last step, else made
    here); result.json, student, samples, aggregation; the logger's final metrics,
    artifacts and model."""
    cfg, method, info, out = s.cfg, s.method, s.info, s.run_dir
    # A run resumed at its last step has not evaluated it in this process.
    final = s.final_metrics if s.final_metrics is not None else evaluate(s, final=True)
    ref = s.reference
    result = {
        "method": cfg.method.name,
        "dataset": cfg.data.name,
        "teachers": {
            "path": str(cfg.teachers.path),
            "archs": list(s.teachers.archs),
            "accuracies": ref["teacher_accuracies"],
            "ensemble_accuracy": ref["ensemble_accuracy"],
        },
        "student_accuracy": final["student_accuracy"],
        "header_accuracies": [final[k] for k in sorted(final) if k.startswith("header_")],
        "relative_accuracy": final["relative_accuracy"],
        "validation_accuracy": final.get("validation_accuracy"),
        "reference": {k: ref[k] for k in ("kind", "accuracy", "name")},
        "proxy": final["proxy"],
        "selection_score": final.get("selection_score"),
        "selection": selection_record(s, final),
        "sample_diversity": method.sample_diversity(),
        "student_params": count_params(method.student),
        "student_macs": count_macs(method.student, (1, info.channels, info.image_size, info.image_size)),
        "steps": method.step_count,
        "started_at_step": s.started_at_step,
        "wall_seconds": time.time() - s.t_start,
        "loop_seconds": s.loop_seconds,
        "device": str(s.device),
        "host": platform.node(),
        "config": cfg.to_dict(),
    }  # fmt: skip
    out.save_student(method.student)
    grid = save_sample_grid(method, info, out / SAMPLES)
    if cfg.aggregation.few_shot > 0:
        # The few real samples are seen as they are, without training-time augmentation.
        plain_train, _, _ = cfg.data.load(augment=False)
        result["aggregation"] = run_aggregation(
            method, plain_train, s.test_loader, cfg.aggregation, s.device, out.path
        )
        # The student never saw these samples (data-free): an honest accuracy estimate.
        result["few_shot_estimate"] = few_shot_estimate(
            method.predict,
            plain_train,
            cfg.aggregation.few_shot,
            seed=cfg.aggregation.seed,
            device=s.device,
        )
    out.write_result(result)
    agg = result.get("aggregation") or {}
    sizes = {
        k: result[k]
        for k in ("student_params", "student_macs", "wall_seconds", "sample_diversity")
        if result[k] is not None
    }
    agg_metrics = {
        f"aggregation/{k}": agg[k]
        for k in ("averaging_accuracy", "aggregated_accuracy")
        if k in agg
    }
    few = result.get("few_shot_estimate")
    if few is not None:
        agg_metrics |= {
            "few_shot_accuracy": few["accuracy"],
            "few_shot_accuracy_low": few["low"],
            "few_shot_accuracy_high": few["high"],
        }
    s.logger.log_metrics({**final, **sizes, **agg_metrics}, method.step_count)
    for artifact in (out / CONFIG, out / RESULT, grid):
        if artifact is not None and artifact.exists():
            s.logger.log_artifact(artifact)
    s.logger.log_model(method.student, next(iter(s.test_loader))[0])
    return result


def selection_record(s: Session, final: dict) -> dict | None:
    """result.json's ``selection``: which score is ``selection_score``, every candidate's
    value and the validation set they were computed on (None without a set)."""
    if s.validation is None:
        return None
    entry = s.validation.entry
    return {
        "score": SELECTION_SCORE,
        "candidates": {
            k.removeprefix("selection/"): v for k, v in final.items() if k.startswith("selection/")
        },
        "validation_set": {k: entry.get(k) for k in ("sha256", "images", "per_class")},
    }


def save_sample_grid(method: DistillMethod, info: DatasetInfo, path: Path) -> Path | None:
    """De-normalised generated samples as a PNG grid (one row per class for conditional generators)."""
    from torchvision.utils import save_image

    images, ncol = method.sample_images()
    if images.numel() == 0:
        return None
    mean = torch.tensor(info.mean, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(info.std, device=images.device).view(1, -1, 1, 1)
    save_image((images * std + mean).clamp(0, 1).cpu(), path, nrow=ncol, padding=1)
    return path
