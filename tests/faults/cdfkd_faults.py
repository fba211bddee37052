"""Faults injected on purpose into the distillation loop, for the failure-path tests.

A test must make its failure happen for certain, on every machine, and still go
through the code a user's run goes through. So nothing here replaces the loop's
checks: a fault changes what the method computes (a student weight turned NaN, so
the loss is NaN for real) or when it computes it (a step held until the test says
go), and the engine's own non-finite check, checkpoints and Tune's recovery do
the rest.

``spec`` (a dict; in Ray workers the JSON in ``$CDFKD_TEST_FAULTS``, see
``sitecustomize.py`` beside this file):

- ``{"nonfinite": {"step": 7, "when": {"optim.lr": 10.0}}}``: at the start of
  step 7 (1-based, the step the error will name) of every run whose flattened
  config matches ``when``, the student's first parameter is filled with NaN.
- ``{"hold": {"step": 13, "marker": PATH, "release": PATH, "when": {...}}}``: at the
  start of step 13 (so after the evaluation and checkpoint of step 12 were reported)
  of a matching run, write ``marker`` (the Ray node id and pid) and wait until
  ``release`` exists; a run that reaches the step after the release goes straight on.
  With ``"at": "save"`` the hold is inside the checkpoint save of ``step`` instead:
  that step's evaluation is logged, its checkpoint neither written nor reported.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

ENV = "CDFKD_TEST_FAULTS"


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _matches(cfg, when: dict) -> bool:
    flat = _flat(cfg.to_dict())
    return all(flat.get(k) == v for k, v in when.items())


def _node_id() -> str:
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except Exception:  # not in a Ray worker
        pass
    return "local"


def wrap_step(step, spec: dict):
    """``DistillMethod.step`` with the faults of ``spec`` applied before the real step."""
    import torch

    nonfinite = spec.get("nonfinite")
    hold = spec.get("hold")
    if hold and hold.get("at", "step") != "step":
        hold = None

    def faulty_step(self):
        upcoming = self.step_count + 1
        if (
            nonfinite
            and upcoming == nonfinite["step"]
            and _matches(self.cfg, nonfinite.get("when", {}))
        ):
            with torch.no_grad():
                next(self.student.parameters()).fill_(float("nan"))
        if hold and upcoming == hold["step"] and _matches(self.cfg, hold.get("when", {})):
            _hold(hold)
        return step(self)

    faulty_step.__wrapped__ = step
    return faulty_step


def _hold(hold: dict) -> None:
    """Write the marker and wait for the release file (unless it exists already)."""
    release = Path(hold["release"])
    if release.exists():
        return
    marker = Path(hold["marker"])
    marker.parent.mkdir(parents=True, exist_ok=True)
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps({"node_id": _node_id(), "pid": os.getpid()}))
    os.replace(tmp, marker)
    while not release.exists():
        time.sleep(0.05)


def wrap_save_checkpoint(save, spec: dict):
    """``RunDir.save_checkpoint`` held at step ``hold.step`` when ``hold.at == "save"``."""
    hold = spec.get("hold") or {}

    def holding_save(self, state: dict) -> None:
        if hold.get("at") == "save" and state.get("step") == hold["step"]:
            _hold(hold)
        return save(self, state)

    holding_save.__wrapped__ = save
    return holding_save


def install(spec: dict) -> None:
    """Patch ``cdfkd.methods.base.DistillMethod.step`` in this process."""
    from cdfkd.methods.base import DistillMethod

    step = getattr(DistillMethod.step, "__wrapped__", DistillMethod.step)
    DistillMethod.step = wrap_step(step, spec)


def worker_env(spec: dict) -> dict[str, str]:
    """Environment variables that make Python processes (Ray workers) started with them
    install ``spec``: this folder first on PYTHONPATH, and the spec itself."""
    here = str(Path(__file__).resolve().parent)
    path = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": here + (os.pathsep + path if path else ""), ENV: json.dumps(spec)}
