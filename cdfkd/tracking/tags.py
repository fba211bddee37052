"""What every run is tagged with: kind, code version and commit, and its teacher ensemble."""

from __future__ import annotations

import subprocess
from pathlib import Path

from cdfkd.teachers.manifest import cdfkd_version


def git_commit(start: str | Path | None = None) -> str:
    """``git rev-parse HEAD`` of ``start`` (default: cwd), else of cdfkd's, else "unknown"."""
    for where in (Path(start or Path.cwd()), Path(__file__).resolve().parent):
        try:
            out = subprocess.run(
                ["git", "rev-parse", "HEAD"],
                cwd=where,
                capture_output=True,
                text=True,
                timeout=5,
                check=False,
            )
        except (OSError, subprocess.SubprocessError):
            continue
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    return "unknown"


def standard_tags(run_kind: str, teachers_id: str | None = None, **extra) -> dict[str, str]:
    """Every run's tags: run_kind, git_commit, cdfkd_version, teacher_ensemble_hash + extras."""
    tags = {"run_kind": run_kind, "git_commit": git_commit(), "cdfkd_version": cdfkd_version()}
    if teachers_id:
        tags["teacher_ensemble_hash"] = teachers_id
    tags.update({k: str(v) for k, v in extra.items() if v is not None})
    return tags
