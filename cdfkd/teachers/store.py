"""Ensemble directories: write, verify and load teachers.

Weights are safetensors files (state_dict tensors, BatchNorm buffers included)
named in ``ensemble.json`` (schema: ``cdfkd.teachers.manifest``) with their
sha256. A hand-written manifest may also list ``.pt``/``.pth`` state dicts,
which are read with ``torch.load(weights_only=True)`` only. ``load_ensemble``
is the one way later stages get teachers: every refusal is an ``EnsembleError``
naming the problem and the fix.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from cdfkd.data import DatasetInfo
from cdfkd.files import write_atomic
from cdfkd.teachers.ensemble import TeacherEnsemble
from cdfkd.teachers.manifest import (
    MANIFEST,
    TORCH_SUFFIXES,
    EnsembleError,
    EnsembleIntegrityError,
    EnsembleMismatchError,
    Manifest,
    TeacherEntry,
    UnsafeCheckpointError,
    make_manifest,
    read_manifest,
)

# ----------------------------------------------------------------------------- files


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class FileCheck:
    """The integrity of one teacher file: ``problem`` is None when it is intact."""

    file: str
    sha256: str | None
    problem: str | None

    @property
    def ok(self) -> bool:
        return self.problem is None


def check_file(directory: Path, entry: TeacherEntry) -> FileCheck:
    path = directory / entry.file
    if not path.is_file():
        return FileCheck(entry.file, None, f"{path} is missing")
    digest = sha256_file(path)
    if digest != entry.sha256:
        return FileCheck(
            entry.file,
            digest,
            f"{path} is truncated or altered (sha256 {digest[:12]}... but the manifest "
            f"records {entry.sha256[:12]}...)",
        )
    return FileCheck(entry.file, digest, None)


def verify_ensemble(path: str | Path) -> tuple[Manifest, list[FileCheck]]:
    """Check every teacher file's presence and sha256 without loading it."""
    manifest = read_manifest(path)
    directory = Path(path)
    directory = directory.parent if directory.name == MANIFEST else directory
    return manifest, [check_file(directory, e) for e in manifest.teachers]


def changed_teachers(path: str | Path, expected: Manifest | dict) -> list[str]:
    """What differs between the ensemble folder ``path`` now and the ``expected`` manifest
    (the one a sweep verified and loaded when it started): one line per changed, missing
    or added teacher file; empty when the folder still holds exactly those teachers."""
    want = expected["teachers"] if isinstance(expected, dict) else expected.model_dump()["teachers"]
    try:
        manifest, checks = verify_ensemble(path)
    except EnsembleError as err:
        return [str(err)]
    problems = [c.problem for c in checks if c.problem is not None]
    now = {t.file: t.sha256 for t in manifest.teachers}
    then = {t["file"]: t["sha256"] for t in want}
    for file in sorted(set(now) | set(then)):
        if file not in now:
            problems.append(f"{file} is no longer in {path}/{MANIFEST}")
        elif file not in then:
            problems.append(f"{file} was added to {path}/{MANIFEST}")
        elif now[file] != then[file]:
            problems.append(
                f"{file} was replaced (sha256 {now[file][:12]}... now, {then[file][:12]}... "
                "when the sweep started)"
            )
    return problems


def load_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file or a weights-only torch checkpoint, on CPU.

    A ``.pt`` whose pickle needs code execution raises ``UnsafeCheckpointError``;
    an unreadable file raises ``EnsembleIntegrityError``.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            return load_file(path, device="cpu")
        except (SafetensorError, OSError) as err:
            raise EnsembleIntegrityError(
                f"{path} is not a readable safetensors file ({err})"
            ) from None
    if path.suffix not in TORCH_SUFFIXES:
        raise EnsembleError(
            f"{path}: unknown weights format; use .safetensors (or a .pt state_dict)"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL (\S+)", str(err))
        refs = f" (it references {found.group(1)})" if found else ""
        raise UnsafeCheckpointError(
            f"{path} is a pickle that needs code execution to load{refs}; cdfkd only reads "
            "plain weights (torch.load(weights_only=True)). Re-save it from the code that made "
            "it as `torch.save(model.state_dict(), path)`, or as safetensors with "
            "cdfkd.teachers.save_ensemble(models, DIR, ...)."
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise EnsembleIntegrityError(f"{path} is not a readable torch checkpoint ({err})") from None
    if isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        obj = obj.get("state_dict", obj.get("model", obj))
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise EnsembleError(
            f"{path} holds a {type(obj).__name__}, not a state_dict of tensors; save "
            "`model.state_dict()` instead"
        )
    return obj


def _save_safetensors(state: dict[str, torch.Tensor], meta: dict[str, str], path: Path) -> None:
    save_file(state, str(path), metadata=meta)


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    # clone(): safetensors refuses tensors that share storage (views, tied weights).
    return {k: v.detach().to("cpu").clone().contiguous() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- save / load


def _per_teacher(value, n: int, what: str) -> list:
    if value is None or isinstance(value, (str, dict)):
        return [value] * n
    value = list(value)
    if len(value) != n:
        raise ValueError(f"{n} teachers but {len(value)} {what}")
    return value


def save_ensemble(
    models: Sequence[nn.Module],
    out_dir: str | Path,
    info: DatasetInfo,
    archs: str | Sequence[str],
    *,
    seeds: Sequence[int | None] | None = None,
    test_accuracies: Sequence[float | None] | None = None,
    ensemble_accuracy: float | None = None,
    model_kwargs: dict | Sequence[dict] | None = None,
    dataset: str | None = None,
    config: dict | None = None,
    overwrite: bool = False,
) -> dict:
    """Write ``models`` as ``teacher_{i}.safetensors`` plus ``ensemble.json``; return the manifest.

    ``archs``: one zoo name for all, or one per model (mixed ensembles).
    ``model_kwargs``: extra ``create_model`` arguments needed to rebuild them.
    Accuracies are fractions in [0, 1] (None: unknown). An existing ensemble is
    only replaced with ``overwrite=True``.
    """
    n = len(models)
    if n == 0:
        raise ValueError("save_ensemble needs at least one model")
    out = Path(out_dir)
    if (out / MANIFEST).exists() and not overwrite:
        raise EnsembleError(
            f"{out} already holds an ensemble: choose another directory or overwrite"
        )
    out.mkdir(parents=True, exist_ok=True)
    archs = _per_teacher(archs, n, "arch names")
    seeds = _per_teacher(seeds, n, "seeds")
    accs = _per_teacher(test_accuracies, n, "accuracies")
    kwargs = _per_teacher(model_kwargs, n, "model_kwargs")
    entries = []
    for i, model in enumerate(models):
        if getattr(model, "num_classes", info.num_classes) != info.num_classes:
            raise ValueError(
                f"model {i} has {model.num_classes} classes, info says {info.num_classes}"
            )
        name = f"teacher_{i}.safetensors"
        # One metadata key only: safetensors writes a map's keys in random order, and
        # identical weights must give an identical file (and sha256).
        meta = {"format": "pt"}
        state = _cpu_state(model)
        write_atomic(out / name, partial(_save_safetensors, state, meta))
        entry = {
            "file": name,
            "arch": archs[i],
            "sha256": sha256_file(out / name),
            "seed": seeds[i],
        }
        entry |= {"test_accuracy": accs[i], "model_kwargs": kwargs[i] or {}}
        entries.append(entry)
    manifest = make_manifest(
        entries, info, dataset=dataset, ensemble_accuracy=ensemble_accuracy, config=config
    )
    text = json.dumps(manifest, indent=2) + "\n"
    write_atomic(out / MANIFEST, lambda tmp: Path(tmp).write_text(text))
    return manifest


def _check_expected(manifest: Manifest, where: str, expect_arch, expect_num_classes) -> None:
    archs = [t.arch for t in manifest.teachers]
    if expect_arch is not None:
        wanted = [expect_arch] * len(archs) if isinstance(expect_arch, str) else list(expect_arch)
        if wanted != archs:
            raise EnsembleMismatchError(
                f"{where} holds teachers {archs} but {wanted} were expected: point at an ensemble "
                f"of that architecture or train one (`cdfkd teachers train --arch {wanted[0]} ...`)"
            )
    if expect_num_classes is not None and manifest.num_classes != expect_num_classes:
        raise EnsembleMismatchError(
            f"{where} has {manifest.num_classes} classes but {expect_num_classes} were expected: "
            f"use teachers trained on the same dataset (this one: {manifest.dataset!r})"
        )


def build_teacher(entry: TeacherEntry, info: DatasetInfo, state: dict, where: str) -> nn.Module:
    from cdfkd.models import create_model

    try:
        model = create_model(
            entry.arch,
            info.num_classes,
            in_channels=info.channels,
            image_size=info.image_size,
            **entry.model_kwargs,
        )
    except (KeyError, ValueError, TypeError) as err:
        text = err.args[0] if err.args else err
        raise EnsembleError(f"{where}: cannot build teacher arch {entry.arch!r}: {text}") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise EnsembleMismatchError(
            f"{where}: the weights do not fit arch {entry.arch!r} with {info.num_classes} classes "
            f"({str(err).splitlines()[0]}); check the manifest's arch and model_kwargs"
        ) from None
    return model


def load_ensemble(
    path: str | Path,
    device: torch.device | str = "cpu",
    expect_arch: str | Sequence[str] | None = None,
    expect_num_classes: int | None = None,
    mode: str = "auto",
) -> TeacherEnsemble:
    """Load a verified ensemble directory as a frozen ``TeacherEnsemble`` on ``device``.

    Refuses with an ``EnsembleError`` (naming the problem and the fix): a missing
    or invalid ``ensemble.json``, an unexpected arch or class count, a missing,
    truncated or altered teacher file (sha256), weights that do not fit the arch,
    and torch pickles that need code execution.
    """
    path = Path(path)
    if path.is_file() and path.name != MANIFEST:
        if path.suffix in TORCH_SUFFIXES:
            load_state_file(path)  # a pickle needing code execution is refused right here
        raise EnsembleError(
            f"{path} is a single weights file, not an ensemble directory: write one with "
            "cdfkd.teachers.save_ensemble([model, ...], DIR, info, arch) and load DIR"
        )
    directory = path.parent if path.name == MANIFEST else path
    manifest = read_manifest(directory)
    _check_expected(manifest, str(directory), expect_arch, expect_num_classes)
    info = manifest.info()
    models = []
    for entry in manifest.teachers:
        check = check_file(directory, entry)
        if not check.ok:
            raise EnsembleIntegrityError(
                f"{check.problem}. Restore the file or re-create the ensemble "
                "(`cdfkd teachers eval DIR` lists every file's state)"
            )
        state = load_state_file(directory / entry.file)
        models.append(build_teacher(entry, info, state, str(directory / entry.file)))
    archs = [t.arch for t in manifest.teachers]
    raw = manifest.model_dump(mode="json")
    return TeacherEnsemble(models, info, archs, manifest=raw, mode=mode).to(device)
