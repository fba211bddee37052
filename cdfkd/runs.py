"""The run folder: what a ``cdfkd distill`` run (or a sweep trial's ``run/``) holds, and its rules.

One owner for the folder's format; nobody else spells these file names::

    config.yaml      the validated config the run was started with
    checkpoint.pt    the method's state at the last checkpoint (exact resume)
    student.pt       the final student's state_dict
    result.json      the final metrics (written last: its presence means "finished")
    samples.png      a grid of generated images
    metrics.jsonl    every evaluation, one JSON object a line
    aggregator.pt    the learned header aggregation (``--few-shot``)
    export/          the student for deployment (``cdfkd export``; its files: ``cdfkd.export``)

The MLflow outbox files in the same folder belong to ``cdfkd.tracking``. Every write
is atomic (``cdfkd.files``), so a crash, a full disk or a lost node leaves the
previous file whole.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from cdfkd.config import ExperimentConfig, build_config
from cdfkd.data import DatasetInfo
from cdfkd.errors import ConfigError, StorageError
from cdfkd.files import read_json, torch_save_atomic, write_json_atomic, write_text_atomic
from cdfkd.generators import LatentGenerator

CONFIG = "config.yaml"
CHECKPOINT = "checkpoint.pt"
STUDENT = "student.pt"
RESULT = "result.json"
SAMPLES = "samples.png"
METRICS = "metrics.jsonl"
AGGREGATOR = "aggregator.pt"
EXPORT = "export"

#: free space a run folder needs before training starts (checkpoints of small students
#: are a few MB; this leaves room for them, the student, samples and the outbox)
MIN_FREE_BYTES = 64 * 2**20


class RunDir:
    """A run folder at ``path`` (created on the first write)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    # -- state

    @property
    def has_checkpoint(self) -> bool:
        return (self.path / CHECKPOINT).is_file()

    @property
    def finished(self) -> bool:
        return (self.path / RESULT).is_file()

    def prepare(self, resume: bool) -> None:
        """Check that the folder can take a new run (or a resumed one), before any work.

        A fresh run refuses a folder that holds a checkpoint; ``resume`` needs one. The
        folder must be writable and have room: both are tried now, with a probe file
        that is removed again, so that a bad ``--out`` or ``storage_path`` fails here
        with the fix rather than at the first checkpoint, and leaves nothing behind that
        a later ``--resume`` would take for a run.
        """
        if self.has_checkpoint and not resume:
            raise ConfigError(
                f"{self.path} already holds a run: pass --resume to continue it, or choose "
                "another --out"
            )
        if resume and not self.has_checkpoint:
            raise ConfigError(
                f"--resume: no {CHECKPOINT} in {self.path}; run without --resume to start"
            )
        ensure_writable(self.path)

    # -- files

    def write_config(self, cfg: ExperimentConfig) -> None:
        write_text_atomic(self.path / CONFIG, yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    def read_config(self, overrides: list[str] | None = None) -> ExperimentConfig:
        path = self.path / CONFIG
        if not path.is_file():
            raise ConfigError(f"{self.path} is not a finished run: {CONFIG} is missing")
        return build_config(yaml.safe_load(path.read_text()) or {}, overrides, source=str(path))

    def save_checkpoint(self, state: dict) -> None:
        try:
            torch_save_atomic(state, self.path / CHECKPOINT)
        except OSError as err:
            kept = (
                f"the previous {CHECKPOINT} is intact; free space, then --resume"
                if self.has_checkpoint
                else "no checkpoint was written yet; free space and start again"
            )
            raise StorageError(
                f"cannot write {self.path / CHECKPOINT} ({err.strerror or err}): {kept}"
            ) from err

    def load_checkpoint(self) -> dict:
        return load_checkpoint(self.path / CHECKPOINT)

    def copy_checkpoint_to(self, folder: Path) -> None:
        shutil.copy2(self.path / CHECKPOINT, Path(folder) / CHECKPOINT)

    def restore_checkpoint_from(self, folder: Path) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        shutil.copy2(Path(folder) / CHECKPOINT, self.path / CHECKPOINT)

    def save_student(self, student: nn.Module) -> None:
        torch_save_atomic(student.state_dict(), self.path / STUDENT)

    def write_result(self, result: dict) -> None:
        write_json_atomic(self.path / RESULT, result)

    def read_result(self) -> dict | None:
        return read_json(self.path / RESULT)

    def update_result(self, key: str, value: Any) -> dict:
        """Set ``result[key] = value`` in ``result.json`` (created if missing)."""
        result = self.read_result() or {}
        result[key] = value
        self.write_result(result)
        return result

    def append_metrics(self, row: dict) -> None:
        with (self.path / METRICS).open("a") as f:
            f.write(json.dumps(row) + "\n")

    def load_student(
        self, device: torch.device | str = "cpu", info: DatasetInfo | None = None
    ) -> tuple[nn.Module, DatasetInfo]:
        """The finished run's student (eval mode, on ``device``) and the input info it was built for.

        Rebuilt from ``config.yaml`` and ``student.pt``; class count and input geometry
        come from ``info`` (the run's dataset) or else from the run's teacher manifest.
        """
        from cdfkd.teachers import read_manifest

        weights = self.path / STUDENT
        cfg = self.read_config()
        if not weights.is_file():
            raise ConfigError(f"{self.path} is not a finished run: {STUDENT} is missing")
        if info is None:
            info = read_manifest(cfg.teachers.path).info()
        student = cfg.student.build(info.num_classes, info.channels, info.image_size)
        state = torch.load(weights, map_location="cpu", weights_only=True)
        try:
            student.load_state_dict(state)
        except RuntimeError as err:
            raise ConfigError(
                f"{weights} does not fit the student that {self.path / CONFIG} describes "
                f"({str(err).splitlines()[0]}): the folder mixes two runs"
            ) from None
        return student.to(device).eval(), info

    def load_generator(self, device: torch.device | str = "cpu") -> LatentGenerator | None:
        """The run's generator as of its last checkpoint (eval mode, on ``device``); None for a
        method without one (``kd_real``).

        Rebuilt from ``config.yaml`` (its method's ``generator_kind``, ``generator.nz`` and
        ``.width``), the teachers' input info and ``checkpoint.pt``'s ``generator`` state.
        """
        from cdfkd.generators import create_generator
        from cdfkd.methods import METHODS
        from cdfkd.teachers import read_manifest

        cfg = self.read_config()
        kind = METHODS.get(cfg.method.name).generator_kind
        if kind is None:
            return None
        if not self.has_checkpoint:
            raise ConfigError(f"{self.path} has no {CHECKPOINT}: its generator cannot be rebuilt")
        info = read_manifest(cfg.teachers.path).info()
        generator = create_generator(kind, info, nz=cfg.generator.nz, width=cfg.generator.width)
        state = self.load_checkpoint().get("generator")
        if state is None:
            raise ConfigError(f"{self.path / CHECKPOINT} holds no generator state")
        try:
            generator.load_state_dict(state)
        except RuntimeError as err:
            raise ConfigError(
                f"{self.path / CHECKPOINT}'s generator does not fit the one {self.path / CONFIG} "
                f"describes ({str(err).splitlines()[0]}): the folder mixes two runs"
            ) from None
        return generator.to(device).eval()

    @property
    def export_dir(self) -> Path:
        """Where ``cdfkd export`` writes the deployable student."""
        return self.path / EXPORT


def load_checkpoint(path: Path) -> dict:
    """A checkpoint written by ``RunDir.save_checkpoint``, read with ``weights_only=True``."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, corrupt or not ours
        raise ConfigError(
            f"checkpoint {path} cannot be read ({type(err).__name__}: {err}); "
            "delete it to start over, or restore it from a backup"
        ) from None


def ensure_writable(folder: str | Path, min_free: int = MIN_FREE_BYTES) -> None:
    """Create ``folder`` if needed and prove it takes a file; refuse a nearly full disk.

    Nothing is left behind: the folders this creates are removed again when the
    probe fails, and the probe file always is.
    """
    folder = Path(folder)
    created = []
    for parent in [folder, *folder.parents]:
        if parent.exists():
            break
        created.append(parent)

    def undo() -> None:
        for path in created:  # deepest first
            try:
                path.rmdir()
            except OSError:
                break

    probe = folder / ".cdfkd-write-probe"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        free = shutil.disk_usage(folder).free
    except OSError as err:
        undo()
        raise StorageError(
            f"{folder} cannot be written ({err.strerror or err}): choose a folder you can "
            "write to (--out, storage_path) or fix its permissions"
        ) from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink(missing_ok=True)
    if free < min_free:
        undo()
        raise StorageError(
            f"{folder} has {free / 2**20:.0f} MiB free, less than the {min_free / 2**20:.0f} MiB "
            "a run needs for its checkpoints: free some space or choose another folder"
        )
