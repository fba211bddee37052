"""The student as an MLflow model: logging it, the Model Registry, and loading it back.

Students are logged in MLflow's ``pt2`` format (``cdfkd.tracking.export``: a
``torch.export`` program with a dynamic batch dimension, no pickle). The logged
module is ``ServingStudent``: (B, C) logits, the mean over headers for multi-header
students. Loading gives a ``torch.fx.GraphModule``, not the training class; call it
on (B, C, H, W) float tensors normalised like the dataset.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cdfkd.errors import ConfigError
from cdfkd.runs import RunDir
from cdfkd.tracking.export import serving_module
from cdfkd.tracking.uri import bound_http_requests, resolve_tracking_uri, using_tracking_uri

log = logging.getLogger(__name__)


def _requirements() -> list[str]:
    import mlflow

    # Given, not inferred: MLflow's inference re-imports the model in a subprocess (~10 s).
    return [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"]


def log_student(
    client,
    tracking_uri: str,
    experiment_id: str,
    run_id: str,
    module: nn.Module,
    example: np.ndarray,
    name: str = "student",
) -> str:
    """Log ``module`` as a ``pt2`` model of run ``run_id``; returns its ``models:/m-<id>`` URI."""
    import mlflow.pytorch
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    with torch.no_grad():
        num_classes = module(torch.from_numpy(example)).shape[-1]
    f32 = np.dtype(np.float32)
    signature = ModelSignature(
        inputs=Schema([TensorSpec(f32, (-1, *example.shape[1:]), name="images")]),
        outputs=Schema([TensorSpec(f32, (-1, num_classes), name="logits")]),
    )
    # The logged model is created here, in the run's experiment: MLflow's fluent call
    # would put it in the process's active experiment (the Default one in a trial).
    model = client.create_logged_model(experiment_id, name=name, source_run_id=run_id)
    try:
        with using_tracking_uri(tracking_uri):
            info = mlflow.pytorch.log_model(
                module,
                name=name,
                input_example=example,
                signature=signature,
                run_id=run_id,
                model_id=model.model_id,
                serialization_format="pt2",
                pip_requirements=_requirements(),
                # Serving validation reloads the model in-process (seconds); tests load it instead.
                validate_serving_input=False,
            )
    except Exception:
        try:
            client.delete_logged_model(model.model_id)  # no half-uploaded model left behind
        except Exception as err:  # the server may be the reason we are here
            log.debug("could not delete the unfinished logged model %s: %s", model.model_id, err)
        raise
    return info.model_uri


def student_from_run_dir(run_dir: str | Path) -> tuple[nn.Module, tuple[int, int, int]]:
    """A finished run's student and its input shape (C, H, W) (``RunDir.load_student``)."""
    student, info = RunDir(run_dir).load_student()
    return student, (info.channels, info.image_size, info.image_size)


def log_run_student(
    client, tracking_uri: str, experiment_id: str, run_id: str, run_dir: str | Path
) -> str:
    """Log a run folder's student into run ``run_id`` (one that logged none); returns its URI."""
    student, shape = student_from_run_dir(run_dir)
    example = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0)).numpy()
    return log_student(
        client, tracking_uri, experiment_id, run_id, serving_module(student), example
    )


def register_student(
    model_uri: str,
    name: str,
    *,
    tracking_uri: str,
    run_id: str | None = None,
    tags: dict | None = None,
    alias: str | None = None,
) -> str:
    """Register ``model_uri`` as a version of ``name``; an earlier one of the run is reused."""
    import mlflow

    bound_http_requests()
    client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    version = None
    if run_id is not None and client.search_registered_models(f"name = '{name}'"):
        # A resumed sweep registers again: the same run keeps its one version.
        found = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
        version = found[0].version if found else None
    if version is None:
        with using_tracking_uri(tracking_uri):
            version = mlflow.register_model(model_uri, name, tags=tags).version
    if alias:
        client.set_registered_model_alias(name, alias, version)
    return str(version)


def load_registered_student(
    name: str, version: str | int = "latest", tracking_uri: str | None = None
) -> nn.Module:
    """A registered student, ready to predict: ``model(x)`` -> (B, C) logits for any batch size.

    ``version``: "latest" (highest number), a number, or an alias ("best", "pareto-0").
    ``tracking_uri``: as for every cdfkd run (None: $MLFLOW_TRACKING_URI or ./mlflow.db).
    """
    import mlflow
    import mlflow.pytorch
    from mlflow.exceptions import MlflowException

    bound_http_requests()
    uri = resolve_tracking_uri(tracking_uri)
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    versions = client.search_model_versions(f"name = '{name}'")
    if not versions:
        known = sorted(m.name for m in client.search_registered_models())
        raise ConfigError(
            f"no registered model {name!r} at {uri}; registered: {', '.join(known) or 'none'}"
        )
    if str(version) == "latest":
        version = max(int(v.version) for v in versions)
    elif not str(version).isdigit():
        try:
            version = client.get_model_version_by_alias(name, str(version)).version
        except MlflowException:
            raise ConfigError(
                f"model {name!r} has no alias {version!r}: use a version number or 'latest'"
            ) from None
    elif str(version) not in {str(v.version) for v in versions}:
        raise ConfigError(
            f"model {name!r} has no version {version}; versions: "
            f"{', '.join(sorted((v.version for v in versions), key=int))}"
        )
    with using_tracking_uri(uri):
        return mlflow.pytorch.load_model(f"models:/{name}/{version}", map_location="cpu")
