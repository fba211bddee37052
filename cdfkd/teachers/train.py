"""Train teacher ensembles on real data, and re-check saved ones.

The recipe (algorithms.md §4.3, with a cosine schedule instead of step decay):
cross-entropy, SGD with Nesterov momentum 0.9, weight decay 5e-4, the learning
rate annealed to zero per step over all epochs. Teacher ``i`` uses seed
``seed + i`` for its initialisation, augmentation draws and data order, so an
ensemble is reproducible and its members differ. Per-dataset defaults for
epochs, batch size and learning rate are each dataset's registered
``TeacherRecipe`` (``cdfkd.data.dataset_spec(name).recipe``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from cdfkd.data import DEFAULT_RECIPE, DatasetInfo, dataset_spec
from cdfkd.metrics import evaluate_headers
from cdfkd.teachers.ensemble import TeacherEnsemble
from cdfkd.teachers.manifest import MANIFEST, EnsembleError
from cdfkd.teachers.store import load_ensemble, save_ensemble, verify_ensemble


@dataclass(frozen=True)
class TeacherTrainConfig:
    """Everything that determines a trained ensemble; saved in ``ensemble.json``."""

    dataset: str
    arch: str
    count: int = 3
    epochs: int = DEFAULT_RECIPE.epochs
    batch_size: int = DEFAULT_RECIPE.batch_size
    lr: float = DEFAULT_RECIPE.lr
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = True
    seed: int = 0
    image_size: int | None = None
    split_seed: int = 0
    num_workers: int = 0
    eval_batch_size: int = 512
    model_kwargs: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        checks = {
            "count": self.count >= 1,
            "epochs": self.epochs >= 1,
            "batch_size": self.batch_size >= 2,
            "lr": self.lr > 0,
            "momentum": 0 <= self.momentum < 1,
            "weight_decay": self.weight_decay >= 0,
            "num_workers": self.num_workers >= 0,
            "eval_batch_size": self.eval_batch_size >= 1,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            values = ", ".join(f"{k}={getattr(self, k)!r}" for k in bad)
            raise ValueError(
                f"invalid teacher training config: {values} (need count, epochs >= 1, "
                "batch_size >= 2, lr > 0, 0 <= momentum < 1, weight_decay >= 0)"
            )

    @classmethod
    def for_dataset(cls, dataset: str, arch: str, **overrides) -> TeacherTrainConfig:
        """The dataset's recipe, with any non-None ``overrides`` applied."""
        recipe = dataset_spec(dataset).recipe
        base = cls(dataset, arch, epochs=recipe.epochs, batch_size=recipe.batch_size, lr=recipe.lr)
        return replace(base, **{k: v for k, v in overrides.items() if v is not None})

    def to_dict(self) -> dict:
        return asdict(self)

    def build_model(self, info: DatasetInfo) -> nn.Module:
        """A fresh, untrained teacher of ``arch`` for ``info``'s inputs and classes."""
        from cdfkd.models import create_model

        return create_model(
            self.arch,
            info.num_classes,
            in_channels=info.channels,
            image_size=info.image_size,
            **self.model_kwargs,
        )


@dataclass(frozen=True)
class TrainProgress:
    """Reported after every epoch of every teacher (``test_accuracy`` on a teacher's last)."""

    teacher: int
    teachers: int
    epoch: int
    epochs: int
    loss: float
    seconds: float
    test_accuracy: float | None = None


ProgressFn = Callable[[TrainProgress], None]


def _train_loader(ds: Dataset, cfg: TeacherTrainConfig, seed: int, device: torch.device):
    return DataLoader(
        ds,
        batch_size=cfg.batch_size,
        shuffle=True,
        drop_last=len(ds) > cfg.batch_size,  # type: ignore[arg-type]  # no size-1 BN batches
        generator=torch.Generator().manual_seed(seed),
        num_workers=cfg.num_workers,
        persistent_workers=cfg.num_workers > 0,
        pin_memory=device.type == "cuda",
    )


def eval_loader(ds: Dataset, batch_size: int, device: torch.device) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, shuffle=False, pin_memory=device.type == "cuda")


@torch.no_grad()
def evaluate_ensemble(ensemble: TeacherEnsemble, loader, device: torch.device) -> dict:
    """``{"teacher_accuracies": [per teacher], "ensemble_accuracy": mean-logit, "samples": n}``."""
    ev = evaluate_headers(ensemble, loader, device)
    return {
        "teacher_accuracies": ev["header_accuracy"],
        "ensemble_accuracy": ev["accuracy"],
        "samples": ev["samples"],
    }


def train_teacher(
    model: nn.Module,
    train_ds: Dataset,
    cfg: TeacherTrainConfig,
    seed: int,
    device: torch.device,
    on_epoch: Callable[[int, float, float], None] | None = None,
) -> nn.Module:
    """Train ``model`` in place with the recipe; ``on_epoch(epoch, mean_loss, seconds)``."""
    loader = _train_loader(train_ds, cfg, seed, device)
    model.to(device).train()
    opt = torch.optim.SGD(
        model.parameters(),
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        nesterov=cfg.nesterov and cfg.momentum > 0,
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * len(loader))
    for epoch in range(cfg.epochs):
        t0 = time.perf_counter()
        total = torch.zeros((), device=device)
        for x, y in loader:
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.detach()
        if on_epoch is not None:
            on_epoch(epoch, (total / len(loader)).item(), time.perf_counter() - t0)
    return model.eval()


def train_ensemble(
    cfg: TeacherTrainConfig,
    out_dir: str | Path,
    device: torch.device,
    *,
    data_root: str | Path = "data",
    download: bool = True,
    progress: ProgressFn | None = None,
    overwrite: bool = False,
) -> dict:
    """Train ``cfg.count`` teachers, evaluate them and write the ensemble directory.

    Returns the manifest written to ``out_dir/ensemble.json``.
    """
    from cdfkd.data import load_dataset

    out = Path(out_dir)
    if (out / MANIFEST).exists() and not overwrite:
        raise EnsembleError(f"{out} already holds an ensemble: choose another --out or --overwrite")
    device = torch.device(device)
    train_ds, test_ds, info = load_dataset(
        cfg.dataset,
        root=data_root,
        image_size=cfg.image_size,
        seed=cfg.split_seed,
        download=download,
    )
    test = eval_loader(test_ds, cfg.eval_batch_size, device)
    models = []
    for i in range(cfg.count):
        seed = cfg.seed + i
        torch.manual_seed(seed)  # initialisation and augmentation draws
        model = cfg.build_model(info)

        def on_epoch(epoch: int, loss: float, seconds: float, i=i, model=model) -> None:
            acc = None
            if epoch == cfg.epochs - 1:
                acc = evaluate_headers(model.eval(), test, device)["accuracy"]
            if progress is not None:
                progress(TrainProgress(i, cfg.count, epoch, cfg.epochs, loss, seconds, acc))

        models.append(train_teacher(model, train_ds, cfg, seed, device, on_epoch))
    archs = [cfg.arch] * cfg.count
    ensemble = TeacherEnsemble(models, info, archs, mode="loop")
    ev = evaluate_ensemble(ensemble, test, device)
    return save_ensemble(
        models,
        out,
        info,
        archs,
        seeds=[cfg.seed + i for i in range(cfg.count)],
        test_accuracies=ev["teacher_accuracies"],
        ensemble_accuracy=ev["ensemble_accuracy"],
        model_kwargs=cfg.model_kwargs,
        dataset=cfg.dataset,
        config={**cfg.to_dict(), "data_root": str(data_root), "device": str(device)},
        overwrite=overwrite,
    )


# ----------------------------------------------------------------------------- re-checking


@dataclass
class TeacherRow:
    file: str
    arch: str
    seed: int | None
    recorded: float | None
    measured: float | None = None
    problem: str | None = None


@dataclass
class EvalReport:
    """What ``check_ensemble_dir`` found; ``ok`` is False on any problem."""

    directory: str
    dataset: str
    rows: list[TeacherRow]
    ensemble_recorded: float | None
    ensemble_measured: float | None = None
    samples: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and all(r.problem is None for r in self.rows)


def check_ensemble_dir(
    path: str | Path,
    device: torch.device,
    *,
    data_root: str | Path | None = None,
    download: bool = True,
    tolerance: float = 0.01,
    batch_size: int = 512,
) -> EvalReport:
    """Verify every teacher file's sha256, then re-evaluate teachers and ensemble on the test set.

    ``data_root`` None: the root recorded at training time, else ``data``.
    A measured accuracy more than ``tolerance`` away from the recorded one is a
    problem too (different data, or different weights).
    """
    from cdfkd.data import load_dataset

    manifest, checks = verify_ensemble(path)
    rows = [
        TeacherRow(t.file, t.arch, t.seed, t.test_accuracy, problem=c.problem)
        for t, c in zip(manifest.teachers, checks, strict=True)
    ]
    report = EvalReport(str(path), manifest.dataset, rows, manifest.ensemble_accuracy)
    if not report.ok:
        return report
    try:
        ensemble = load_ensemble(path, device, mode="loop")
    except EnsembleError as err:
        report.problems.append(str(err))
        return report
    info = ensemble.info
    root = data_root or manifest.config.get("data_root", "data")
    _, test_ds, data_info = load_dataset(
        manifest.dataset,
        root=root,
        image_size=info.image_size,
        seed=int(manifest.config.get("split_seed", 0)),
        download=download,
    )
    if (data_info.channels, data_info.num_classes) != (info.channels, info.num_classes):
        report.problems.append(
            f"dataset {manifest.dataset!r} gives {data_info.channels} channels and "
            f"{data_info.num_classes} classes; the teachers expect {info.channels} and "
            f"{info.num_classes}"
        )
        return report
    ev = evaluate_ensemble(ensemble, eval_loader(test_ds, batch_size, device), device)
    report.samples = ev["samples"]
    report.ensemble_measured = ev["ensemble_accuracy"]
    for row, acc in zip(rows, ev["teacher_accuracies"], strict=True):
        row.measured = acc
        if row.recorded is not None and abs(acc - row.recorded) > tolerance:
            row.problem = f"accuracy {acc:.4f} differs from the recorded {row.recorded:.4f}"
    rec = report.ensemble_recorded
    if rec is not None and abs(report.ensemble_measured - rec) > tolerance:
        report.problems.append(
            f"ensemble accuracy {report.ensemble_measured:.4f} differs from the recorded {rec:.4f}"
        )
    return report
