"""What every dataset shares: ``DatasetInfo``, the registry, labels and transforms.

A dataset is one loader registered with :func:`register_dataset`, together with
what other layers need to know before its files exist: its input geometry
(channels, default image size, classes) and the recipe its teachers are trained
with. The sweep's validation, ``cdfkd teachers train`` and the loaders all read
this one record.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from urllib.error import URLError

import numpy as np
from torch.utils.data import ConcatDataset, Dataset, Subset
from torchvision import transforms as T

from cdfkd.errors import DatasetUnavailableError
from cdfkd.registry import Registry

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DatasetInfo:
    """What a model, generator and normaliser need to know about a dataset.

    ``mean``/``std`` have one entry per channel and are the constants the
    dataset's tensors were normalised with; it round-trips through JSON with
    ``to_dict``/``from_dict``.
    """

    name: str
    num_classes: int
    channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"mean and std need {self.channels} entries (one per channel)")
        if self.num_classes < 1 or self.image_size < 1 or min(self.std) <= 0:
            raise ValueError(f"invalid DatasetInfo: {self}")

    def to_dict(self) -> dict:
        d = asdict(self)
        return {**d, "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict) -> DatasetInfo:
        names = {f.name for f in fields(cls)}
        if set(d) != names:
            raise ValueError(
                f"DatasetInfo keys must be {sorted(names)}; "
                f"unknown: {sorted(set(d) - names)}, missing: {sorted(names - set(d))}"
            )
        return cls(**d)


@dataclass(frozen=True)
class TeacherRecipe:
    """How a dataset's teachers are trained by default: epochs, batch size, peak learning rate."""

    epochs: int
    batch_size: int
    lr: float


DEFAULT_RECIPE = TeacherRecipe(epochs=50, batch_size=128, lr=0.05)

#: ``loader(root: Path, image_size, seed, download, augment) -> (train, test, DatasetInfo)``
Loader = Callable[..., tuple[Dataset, Dataset, DatasetInfo]]


@dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset: its loader and what is known before any file is read."""

    name: str
    loader: Loader
    channels: int
    image_size: int  # the default side of the square tensors
    num_classes: int | None  # None: found in the files (image folders)
    recipe: TeacherRecipe = DEFAULT_RECIPE


DATASETS: Registry = Registry("dataset")


def register_dataset(
    name: str,
    *,
    channels: int,
    image_size: int,
    num_classes: int | None,
    recipe: TeacherRecipe = DEFAULT_RECIPE,
) -> Callable[[Loader], Loader]:
    """Register ``loader`` as dataset ``name`` with its geometry and teacher recipe."""

    def decorator(loader: Loader) -> Loader:
        DATASETS.register(name)(
            DatasetSpec(name, loader, channels, image_size, num_classes, recipe)
        )
        return loader

    return decorator


def dataset_spec(name: str) -> DatasetSpec:
    """The registered record of ``name``; unknown names raise ``KeyError`` listing the known."""
    return DATASETS.get(name)


def list_datasets() -> list[str]:
    return DATASETS.names()


def load_dataset(
    name: str,
    root: str | Path = "data",
    image_size: int | None = None,
    seed: int = 0,
    download: bool = True,
    augment: bool = True,
) -> tuple[Dataset, Dataset, DatasetInfo]:
    """Build the train and test datasets named ``name``.

    ``root`` holds every dataset in torchvision's layout; for ``imagefolder`` it is
    the folder holding ``train/`` and ``val/``. ``image_size`` (None: the dataset's
    default) is the side of the square tensors returned. ``seed`` fixes the splits
    made here (``digits``, ``caltech101``). ``augment=False`` gives the train split
    the test transform (for evaluation, KD with real data, few-shot sampling).
    """
    if image_size is not None and image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    spec = dataset_spec(name)
    return spec.loader(Path(root).expanduser(), image_size, seed, download, augment)


# ----------------------------------------------------------------------------- labels


def dataset_labels(ds: Dataset) -> list[int]:
    """Every sample's label, read from ``.targets``/``.y`` (Subsets walk down) without
    loading images; datasets with neither are indexed as a last resort."""
    if isinstance(ds, Subset):
        base = dataset_labels(ds.dataset)
        return [base[int(i)] for i in ds.indices]
    if isinstance(ds, ConcatDataset):
        return [y for part in ds.datasets for y in dataset_labels(part)]
    for attr in ("targets", "y"):
        labels = getattr(ds, attr, None)
        if labels is not None:
            labels = labels.tolist() if hasattr(labels, "tolist") else labels
            return [int(y) for y in labels]
    return [int(ds[i][1]) for i in range(len(ds))]  # type: ignore[arg-type]  # map-style datasets are sized


def class_balanced_subset(dataset: Dataset, per_class: int, seed: int = 0) -> Subset:
    """``per_class`` samples drawn at random from each class present (few-shot sets).

    Deterministic in ``seed``; indices are returned sorted. A class with fewer than
    ``per_class`` samples is an error.
    """
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    labels = np.asarray(dataset_labels(dataset))
    rng = np.random.default_rng(seed)
    chosen = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if len(members) < per_class:
            raise ValueError(f"class {c} has {len(members)} samples, fewer than {per_class}")
        chosen.append(rng.choice(members, size=per_class, replace=False))
    return Subset(dataset, sorted(np.concatenate(chosen).tolist()))


def validation_split(dataset: Dataset, count: int, seed: int = 0) -> tuple[Subset, Subset]:
    """(rest, validation): ``count`` samples of ``dataset`` drawn at random as a validation
    split and the others. Deterministic in ``seed`` (one permutation, so the same ``count``
    and seed give the same split whatever transform the dataset applies); indices sorted.
    """
    n = len(dataset)  # type: ignore[arg-type]  # map-style datasets are sized
    if not 0 < count < n:
        raise ValueError(
            f"a validation split of {count} images needs 0 < count < {n} (the training split's size)"
        )
    order = np.random.default_rng(seed).permutation(n)
    return Subset(dataset, sorted(order[count:].tolist())), Subset(
        dataset, sorted(order[:count].tolist())
    )


# ----------------------------------------------------------------------------- transforms


def to_rgb(img):
    # A module-level function rather than a lambda: DataLoader workers pickle transforms.
    return img.convert("RGB")


def padded_transform(
    size: int, native: int, pad: int, flip: bool, train: bool, mean, std
) -> T.Compose:
    """Small images (MNIST family, CIFAR): resize if needed, pad-and-crop when training."""
    steps: list = [] if size == native else [T.Resize((size, size))]
    if train:
        steps.append(T.RandomCrop(size, padding=max(1, round(pad * size / 32))))
        if flip:
            steps.append(T.RandomHorizontalFlip())
    return T.Compose([*steps, T.ToTensor(), T.Normalize(mean, std)])


def natural_transform(size: int, resize: int, train: bool, mean, std) -> T.Compose:
    """Photos of any shape (Caltech, ImageFolder): shorter side to ``resize``, square crop."""
    crop = [T.RandomCrop(size), T.RandomHorizontalFlip()] if train else [T.CenterCrop(size)]
    steps = [T.Lambda(to_rgb), T.Resize(resize), *crop]
    return T.Compose([*steps, T.ToTensor(), T.Normalize(mean, std)])


@contextmanager
def unavailable(name: str, hint: str) -> Iterator[None]:
    """Turn torchvision's download and integrity failures into one clear error."""
    try:
        yield
    except (URLError, OSError, RuntimeError) as e:
        if isinstance(e, DatasetUnavailableError):
            raise
        raise DatasetUnavailableError(
            f"{name} could not be loaded or downloaded ({type(e).__name__}: {e}). {hint}"
        ) from e
