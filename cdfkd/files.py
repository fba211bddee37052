"""Atomic file writes: a crash mid-write leaves the previous file whole, never half a new one.

The one owner of the write-to-a-temporary-name-then-rename rule; run folders,
ensemble folders and the MLflow outbox all write through it.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_atomic(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` on a temporary path beside ``path``, then rename it over ``path``.

    The temporary file lives in the same folder (a rename is atomic only within one
    file system) and is removed when ``write`` fails, so a full disk leaves nothing
    behind but the old file.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_bytes(data))


def write_text_atomic(path: str | Path, text: str) -> Path:
    return write_bytes_atomic(path, text.encode())


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2))


def torch_save_atomic(obj: Any, path: str | Path) -> Path:
    """``torch.save`` through :func:`write_atomic` (checkpoints, student weights)."""
    import torch

    return write_atomic(path, lambda tmp: torch.save(obj, tmp))


def read_json(path: str | Path) -> Any | None:
    """The JSON in ``path``; None when it is missing or unreadable (cut short by a crash)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
