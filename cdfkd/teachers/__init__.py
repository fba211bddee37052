"""Teacher ensembles: train, save, verify and load them; run them as one module.

``load_ensemble(dir, device, expect_arch=..., expect_num_classes=...)`` is the one
way later stages get teachers. ``save_ensemble(models, dir, info, archs)`` writes
an ensemble directory for models trained anywhere (and for tests).
``ensemble_to_numpy``/``ensemble_from_numpy`` ship an ensemble through Ray's
object store. ``train_ensemble`` is what ``cdfkd teachers train`` runs,
``import_ensemble`` what ``cdfkd teachers import`` runs (weights trained elsewhere).
"""

from cdfkd.teachers.ensemble import AUTO_FUSED, MODES, TeacherEnsemble
from cdfkd.teachers.importer import import_ensemble
from cdfkd.teachers.manifest import (
    MANIFEST,
    EnsembleError,
    EnsembleIntegrityError,
    EnsembleMismatchError,
    Manifest,
    UnsafeCheckpointError,
    ensemble_id,
    ensemble_id_of_dir,
    read_manifest,
)
from cdfkd.teachers.store import (
    FileCheck,
    changed_teachers,
    load_ensemble,
    load_state_file,
    save_ensemble,
    sha256_file,
    verify_ensemble,
)
from cdfkd.teachers.train import (
    EvalReport,
    TeacherTrainConfig,
    TrainProgress,
    check_ensemble_dir,
    evaluate_ensemble,
    train_ensemble,
    train_teacher,
)
from cdfkd.teachers.transport import ensemble_from_numpy, ensemble_to_numpy

__all__ = [
    "AUTO_FUSED",
    "MANIFEST",
    "MODES",
    "EnsembleError",
    "EnsembleIntegrityError",
    "EnsembleMismatchError",
    "EvalReport",
    "FileCheck",
    "Manifest",
    "TeacherEnsemble",
    "TeacherTrainConfig",
    "TrainProgress",
    "UnsafeCheckpointError",
    "changed_teachers",
    "check_ensemble_dir",
    "ensemble_from_numpy",
    "ensemble_id",
    "ensemble_id_of_dir",
    "ensemble_to_numpy",
    "evaluate_ensemble",
    "import_ensemble",
    "load_ensemble",
    "load_state_file",
    "read_manifest",
    "save_ensemble",
    "sha256_file",
    "train_ensemble",
    "train_teacher",
    "verify_ensemble",
]
