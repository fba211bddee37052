"""The ensemble folder's synthetic validation set: one file, named with its sha256 in ``ensemble.json``.

``validation_set.safetensors`` holds three tensors:

    images          (B, C, H, W) float32, normalised like the teachers' inputs
    targets         (B,) int64, the class each image was synthesised for (class balanced)
    teacher_logits  (N, B, C) float32, every teacher's logits on the images

and ``ensemble.json``'s ``validation_set`` entry (``manifest.ValidationSetEntry``) records
its sha256, its size, the id of the teachers it was built from and how it was built.
This module only writes, verifies and reads that file; ``cdfkd.selection`` builds it.
Reading refuses a file whose hash or teachers no longer match, naming the fix.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from cdfkd.files import write_atomic
from cdfkd.teachers.manifest import (
    MANIFEST,
    EnsembleError,
    EnsembleIntegrityError,
    Manifest,
    ensemble_id,
    read_manifest,
    validate_manifest,
)
from cdfkd.teachers.store import sha256_file

VALIDATION_FILE = "validation_set.safetensors"
_LOCK = ".validation_set.lock"
_TENSORS = ("images", "targets", "teacher_logits")


class ValidationSetError(EnsembleIntegrityError):
    """The folder's validation set is missing, altered, or was built from other teachers."""


def rebuild_hint(directory: str | Path) -> str:
    return f"rebuild it with `cdfkd teachers validation-set {directory} --rebuild`"


@dataclass(frozen=True)
class ValidationSet:
    """A synthetic validation set in memory (see the module docstring for the shapes)."""

    images: torch.Tensor
    targets: torch.Tensor
    teacher_logits: torch.Tensor
    entry: dict  # the manifest's ValidationSetEntry as a dict

    def __post_init__(self) -> None:
        b = len(self.images)
        if self.images.dim() != 4 or self.targets.shape != (b,):
            raise ValueError("a validation set needs images (B, C, H, W) and targets (B,)")
        if self.teacher_logits.dim() != 3 or self.teacher_logits.shape[1] != b:
            raise ValueError("a validation set needs teacher_logits (N, B, C)")

    @property
    def num_classes(self) -> int:
        return self.teacher_logits.shape[-1]

    def class_counts(self) -> list[int]:
        return torch.bincount(self.targets, minlength=self.num_classes).tolist()

    def to_numpy(self) -> dict:
        """Plain arrays and JSON values, for Ray's object store (zero-copy on CPU)."""
        return {
            **{k: getattr(self, k).detach().cpu().numpy() for k in _TENSORS},
            "entry": dict(self.entry),
        }

    @classmethod
    def from_numpy(cls, payload: dict) -> ValidationSet:
        tensors = {k: torch.from_numpy(np.array(payload[k])) for k in _TENSORS}
        return cls(**tensors, entry=dict(payload["entry"]))


def _dir(path: str | Path) -> Path:
    path = Path(path)
    return path.parent if path.name == MANIFEST else path


@contextlib.contextmanager
def validation_lock(directory: str | Path) -> Iterator[None]:
    """An exclusive lock on the folder's validation set (concurrent sweeps build it once)."""
    lock = _dir(directory) / _LOCK
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _save(tensors: dict[str, torch.Tensor], tmp: Path) -> None:
    # One metadata key: identical tensors give an identical file (and hash).
    save_file(tensors, str(tmp), metadata={"format": "pt"})


def write_validation_set(
    directory: str | Path,
    images: torch.Tensor,
    targets: torch.Tensor,
    teacher_logits: torch.Tensor,
    build: dict,
    cpu_seconds: float | None = None,
) -> ValidationSet:
    """Write the set into the ensemble folder and name it (with its hash) in ``ensemble.json``."""
    directory = _dir(directory)
    manifest = read_manifest(directory)
    counts = torch.bincount(targets, minlength=manifest.num_classes)
    tensors = {
        "images": images.detach().float().cpu().contiguous(),
        "targets": targets.detach().long().cpu().contiguous(),
        "teacher_logits": teacher_logits.detach().float().cpu().contiguous(),
    }
    write_atomic(directory / VALIDATION_FILE, partial(_save, tensors))
    entry = {
        "file": VALIDATION_FILE,
        "sha256": sha256_file(directory / VALIDATION_FILE),
        "images": len(targets),
        "per_class": int(counts.min()),
        "ensemble_id": ensemble_id(manifest),
        "build": build,
        "cpu_seconds": cpu_seconds,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    raw = json.loads((directory / MANIFEST).read_text())
    raw["validation_set"] = entry
    checked = validate_manifest(raw, str(directory / MANIFEST)).model_dump(mode="json")
    text = json.dumps(checked, indent=2) + "\n"
    write_atomic(directory / MANIFEST, lambda tmp: Path(tmp).write_text(text))
    return ValidationSet(**tensors, entry=checked["validation_set"])


def validation_set_problem(directory: str | Path, manifest: Manifest | None = None) -> str | None:
    """Why the folder's validation set cannot be used (missing, altered, stale), or None."""
    directory = _dir(directory)
    manifest = manifest or read_manifest(directory)
    entry = manifest.validation_set
    if entry is None:
        return f"{directory} has no validation set yet"
    path = directory / entry.file
    if not path.is_file():
        return f"{path} is missing"
    digest = sha256_file(path)
    if digest != entry.sha256:
        return (
            f"{path} is truncated or altered (sha256 {digest[:12]}... but {MANIFEST} records "
            f"{entry.sha256[:12]}...)"
        )
    if entry.ensemble_id != ensemble_id(manifest):
        return (
            f"{path} was built from other teachers (ensemble id {entry.ensemble_id}, the "
            f"folder's teachers are {ensemble_id(manifest)})"
        )
    return None


def read_validation_set(directory: str | Path) -> ValidationSet | None:
    """The folder's verified validation set; None when ``ensemble.json`` names none.

    Raises :class:`ValidationSetError` (with the fix) for a missing, altered or stale file.
    """
    directory = _dir(directory)
    manifest = read_manifest(directory)
    if manifest.validation_set is None:
        return None
    problem = validation_set_problem(directory, manifest)
    if problem is not None:
        raise ValidationSetError(f"{problem}: {rebuild_hint(directory)}")
    path = directory / manifest.validation_set.file
    try:
        tensors = load_file(path, device="cpu")
    except (SafetensorError, OSError) as err:
        raise ValidationSetError(
            f"{path} is unreadable ({err}): {rebuild_hint(directory)}"
        ) from None
    if set(tensors) != set(_TENSORS):
        raise ValidationSetError(
            f"{path} holds {sorted(tensors)}, not {list(_TENSORS)}: {rebuild_hint(directory)}"
        )
    vs = ValidationSet(**tensors, entry=manifest.validation_set.model_dump(mode="json"))
    info = manifest.info()
    if tuple(vs.images.shape[1:]) != (info.channels, info.image_size, info.image_size) or (
        vs.num_classes != manifest.num_classes
        or vs.teacher_logits.shape[0] != len(manifest.teachers)
    ):
        raise EnsembleError(
            f"{path} does not fit the ensemble's input or teachers: {rebuild_hint(directory)}"
        )
    return vs
