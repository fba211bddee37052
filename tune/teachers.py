"""``cdfkd teachers train --ray``: the N teachers of an ensemble as N parallel Ray tasks.

Each task trains one teacher with exactly the sequential trainer's seeding
(``cdfkd.teachers.train_teacher``), so ``--ray`` writes the same ensemble, only sooner.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import ray
import torch


def _train_one(cfg_dict: dict, index: int, data_root: str, threads: int) -> dict:
    """Train teacher ``index`` of the ensemble described by ``cfg_dict``; numpy weights + accuracy."""
    from cdfkd.data import load_dataset
    from cdfkd.device import resolve_device
    from cdfkd.metrics import evaluate_headers
    from cdfkd.teachers import TeacherTrainConfig, train_teacher
    from cdfkd.teachers.train import eval_loader

    torch.set_num_threads(threads)
    cfg = TeacherTrainConfig(**cfg_dict)
    device = resolve_device("auto")
    train_ds, test_ds, info = load_dataset(
        cfg.dataset, root=data_root, image_size=cfg.image_size, seed=cfg.split_seed
    )
    seed = cfg.seed + index
    # The same seeding as the sequential trainer, so --ray trains the same teachers.
    torch.manual_seed(seed)
    model = cfg.build_model(info)
    train_teacher(model, train_ds, cfg, seed, device)
    acc = evaluate_headers(model.eval(), eval_loader(test_ds, cfg.eval_batch_size, device), device)[
        "accuracy"
    ]
    return {
        "index": index,
        "state": {k: v.cpu().numpy() for k, v in model.state_dict().items()},
        "accuracy": acc,
    }


def train_ensemble_ray(
    cfg,
    out_dir: str | Path,
    *,
    data_root: str = "data",
    cpus_per_teacher: float = 1,
    gpus_per_teacher: float = 0,
    progress=None,
) -> dict:
    """Train ``cfg.count`` teachers as parallel Ray tasks and write the ensemble folder."""
    from cdfkd.data import load_dataset
    from cdfkd.teachers import TeacherEnsemble, evaluate_ensemble, save_ensemble
    from cdfkd.teachers.train import eval_loader

    # Loaded (and downloaded if missing) here first: tasks on other nodes then find the
    # files in a shared data root instead of downloading them into it all at once.
    _, test_ds, info = load_dataset(
        cfg.dataset, root=data_root, image_size=cfg.image_size, seed=cfg.split_seed
    )
    task = ray.remote(num_cpus=cpus_per_teacher, num_gpus=gpus_per_teacher)(_train_one)
    threads = max(1, int(cpus_per_teacher))
    pending = [task.remote(asdict(cfg), i, str(data_root), threads) for i in range(cfg.count)]
    done: dict[int, dict] = {}
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        out = ray.get(ready[0])
        done[out["index"]] = out
        if progress is not None:
            progress(
                f"teacher {out['index'] + 1}/{cfg.count} done: test accuracy {out['accuracy']:.4f}"
            )
    models = []
    for i in range(cfg.count):
        model = cfg.build_model(info)
        model.load_state_dict(
            {k: torch.from_numpy(np.array(v)) for k, v in done[i]["state"].items()}
        )
        models.append(model.eval())
    archs = [cfg.arch] * cfg.count
    device = torch.device("cpu")
    ev = evaluate_ensemble(
        TeacherEnsemble(models, info, archs, mode="loop"),
        eval_loader(test_ds, cfg.eval_batch_size, device),
        device,
    )
    return save_ensemble(
        models,
        Path(out_dir),
        info,
        archs,
        seeds=[cfg.seed + i for i in range(cfg.count)],
        test_accuracies=ev["teacher_accuracies"],
        ensemble_accuracy=ev["ensemble_accuracy"],
        model_kwargs=cfg.model_kwargs,
        dataset=cfg.dataset,
        config={**asdict(cfg), "data_root": str(data_root), "ray": True},
        overwrite=True,
    )


def train_ensemble_on_ray(
    cfg,
    out_dir: str | Path,
    *,
    address: str | None = None,
    data_root: str = "data",
    cpus_per_teacher: float = 1,
    gpus_per_teacher: float = 0,
    overwrite: bool = False,
    progress=None,
) -> dict:
    """Join (or start) Ray, train the ensemble with :func:`train_ensemble_ray`, shut Ray down."""
    from cdfkd.teachers import MANIFEST, EnsembleError
    from cdfkd.tune.run import connect_ray

    if (Path(out_dir) / MANIFEST).exists() and not overwrite:
        raise EnsembleError(
            f"{out_dir} already holds an ensemble: choose another --out or --overwrite"
        )
    connect_ray(address)
    try:
        return train_ensemble_ray(
            cfg,
            out_dir,
            data_root=data_root,
            cpus_per_teacher=cpus_per_teacher,
            gpus_per_teacher=gpus_per_teacher,
            progress=progress,
        )
    finally:
        ray.shutdown()
