"""Import teachers trained elsewhere: weights files + an arch -> a verified ensemble folder.

``cdfkd teachers import --arch ARCH --weights A B ... --dataset NAME --out DIR`` runs
:func:`import_ensemble`. ``ARCH`` is any arch ``create_model`` builds: a zoo name,
``torchvision:<name>`` or your own ``package.module:function`` (the command trusts the
module it is given on its command line; loading the folder later needs ``--trust`` again,
see ``cdfkd.models.user_models``). Each weights file is a safetensors file or a torch
state dict read with ``weights_only=True``; ``module.`` (DataParallel) prefixes are
dropped. Every teacher is checked before anything is written: the inputs it takes, the
shape of its logits, weights that fit it; its test accuracy is measured when the
dataset's test split can be loaded here. The folder is read back, hashes verified, before
the import returns.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from cdfkd.data import DatasetInfo, DatasetUnavailableError, dataset_spec, load_dataset
from cdfkd.models import create_model
from cdfkd.models.base import bn_layers
from cdfkd.teachers.ensemble import TeacherEnsemble
from cdfkd.teachers.manifest import MANIFEST, EnsembleError, EnsembleMismatchError
from cdfkd.teachers.store import load_ensemble, load_state_file, save_ensemble, sha256_file
from cdfkd.teachers.train import eval_loader, evaluate_ensemble

log = logging.getLogger(__name__)

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DataParallel/DDP, torch.compile


def _input_info(
    dataset: str,
    data_root: str | Path,
    image_size: int | None,
    split_seed: int,
    download: bool,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
):
    """(DatasetInfo, test split or None): the loader's when the data is here, else the
    dataset's geometry with the normalisation the caller gives."""
    try:
        _, test, info = load_dataset(
            dataset, data_root, image_size, seed=split_seed, download=download, augment=False
        )
        if mean is not None or std is not None:
            log.warning(
                "%s is available here: the teachers get its loader's normalisation (mean %s, "
                "std %s), not --mean/--std",
                dataset,
                info.mean,
                info.std,
            )
        return info, test
    except DatasetUnavailableError as err:
        if mean is None or std is None:
            raise EnsembleError(
                f"{dataset} cannot be loaded here, so neither its normalisation nor the "
                f"teachers' accuracy is known ({err}). Make the data available, or pass --mean "
                "and --std (per channel, as the teachers were trained with) to import without it"
            ) from None
        spec = dataset_spec(dataset)
        if spec.num_classes is None:
            raise EnsembleError(
                f"{dataset} finds its classes in its files, which are not here; make the data "
                "available to import teachers for it"
            ) from None
        info = DatasetInfo(
            dataset,
            spec.num_classes,
            spec.channels,
            image_size or spec.image_size,
            tuple(mean),
            tuple(std),
        )
        log.warning("%s is not available here: the teachers' accuracy is not measured", dataset)
        return info, None


def _fit_keys(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """``state`` with the prefixes training wrappers add removed, and the wrapped model's own
    ``model.`` prefix added when the file holds the bare module's keys."""
    want = set(model.state_dict())
    for prefix in _WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    if not set(state) & want and {f"model.{k}" for k in state} & want:
        state = {f"model.{k}": v for k, v in state.items()}
    return state


def _load_teacher(arch: str, path: Path, info: DatasetInfo, model_kwargs: dict) -> nn.Module:
    model = create_model(arch, info.num_classes, info.channels, info.image_size, **model_kwargs)
    state = _fit_keys(load_state_file(path), model)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        mine = model.state_dict()
        missing = sorted(set(mine) - set(state))
        unexpected = sorted(set(state) - set(mine))
        resized = sorted(k for k in set(mine) & set(state) if mine[k].shape != state[k].shape)
        detail = "; ".join(
            f"{what}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''} ({len(keys)})"
            for what, keys in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("resized", resized),
            )
            if keys
        )
        raise EnsembleMismatchError(
            f"{path} does not fit {arch} with {info.num_classes} classes and {info.channels} "
            f"input channel(s) ({detail or str(err).splitlines()[0]}): pass the arch and the "
            "builder arguments the weights were trained with (--model-kwargs KEY=VALUE)"
        ) from None
    return model.eval()


def import_ensemble(
    arch: str,
    weights: Sequence[str | Path],
    dataset: str,
    out_dir: str | Path,
    *,
    data_root: str | Path = "data",
    image_size: int | None = None,
    split_seed: int = 0,
    download: bool = True,
    model_kwargs: dict | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    device: torch.device | str = "cpu",
    overwrite: bool = False,
    batch_size: int = 512,
) -> dict:
    """Check, evaluate and write ``weights`` (one file per teacher) as an ensemble of ``arch``.

    Returns the manifest written to ``out_dir/ensemble.json`` (accuracies are None when the
    test split is not available here). Every refusal names the fix: an arch that cannot be
    built or imported, an input size it cannot take, logits that do not match the dataset's
    classes, weights that do not fit it, pickles that would run code.
    """
    out = Path(out_dir)
    if (out / MANIFEST).exists() and not overwrite:
        raise EnsembleError(f"{out} already holds an ensemble: choose another --out or --overwrite")
    if not weights:
        raise EnsembleError("no weights files given: pass one per teacher (--weights A B ...)")
    paths = [Path(w) for w in weights]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise EnsembleError(f"weights files not found: {', '.join(missing)}")
    kwargs = dict(model_kwargs or {})
    info, test = _input_info(dataset, data_root, image_size, split_seed, download, mean, std)
    models = [_load_teacher(arch, p, info, kwargs) for p in paths]
    if any(not bn_layers(m) for m in models):
        log.warning(
            "%s has no BatchNorm layers: methods whose generator matches the teachers' BN "
            "statistics refuse such teachers unless that weight is 0 (cgdd and deepinversion: "
            "method.w_bn=0, cdfkd_mfs: method.lambda_bn=0)",
            arch,
        )
    accs: list[float | None] = [None] * len(models)
    ens_acc = None
    if test is not None:
        dev = torch.device(device)
        ensemble = TeacherEnsemble(models, info, [arch] * len(models), mode="loop").to(dev)
        ev = evaluate_ensemble(ensemble, eval_loader(test, batch_size, dev), dev)
        accs, ens_acc = ev["teacher_accuracies"], ev["ensemble_accuracy"]
    sources = [{"file": str(p), "sha256": sha256_file(p)} for p in paths]
    manifest = save_ensemble(
        [m.cpu() for m in models],
        out,
        info,
        arch,
        test_accuracies=accs,
        ensemble_accuracy=ens_acc,
        model_kwargs=kwargs,
        dataset=dataset,
        config={
            "imported_from": sources,
            "data_root": str(data_root),
            "split_seed": split_seed,
            "image_size": info.image_size,
        },
        overwrite=overwrite,
    )
    load_ensemble(out, "cpu", expect_arch=arch, expect_num_classes=info.num_classes)  # read back
    return manifest
