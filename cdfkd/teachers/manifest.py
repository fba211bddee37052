"""``ensemble.json``: its schema, validation, and the errors raised for unusable ensembles.

An ensemble directory holds one weights file per teacher and ``ensemble.json``::

    {"format": "cdfkd-ensemble", "format_version": 1,
     "dataset": "digits", "arch": "lenet5" | "mixed", "num_classes": 10,
     "input": {DatasetInfo.to_dict(): name, num_classes, channels, image_size, mean, std},
     "teachers": [{"file": "teacher_0.safetensors", "arch": "lenet5", "seed": 0,
                   "test_accuracy": 0.97, "sha256": "...", "model_kwargs": {}}, ...],
     "ensemble_accuracy": 0.98, "config": {...training config...},
     "cdfkd_version": "0.1.0", "created": "2026-11-25T03:20:00+00:00",
     "validation_set": {"file": "validation_set.safetensors", "sha256": "...",
                        "images": 500, "per_class": 50, "ensemble_id": "...",
                        "build": {...synthesis settings...}, "cpu_seconds": 80.0,
                        "created": "..."}}

Accuracies are fractions in [0, 1] (null when unknown). Unknown keys are errors.
``validation_set`` (optional, absent in manifests written before it existed) names the
synthetic selection set built from these teachers (``cdfkd.teachers.validation``);
``ensemble_id`` is the id of the teachers it was built from.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cdfkd.data import DatasetInfo

MANIFEST = "ensemble.json"
FORMAT = "cdfkd-ensemble"
FORMAT_VERSION = 1
TORCH_SUFFIXES = (".pt", ".pth")
WEIGHT_SUFFIXES = (".safetensors", *TORCH_SUFFIXES)


class EnsembleError(ValueError):
    """An ensemble directory or teacher file that cannot be used; the message says how to fix it."""


class EnsembleIntegrityError(EnsembleError):
    """A teacher file is missing, truncated, altered (sha256 mismatch) or unreadable."""


class UnsafeCheckpointError(EnsembleError):
    """A torch checkpoint whose pickle would execute code to load; only plain weights are read."""


class EnsembleMismatchError(EnsembleError):
    """The ensemble is valid but not what the caller expects (architecture, class count)."""


# ----------------------------------------------------------------------------- manifest


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TeacherEntry(_Strict):
    file: str = Field(description="weights file name inside the ensemble directory")
    arch: str = Field(
        description="zoo model name (cdfkd.models.list_models()), torchvision:<name> or "
        "package.module:function (loading it needs that module trusted: --trust)"
    )
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    seed: int | None = None
    test_accuracy: float | None = Field(None, ge=0.0, le=1.0)
    model_kwargs: dict = Field(
        default_factory=dict, description="extra create_model arguments (stages, builder kwargs)"
    )

    @field_validator("file")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        if Path(v).name != v or v in ("", ".", ".."):
            raise ValueError(f"{v!r} must be a plain file name inside the ensemble directory")
        if not v.endswith(WEIGHT_SUFFIXES):
            raise ValueError(f"{v!r} must end in one of {', '.join(WEIGHT_SUFFIXES)}")
        return v


class ValidationSetEntry(_Strict):
    """The synthetic validation set of an ensemble folder (``cdfkd.teachers.validation``)."""

    file: str = Field(description="safetensors file name inside the ensemble directory")
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    images: int = Field(ge=1)
    per_class: int = Field(ge=1)
    ensemble_id: str = Field(description="ensemble_id() of the teachers it was built from")
    build: dict = Field(default_factory=dict, description="the synthesis settings")
    cpu_seconds: float | None = None
    created: str = ""

    @field_validator("file")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        if Path(v).name != v or v in ("", ".", "..") or not v.endswith(".safetensors"):
            raise ValueError(f"{v!r} must be a plain .safetensors file name in the directory")
        return v


class Manifest(_Strict):
    format: Literal["cdfkd-ensemble"] = "cdfkd-ensemble"
    format_version: Literal[1] = 1
    dataset: str
    arch: str = Field(description="the teachers' common arch, or 'mixed'")
    num_classes: int = Field(ge=1)
    input: dict
    teachers: list[TeacherEntry] = Field(min_length=1)
    ensemble_accuracy: float | None = Field(None, ge=0.0, le=1.0)
    config: dict = Field(default_factory=dict)
    cdfkd_version: str = "unknown"
    created: str = ""
    validation_set: ValidationSetEntry | None = Field(
        None, exclude_if=lambda v: v is None, description="the synthetic validation set"
    )

    def info(self) -> DatasetInfo:
        return DatasetInfo.from_dict(self.input)


def ensemble_id(manifest: Manifest | dict) -> str:
    """A 12-hex-digit id of a teacher ensemble: sha256 of its teachers' sha256 list, in order."""
    import hashlib

    teachers = (
        manifest["teachers"] if isinstance(manifest, dict) else manifest.model_dump()["teachers"]
    )
    return hashlib.sha256("\n".join(t["sha256"] for t in teachers).encode()).hexdigest()[:12]


def ensemble_id_of_dir(path: str | Path) -> str | None:
    """The id of the ensemble folder ``path``; None when it has no readable manifest."""
    try:
        return ensemble_id(read_manifest(path))
    except (EnsembleError, OSError):
        return None


def cdfkd_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cdfkd")
    except PackageNotFoundError:
        import cdfkd

        return getattr(cdfkd, "__version__", "unknown")


def validate_manifest(raw: object, where: str) -> Manifest:
    try:
        manifest = Manifest.model_validate(raw)
        info = manifest.info()
    except ValidationError as err:
        problems = "\n".join(
            f"  {'.'.join(map(str, e['loc'])) or '(top level)'}: {e['msg']}" for e in err.errors()
        )
        raise EnsembleError(
            f"{where} is not a valid ensemble manifest:\n{problems}\n"
            "Write ensembles with `cdfkd teachers train` or cdfkd.teachers.save_ensemble()."
        ) from None
    except (TypeError, ValueError) as err:
        raise EnsembleError(f"{where}: invalid 'input' spec ({err})") from None
    if info.num_classes != manifest.num_classes:
        raise EnsembleError(
            f"{where}: num_classes {manifest.num_classes} disagrees with input.num_classes "
            f"{info.num_classes}; fix the manifest"
        )
    return manifest


def read_manifest(path: str | Path) -> Manifest:
    """Parse and validate ``DIR/ensemble.json`` (``path`` is the directory or the file)."""
    path = Path(path)
    file = path if path.name == MANIFEST else path / MANIFEST
    if not file.is_file():
        raise EnsembleError(
            f"{file} does not exist: {path} is not an ensemble directory. Create one with "
            "`cdfkd teachers train --out DIR ...` or cdfkd.teachers.save_ensemble(models, DIR, ...)"
        )
    try:
        raw = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise EnsembleError(
            f"{file} is not valid JSON ({err}); restore it or re-create the ensemble"
        ) from None
    return validate_manifest(raw, str(file))


def make_manifest(
    entries: list[dict],
    info: DatasetInfo,
    *,
    dataset: str | None = None,
    ensemble_accuracy: float | None = None,
    config: dict | None = None,
) -> dict:
    """A validated manifest dict for teacher ``entries`` (TeacherEntry fields)."""
    archs = {e["arch"] for e in entries}
    raw = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "dataset": dataset or info.name,
        "arch": archs.pop() if len(archs) == 1 else "mixed",
        "num_classes": info.num_classes,
        "input": info.to_dict(),
        "teachers": entries,
        "ensemble_accuracy": ensemble_accuracy,
        "config": config or {},
        "cdfkd_version": cdfkd_version(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    return validate_manifest(raw, "manifest").model_dump(mode="json")
