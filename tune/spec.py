"""The sweep spec: a base distill config plus a search space, validated before Ray starts.

Example (tune/quickstart.yaml is a complete one)::

    name: digits-cgdd
    base: configs/digits/cgdd.yaml           # relative to this file
    teachers_train: {dataset: digits, arch: lenet5, count: 3}   # train when missing
    search:
      method.alpha: {type: float, low: 0.1, high: 10, log: true, when: {method.name: cgdd}}
      student.family: {type: categorical, choices: [mfs, branch]}
      student.fuse_from: {type: int, low: 0, high: 2, when: {student.family: mfs}}
    objective: {metric: relative_accuracy, mode: max}   # selection_score: choose without labels
    validation_set: {per_class: 50, iterations: 200}   # how it is built when missing
    num_samples: 8
    max_concurrent_trials: 2
    resources: {cpu: 1, gpu: 0}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import Field, ValidationError, model_validator

from cdfkd.config import apply_values, build_config
from cdfkd.data import dataset_spec
from cdfkd.errors import ConfigError
from cdfkd.schema import Strict, format_errors
from cdfkd.selection import ValidationSetConfig

#: ``selection_score`` needs no labelled data (the synthetic validation set);
#: ``validation_accuracy`` is measured on training images held out by
#: ``data.validation_images``, the other accuracies on the labelled test set
ObjectiveMetric = Literal[
    "relative_accuracy", "student_accuracy", "validation_accuracy", "proxy", "selection_score"
]
OBJECTIVE_METRICS: tuple[str, ...] = get_args(ObjectiveMetric)
SECOND_METRICS = ("student_params", "student_macs")


class Param(Strict):
    """One searched config field, addressed by its dotted key."""

    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list[Any] | None = None
    when: dict[str, Any] = Field(
        default_factory=dict, description="only sampled when these keys have these values"
    )

    @model_validator(mode="after")
    def _check(self) -> Param:
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("a categorical parameter needs a non-empty 'choices' list")
            for c in self.choices:
                if not isinstance(c, (str, int, float, bool)) and c is not None:
                    raise ValueError(f"categorical choices must be scalars (got {c!r})")
        else:
            if self.low is None or self.high is None:
                raise ValueError(f"a {self.type} parameter needs 'low' and 'high'")
            if self.low >= self.high:
                raise ValueError(f"low ({self.low}) must be below high ({self.high})")
            if self.log and self.low <= 0:
                raise ValueError("log=true needs low > 0")
        return self


class Objective(Strict):
    metric: ObjectiveMetric = "relative_accuracy"
    mode: Literal["max", "min"] = "max"
    second_metric: Literal["student_params", "student_macs"] | None = None
    second_mode: Literal["max", "min"] = "min"

    @property
    def multi(self) -> bool:
        return self.second_metric is not None


class Resources(Strict):
    cpu: float = Field(1.0, gt=0)
    gpu: float = Field(0.0, ge=0)
    custom: dict[str, float] = Field(default_factory=dict)


class Scheduler(Strict):
    type: Literal["none", "asha"] = "none"
    grace_period: int = Field(1, ge=1, description="evaluations before ASHA may stop a trial")
    reduction_factor: float = Field(2.0, gt=1)


class TeachersTrain(Strict):
    """How to train the base config's teacher ensemble when its folder is missing."""

    dataset: str = "digits"
    arch: str = "lenet5"
    count: int = Field(3, ge=1, le=16)
    epochs: int | None = Field(None, ge=1)
    seed: int = 0


class MLflowSpec(Strict):
    """Where the sweep logs: a parent run per sweep, a nested child run per trial."""

    enabled: bool = True
    tracking_uri: str | None = Field(
        None, description="None: $MLFLOW_TRACKING_URI or ./mlflow.db (made absolute)"
    )
    experiment: str | None = Field(None, description="None: the sweep's name")
    register_name: str | None = Field(
        None, description="registered model of the best student; None: <name>-best"
    )
    log_trial_models: bool = Field(
        False,
        description="log every trial's student as an MLflow model (a pt2 export, seconds per "
        "trial); by default only the students that get registered are exported",
    )


class SweepSpec(Strict):
    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$")
    base: str | None = Field(
        None, description="path of a `cdfkd distill` config, relative to the spec"
    )
    base_config: dict | None = Field(None, description="the distill config inline")
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="dotted keys fixed for every trial"
    )
    teachers_train: TeachersTrain | None = None
    search: dict[str, Param] = Field(default_factory=dict)
    points_to_evaluate: list[dict[str, Any]] = Field(
        default_factory=list,
        description="configurations tried first (partial ones are completed by the sampler)",
    )
    objective: Objective = Objective()
    validation_set: ValidationSetConfig = Field(
        default_factory=ValidationSetConfig,
        description="how the teachers' synthetic validation set (selection_score) is built "
        "when their folder has none; an existing one is reused as it is",
    )
    num_samples: int = Field(8, ge=1)
    max_concurrent_trials: int = Field(2, ge=1)
    resources: Resources = Resources()
    scheduler: Scheduler = Scheduler()
    seed: int = 0
    storage_path: str = Field(
        "runs/sweeps",
        description="experiment folders go to storage_path/name; a local path, on a "
        "filesystem every node mounts at the same place when the sweep spans nodes",
    )
    max_failures: int = Field(2, ge=0)
    mlflow: MLflowSpec = MLflowSpec()

    @model_validator(mode="after")
    def _one_base(self) -> SweepSpec:
        if (self.base is None) == (self.base_config is None):
            raise ValueError("give exactly one of 'base' (a config file) or 'base_config' (inline)")
        if self.objective.multi and self.scheduler.type == "asha":
            raise ValueError(
                "ASHA needs one objective: drop objective.second_metric or use scheduler.type: none"
            )
        if "://" in self.storage_path:
            # Trials write their run folders (checkpoints, student, MLflow outbox) here
            # directly, so that `cdfkd mlflow sync` and the registry step find them.
            raise ValueError(
                f"storage_path {self.storage_path!r} is a URI: give a local path, a shared "
                "filesystem (NFS, EFS, a mounted bucket) on a multi-node cluster"
            )
        return self


def _resolve(path: str, root: Path) -> str:
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else (root / p).resolve())


def load_spec(path: str | Path) -> tuple[SweepSpec, dict]:
    """Read and validate a sweep spec; returns it and the resolved base config dict.

    ``base`` is relative to the spec's folder; the teachers folder, the data
    root and ``storage_path`` are relative to the working directory, as in
    ``cdfkd distill``. All are made absolute here, because trials run in
    temporary working directories.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep spec {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
        spec = SweepSpec.model_validate(raw)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    except ValidationError as err:
        raise ConfigError(f"sweep spec {path} is invalid:\n{format_errors(err)}") from None
    root = path.resolve().parent
    if spec.base is not None:
        base_path = Path(_resolve(spec.base, root))
        if not base_path.is_file():
            raise ConfigError(f"sweep spec {path}: base config {base_path} does not exist")
        base = yaml.safe_load(base_path.read_text()) or {}
    else:
        base = dict(spec.base_config or {})
    base = apply_values(base, spec.overrides)
    cwd = Path.cwd()
    if "teachers" in base and "path" in base["teachers"]:
        base["teachers"]["path"] = _resolve(base["teachers"]["path"], cwd)
    data = base.setdefault("data", {})
    data["root"] = _resolve(data.get("root", "data"), cwd)
    spec.storage_path = _resolve(spec.storage_path, cwd)
    if spec.objective.metric == "validation_accuracy" and not data.get("validation_images"):
        raise ConfigError(
            f"sweep spec {path}: objective validation_accuracy needs held-out training images; "
            "set data.validation_images (e.g. 10000) in the base config or the overrides"
        )
    validate_space(spec, base)
    return spec, base


def _conditions_met(when: dict, sample: dict, base: dict) -> bool:
    for key, want in when.items():
        have = sample.get(key, _dotted(base, key))
        if have != want:
            return False
    return True


def _dotted(d: dict, key: str):
    node: Any = d
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def sampling_order(search: dict[str, Param]) -> list[str]:
    """Searched keys ordered so every key comes after the keys its ``when`` names."""
    order: list[str] = []
    pending = dict(search)
    while pending:
        ready = [
            k for k, p in pending.items() if all(c in order or c not in search for c in p.when)
        ]
        if not ready:
            raise ConfigError(f"search conditions form a cycle among {sorted(pending)}")
        for k in ready:
            order.append(k)
            del pending[k]
    return order


def corner_samples(spec: SweepSpec, base: dict) -> list[dict]:
    """Samples that touch every categorical choice and both ends of each range.

    They are not searched; validating each one before Ray starts catches an
    impossible combination (an unknown key, a header structure the backbone
    cannot build) in seconds rather than in a failed trial.
    """
    samples: list[dict] = []
    order = sampling_order(spec.search)
    for pick in ("low", "high"):
        sample: dict = {}
        for key in order:
            p = spec.search[key]
            if not _conditions_met(p.when, sample, base):
                continue
            if p.choices is not None:  # categorical (the validator requires choices)
                sample[key] = p.choices[0] if pick == "low" else p.choices[-1]
            else:
                v = float(p.low if pick == "low" else p.high)  # type: ignore[arg-type]
                sample[key] = int(v) if p.type == "int" else v
        samples.append(sample)
    for key, p in spec.search.items():
        for choice in p.choices or []:
            samples.append({**samples[0], key: choice})
    return samples


def validate_space(spec: SweepSpec, base: dict) -> None:
    """Refuse search spaces that name unknown keys or produce invalid configs."""
    for point in spec.points_to_evaluate:
        unknown = set(point) - set(spec.search)
        if unknown:
            raise ConfigError(
                f"points_to_evaluate names keys that are not searched: {sorted(unknown)}"
            )
    for key, p in spec.search.items():
        for cond in p.when:
            if cond not in spec.search and _dotted(base, cond) is None:
                raise ConfigError(
                    f"search.{key}.when names {cond!r}, which is neither searched nor in the base config"
                )
    for sample in corner_samples(spec, base):
        sample = {
            k: v for k, v in sample.items() if _conditions_met(spec.search[k].when, sample, base)
        }
        try:
            cfg = build_config(apply_values(base, sample), source=f"sweep {spec.name} trial config")
        except ConfigError as err:
            raise ConfigError(
                f"search space can produce an invalid config ({sample}):\n{err}"
            ) from None
        _check_structure(cfg, sample, _geometry(spec, cfg))


def _geometry(spec: SweepSpec, cfg) -> tuple[int, int, int | None]:
    """(channels, image size, number of teachers) the trials will see."""
    manifest = Path(cfg.teachers.path) / "ensemble.json"
    if manifest.is_file():
        import json

        m = json.loads(manifest.read_text())
        return m["input"]["channels"], m["input"]["image_size"], len(m["teachers"])
    d = dataset_spec(cfg.data.name)  # the geometry registered with the dataset's loader
    count = spec.teachers_train.count if spec.teachers_train else None
    return d.channels, cfg.data.image_size or d.image_size, count


def _check_structure(cfg, sample: dict, geometry: tuple[int, int, int | None]) -> None:

    channels, size, teachers = geometry
    s = cfg.student
    if teachers is not None and s.headers not in (1, teachers):
        raise ConfigError(
            f"search space can produce student.headers={s.headers} ({sample}); with {teachers} teachers "
            f"a student has 1 header or {teachers} (one per teacher)"
        )
    try:
        # Building the student (2 classes is enough) runs the same checks a trial would.
        s.build(2, channels, size)
    except (ValueError, KeyError) as err:
        raise ConfigError(
            f"search space can produce an impossible student ({sample}): {err}"
        ) from None
