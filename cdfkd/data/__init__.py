"""Datasets by name: ``load_dataset(name) -> (train, test, DatasetInfo)``.

One file per family registers its loaders with their geometry and teacher recipe
(:func:`register_dataset`): ``digits`` (scikit-learn's bundled 8x8 digits, always
offline), ``mnist``/``fashion-mnist``, ``cifar10``/``cifar100``, ``caltech101`` and
``imagefolder``. Items are ``(image, label)`` with ``image`` a normalised float tensor
(C, S, S) and ``label`` an int. Whatever cannot be found or fetched raises
``DatasetUnavailableError`` saying which files to put where.
"""

from __future__ import annotations

# Importing a family file registers its datasets.
from cdfkd.data import cifar, digits, mnist, photos  # noqa: F401
from cdfkd.data.base import (
    DATASETS,
    DEFAULT_RECIPE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    DatasetInfo,
    DatasetSpec,
    TeacherRecipe,
    class_balanced_subset,
    dataset_labels,
    dataset_spec,
    list_datasets,
    load_dataset,
    register_dataset,
    validation_split,
)
from cdfkd.data.mnist import SYSTEM_DATA_DIRS
from cdfkd.errors import DatasetUnavailableError

__all__ = [
    "DATASETS",
    "DEFAULT_RECIPE",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SYSTEM_DATA_DIRS",
    "DatasetInfo",
    "DatasetSpec",
    "DatasetUnavailableError",
    "TeacherRecipe",
    "class_balanced_subset",
    "dataset_labels",
    "dataset_spec",
    "list_datasets",
    "load_dataset",
    "register_dataset",
    "validation_split",
]
