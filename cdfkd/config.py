"""The experiment config: YAML -> dotted overrides -> one typed, validated object.

Every component config forbids unknown keys, so a typo is an error that names
the key and the known ones. Method-specific fields live in each method's own
``Config`` class (``cdfkd/methods/<name>.py``); the experiment config picks the
right class from ``method.name``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, SerializeAsAny, ValidationError, model_validator

from cdfkd.data import load_dataset, validation_split
from cdfkd.errors import ConfigError
from cdfkd.methods import MethodConfig, method_config_class
from cdfkd.methods.pool import PoolConfig
from cdfkd.models import create_student
from cdfkd.schema import Strict as _Strict
from cdfkd.schema import format_errors

__all__ = [
    "AggregationConfig",
    "ConfigError",
    "DataConfig",
    "ExperimentConfig",
    "GeneratorConfig",
    "MethodConfig",
    "OptimConfig",
    "PoolConfig",
    "ReferenceConfig",
    "StudentConfig",
    "TeacherConfig",
    "TrackingConfig",
    "TrainConfig",
    "apply_overrides",
    "apply_values",
    "build_config",
    "load_config",
]


class DataConfig(_Strict):
    name: str = Field("digits", description="dataset registry name (cdfkd.data.list_datasets())")
    root: str = Field("data", description="dataset root folder")
    image_size: int | None = Field(None, ge=8, le=512, description="None: the dataset's default")
    download: bool = True
    split_seed: int = Field(
        0, description="seed of datasets without a fixed split (digits, caltech101)"
    )

    validation_images: int = Field(
        0,
        ge=0,
        description="training images held out as a validation split: every evaluation reports "
        "validation_accuracy on them, so sweeps and defaults are chosen without the test set; "
        "no method trains on them; 0: none",
    )

    def _load(self, augment: bool):
        return load_dataset(
            self.name,
            root=self.root,
            image_size=self.image_size,
            seed=self.split_seed,
            download=self.download,
            augment=augment,
        )

    def load(self, augment: bool = True):
        """(train, test, DatasetInfo) of this dataset (cdfkd.data.load_dataset); the train
        split without the ``validation_images`` held out."""
        train, test, info = self._load(augment)
        if self.validation_images:
            train = self._split(train)[0]
        return train, test, info

    def load_validation(self):
        """The held-out validation images with the test transform; None when there are none."""
        if not self.validation_images:
            return None
        train, _, _ = self._load(augment=False)
        return self._split(train)[1]

    def _split(self, train):
        try:
            return validation_split(train, self.validation_images, self.split_seed)
        except ValueError as err:
            raise ConfigError(f"data.validation_images: {err}; lower it or set 0") from None


class TeacherConfig(_Strict):
    path: str = Field(..., description="ensemble directory written by `cdfkd teachers train`")
    mode: Literal["auto", "loop", "vmap"] = "auto"


class StudentConfig(_Strict):
    arch: str = Field(
        "lenet5_half",
        description="backbone: a zoo model (cdfkd.models.list_models()), torchvision:<name> "
        "(cdfkd.models.list_torchvision_models()) or package.module:function (needs --trust)",
    )
    family: Literal["mfs", "branch"] | None = Field(None, description="None: single-header student")
    headers: int = Field(1, ge=1, le=64)
    fuse_from: int | None = Field(None, description="mfs: first trunk stage the headers read")
    share_until: int | None = Field(None, description="branch: stages [0, share_until) are shared")
    header_width: float = Field(1.0, gt=0.0, le=4.0)
    stages: list[str] | None = Field(
        None,
        description="torchvision/user backbones: the modules whose outputs are the stage maps "
        "(dotted names); None: the automatic rule (cdfkd.models.tracing)",
    )

    def build(self, num_classes: int, in_channels: int, image_size: int):
        """The student this config describes (cdfkd.models.create_student)."""
        return create_student(
            self.arch,
            num_classes=num_classes,
            in_channels=in_channels,
            image_size=image_size,
            family=self.family,
            headers=self.headers,
            fuse_from=self.fuse_from,
            share_until=self.share_until,
            header_width=self.header_width,
            stages=self.stages,
        )

    @model_validator(mode="after")
    def _family_fields(self) -> StudentConfig:
        if self.family is None and self.headers != 1:
            raise ValueError(
                "headers > 1 needs a multi-header family: set student.family to mfs or branch"
            )
        if self.family != "mfs" and self.fuse_from is not None:
            raise ValueError("student.fuse_from only applies to family 'mfs'")
        if self.family != "branch" and self.share_until is not None:
            raise ValueError("student.share_until only applies to family 'branch'")
        return self


class GeneratorConfig(_Strict):
    nz: int = Field(100, ge=1, le=4096)
    width: int = Field(64, ge=4, le=1024)
    lr: float = Field(1e-3, gt=0.0, le=1.0)
    betas: tuple[float, float] = (0.5, 0.999)


class OptimConfig(_Strict):
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.05, gt=0.0, le=10.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(5e-4, ge=0.0, le=0.1)
    schedule: Literal["cosine", "constant"] = "cosine"


class TrainConfig(_Strict):
    steps: int = Field(1000, ge=1, description="generator/student rounds")
    batch_size: int = Field(128, ge=2, le=4096)
    eval_every: int = Field(200, ge=1)
    checkpoint_every: int = Field(200, ge=1)
    eval_batch_size: int = Field(512, ge=1)
    seed: int = 0
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    threads: int | None = Field(None, ge=1, description="torch intra-op threads; None: leave as is")
    max_eval_samples: int | None = Field(
        None,
        ge=1,
        description="cap on test (and validation) images per evaluation during training; the last step's, the final one, is always whole",
    )
    pool: PoolConfig | None = Field(
        None, description="image pool of generator-based methods; None: the method's default"
    )
    precision: Literal["fp32", "bf16", "auto"] = Field(
        "auto",
        description="bf16: autocast for generator, teacher and student forwards; auto: bf16 "
        "on CUDA devices that support it, fp32 elsewhere",
    )
    channels_last: bool | None = Field(
        None,
        description="models in channels_last memory format; None: all on CUDA, generator and "
        "student on CPU (faster there, BENCHMARKS.md)",
    )
    compile: bool = Field(False, description="torch.compile the teachers and the student")


class ReferenceConfig(_Strict):
    kind: Literal["ensemble", "best_teacher", "kd_real"] = "ensemble"
    result: str | None = Field(
        None, description="kd_real: path to the KD-with-real-data result.json"
    )
    name: str | None = Field(None, description="kd_real: a label for the reference in reports")

    @model_validator(mode="after")
    def _kd_real_needs_result(self) -> ReferenceConfig:
        if self.kind == "kd_real" and not self.result:
            raise ValueError(
                "reference.kind=kd_real needs reference.result: the result.json of a kd_real run"
            )
        return self


class AggregationConfig(_Strict):
    few_shot: int = Field(0, ge=0, le=100, description="M real labelled samples per class; 0: off")
    epochs: int = Field(100, ge=1)
    lr: float = Field(1e-2, gt=0.0)
    seed: int = 0


class TrackingConfig(_Strict):
    enabled: bool = Field(
        True, description="log to MLflow (records are buffered and replayed when it is down)"
    )
    uri: str | None = Field(
        None, description="MLflow tracking URI; None: $MLFLOW_TRACKING_URI or ./mlflow.db"
    )
    experiment: str | None = Field(
        None, description="MLflow experiment; None: cdfkd-distill (sweeps: the sweep name)"
    )
    run_name: str | None = None
    log_model: bool = Field(True, description="log the student with mlflow.pytorch.log_model")


class ExperimentConfig(_Strict):
    method: SerializeAsAny[MethodConfig]
    data: DataConfig = DataConfig()
    teachers: TeacherConfig
    student: StudentConfig = StudentConfig()
    generator: GeneratorConfig = GeneratorConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    reference: ReferenceConfig = ReferenceConfig()
    aggregation: AggregationConfig = AggregationConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="before")
    @classmethod
    def _typed_method(cls, data: Any) -> Any:
        # Pick the method's own config class so its fields are validated (and
        # unknown ones refused) here, at the edge, not when the method runs.
        if isinstance(data, dict) and isinstance(data.get("method"), dict):
            data = dict(data)
            data["method"] = method_config_class(data["method"].get("name", ""))(**data["method"])
        return data

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")


def apply_values(raw: dict, values: dict[str, Any]) -> dict:
    """Set dotted keys (``{"method.alpha": 0.5}``) in a copy of a raw config dict.

    Changing ``method.name`` drops the previous method's own fields, since they
    would be unknown keys for the new method.
    """
    out = copy.deepcopy(raw)
    new_method = values.get("method.name")
    if new_method is not None and (out.get("method") or {}).get("name") != new_method:
        out["method"] = {"name": new_method}
    for key, value in values.items():
        parts = key.strip().split(".")
        node = out
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {key!r}: {part!r} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return out


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``key.sub=value`` strings to a raw config dict (values parsed as YAML scalars)."""
    values = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"override {item!r} is not key=value (example: --set method.alpha=0.5)"
            )
        key, value = item.split("=", 1)
        values[key.strip()] = yaml.safe_load(value)
    return apply_values(raw, values)


def build_config(
    raw: dict, overrides: list[str] | None = None, source: str = "config"
) -> ExperimentConfig:
    """Validate a raw dict (plus overrides) into an ExperimentConfig or raise ConfigError."""
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{source}: expected a mapping at the top level, got {type(raw).__name__}"
        )
    raw = apply_overrides(raw, overrides or [])
    problems = []
    method = raw.get("method")
    if isinstance(method, dict):
        # Validated on its own first so its errors are reported as method.<key>.
        try:
            method_config_class(method.get("name", "")).model_validate(method)
        except ValidationError as err:
            problems.append(format_errors(err, prefix="method."))
            raw = {**raw, "method": {"name": method["name"]}}
        except KeyError as err:
            raise ConfigError(f"{source} is invalid: method.name: {err.args[0]}") from None
    try:
        cfg = ExperimentConfig.model_validate(raw)
    except ValidationError as err:
        problems.append(format_errors(err))
    except (KeyError, ValueError) as err:
        problems.append(f"  {err.args[0] if err.args else err}")
    if problems:
        raise ConfigError(f"{source} is invalid:\n" + "\n".join(problems))
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a YAML file (``yaml.safe_load``: nothing in a config executes code) and validate it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    return build_config(raw, overrides, source=str(path))
