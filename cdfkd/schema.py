"""The base of every typed config (experiment, methods, sweep spec): unknown keys are errors.

A leaf module, so that method configs (``cdfkd/methods/``) and the experiment config
(``cdfkd/config.py``) share one base without importing each other.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, ValidationError


class Strict(BaseModel):
    """A config section: a typo is an error naming the key, and assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def format_errors(err: ValidationError, prefix: str = "") -> str:
    """One ``  <dotted.key>: <problem>`` line per error of ``err``, keys prefixed by ``prefix``."""
    lines = []
    for e in err.errors():
        where = (
            prefix + ".".join(str(p) for p in e["loc"])
            if e["loc"]
            else prefix.rstrip(".") or "(top level)"
        )
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see configs/ for examples)"
        lines.append(f"  {where}: {msg}")
    return "\n".join(lines)
