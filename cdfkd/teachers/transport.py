"""Ship an ensemble as plain numpy arrays plus its manifest (Ray's object store, zero-copy)."""

from __future__ import annotations

import warnings

import numpy as np
import torch

from cdfkd.teachers.ensemble import TeacherEnsemble
from cdfkd.teachers.manifest import EnsembleError, make_manifest, validate_manifest
from cdfkd.teachers.store import build_teacher


def ensemble_to_numpy(ensemble: TeacherEnsemble) -> dict:
    """``{"manifest": dict, "weights": [{name: np.ndarray} per teacher], "mode": str}``.

    Plain numpy arrays and JSON-able values only, so Ray's object store holds them
    zero-copy; on CPU the arrays share memory with the teachers.
    """
    manifest = ensemble.manifest
    if not manifest:
        entries = [
            {"file": f"teacher_{i}.safetensors", "arch": a, "sha256": "0" * 64}
            for i, a in enumerate(ensemble.archs)
        ]
        manifest = make_manifest(entries, ensemble.info)
    weights = []
    for teacher in ensemble.teachers:
        state = {}
        for k, v in teacher.state_dict().items():
            v = v.detach().cpu()
            if v.dtype == torch.bfloat16:  # numpy has no bfloat16
                raise EnsembleError(
                    "bfloat16 teachers cannot be shipped as numpy; convert to float32"
                )
            state[k] = v.numpy()
        weights.append(state)
    return {"manifest": dict(manifest), "weights": weights, "mode": ensemble.mode}


def ensemble_from_numpy(payload: dict, device: torch.device | str = "cpu") -> TeacherEnsemble:
    """Rebuild the ensemble ``ensemble_to_numpy`` produced, with exactly its weights.

    On CPU the teachers' tensors are views of the payload's arrays (no copy: a
    node's trials all read the one object-store copy). That is safe because
    teachers are frozen and always in eval mode, so nothing writes to them.
    """
    manifest = validate_manifest(payload.get("manifest"), "numpy payload manifest")
    weights = payload.get("weights")
    if not isinstance(weights, list) or len(weights) != len(manifest.teachers):
        raise EnsembleError("numpy payload: 'weights' must hold one dict of arrays per teacher")
    info = manifest.info()
    models = []
    for i, (entry, arrays) in enumerate(zip(manifest.teachers, weights, strict=True)):
        with warnings.catch_warnings():
            # Object-store arrays are read-only; teachers never write to their weights.
            warnings.filterwarnings("ignore", message=".*not writable.*")
            state = {k: torch.from_numpy(np.asarray(a)) for k, a in arrays.items()}
        model = build_teacher(entry, info, state, f"numpy payload teacher {i}")
        if torch.device(device).type == "cpu":
            model.load_state_dict(state, assign=True)
        models.append(model)
    archs = [t.arch for t in manifest.teachers]
    raw = manifest.model_dump(mode="json")
    mode = payload.get("mode", "auto")
    return TeacherEnsemble(models, info, archs, manifest=raw, mode=mode).to(device)
