"""Datasets by name: ``load_dataset(name) -> (train, test, DatasetInfo)``.

Every dataset but ``digits`` (scikit-learn's bundled 8x8 digits, always offline)
goes through torchvision's dataset classes. Items are ``(image, label)`` with
``image`` a normalised float tensor (C, S, S) and ``label`` an int.

Files are looked for before anything is downloaded. MNIST and Fashion-MNIST are
taken from ``<root>/<MNIST|FashionMNIST>/raw/``, then from the system folders of
Debian's dataset packages (``SYSTEM_DATA_DIRS``; ``dataset-fashion-mnist``
installs ``/usr/share/datasets/fashion-mnist/*.gz``), and only then downloaded.
Whatever cannot be found or fetched raises ``DatasetUnavailableError`` saying
which files to put where.
"""

from __future__ import annotations

import gzip
import logging
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path
from urllib.error import URLError

import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import ConcatDataset, Dataset, Subset
from torchvision import datasets as tvd
from torchvision import transforms as T

from cdfkd.registry import Registry

log = logging.getLogger(__name__)

DATASETS: Registry = Registry("dataset")

# Parent folders of Debian's dataset packages (one sub-folder per dataset).
# A module-level list so that tests and unusual installs can point elsewhere.
SYSTEM_DATA_DIRS: list[Path] = [Path("/usr/share/datasets")]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DatasetUnavailableError(RuntimeError):
    """A dataset's files are missing or corrupt here and could not be downloaded."""


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
    loader = DATASETS.get(name)
    return loader(Path(root).expanduser(), image_size, seed, download, augment)


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
    return [int(ds[i][1]) for i in range(len(ds))]


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


# ----------------------------------------------------------------------------- transforms


def _to_rgb(img):
    # A module-level function rather than a lambda: DataLoader workers pickle transforms.
    return img.convert("RGB")


def _padded_transform(
    size: int, native: int, pad: int, flip: bool, train: bool, mean, std
) -> T.Compose:
    """Small images (MNIST family, CIFAR): resize if needed, pad-and-crop when training."""
    steps: list = [] if size == native else [T.Resize((size, size))]
    if train:
        steps.append(T.RandomCrop(size, padding=max(1, round(pad * size / 32))))
        if flip:
            steps.append(T.RandomHorizontalFlip())
    return T.Compose([*steps, T.ToTensor(), T.Normalize(mean, std)])


def _natural_transform(size: int, resize: int, train: bool, mean, std) -> T.Compose:
    """Photos of any shape (Caltech, ImageFolder): shorter side to ``resize``, square crop."""
    crop = [T.RandomCrop(size), T.RandomHorizontalFlip()] if train else [T.CenterCrop(size)]
    steps = [T.Lambda(_to_rgb), T.Resize(resize), *crop]
    return T.Compose([*steps, T.ToTensor(), T.Normalize(mean, std)])


@contextmanager
def _unavailable(name: str, hint: str) -> Iterator[None]:
    """Turn torchvision's download and integrity failures into one clear error."""
    try:
        yield
    except (URLError, OSError, RuntimeError) as e:
        if isinstance(e, DatasetUnavailableError):
            raise
        raise DatasetUnavailableError(
            f"{name} could not be loaded or downloaded ({type(e).__name__}: {e}). {hint}"
        ) from e


# ----------------------------------------------------------------------------- digits


class _TensorImages(Dataset):
    """In-memory images (N, C, H, W) in [0, 1] with int ``targets``."""

    def __init__(self, images: torch.Tensor, targets: list[int], transform: Callable) -> None:
        self.images = images
        self.targets = targets
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[i]), self.targets[i]


@DATASETS.register("digits")
def _load_digits(root, image_size, seed, download, augment):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    size = image_size or 32
    bunch = load_digits()
    images = torch.from_numpy(bunch.images).float().div_(16.0).unsqueeze(1)  # (N, 1, 8, 8)
    if size != 8:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    targets = bunch.target
    train_idx, test_idx = train_test_split(
        np.arange(len(targets)), test_size=0.2, stratify=targets, random_state=seed
    )
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    # Normalise with the train split's own statistics, after resizing.
    mean, std = images[train_idx].mean().item(), images[train_idx].std().item()
    info = DatasetInfo("digits", 10, 1, size, (mean,), (std,))
    test_tf = T.Normalize(info.mean, info.std)
    train_tf = T.Compose([T.RandomCrop(size, padding=max(1, size // 16)), test_tf])

    def split(idx, tf):
        return _TensorImages(images[idx].clone(), targets[idx].tolist(), tf)

    return split(train_idx, train_tf if augment else test_tf), split(test_idx, test_tf), info


# ----------------------------------------------------------------------------- MNIST family

_IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


@dataclass(frozen=True)
class _MnistSpec:
    name: str
    cls: type
    system_dir: str  # sub-folder of a SYSTEM_DATA_DIRS entry
    apt_package: str | None
    mean: float
    std: float


def _idx_file(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _copy_uncompressed(src: Path, dst: Path) -> None:
    # Write to a temporary name and rename: parallel trials may share a data root.
    opener = gzip.open if src.suffix == ".gz" else open
    with opener(src, "rb") as fin, tempfile.NamedTemporaryFile(dir=dst.parent, delete=False) as f:
        shutil.copyfileobj(fin, f)
    Path(f.name).replace(dst)


def _stage_idx_files(raw: Path, system_dir: str) -> bool:
    """Make ``raw`` hold the four uncompressed IDX files, taken from ``raw`` itself or the
    first system folder that has all four (plain or ``.gz``). False when none has them."""
    for folder in [raw, *(Path(d) / system_dir for d in SYSTEM_DATA_DIRS)]:
        found = {name: _idx_file(folder, name) for name in _IDX_FILES}
        if not all(found.values()):
            continue
        raw.mkdir(parents=True, exist_ok=True)
        for name, src in found.items():
            if src != raw / name:
                _copy_uncompressed(src, raw / name)
        if folder != raw:
            log.info("copied %s IDX files from %s to %s", system_dir, folder, raw)
        return True
    return False


def _load_mnist_family(spec: _MnistSpec, root, image_size, seed, download, augment):
    size = image_size or 32
    raw = root / spec.cls.__name__ / "raw"
    system = [str(Path(d) / spec.system_dir) for d in SYSTEM_DATA_DIRS]
    hint = (
        f"Put {', '.join(_IDX_FILES)} (plain or .gz) in {raw}/"
        + (f", or install `apt-get install {spec.apt_package}`" if spec.apt_package else "")
        + f" (searched {', '.join(system) or 'no system folder'}), or allow download=True "
        "with network access."
    )
    staged = _stage_idx_files(raw, spec.system_dir)
    if not staged and not download:
        raise DatasetUnavailableError(f"{spec.name} not found. {hint}")
    info = DatasetInfo(spec.name, 10, 1, size, (spec.mean,), (spec.std,))
    test_tf = _padded_transform(size, 28, 2, False, False, info.mean, info.std)
    train_tf = _padded_transform(size, 28, 2, False, augment, info.mean, info.std)
    with _unavailable(spec.name, hint):
        train = spec.cls(root, train=True, transform=train_tf, download=not staged)
        test = spec.cls(root, train=False, transform=test_tf)
    return train, test, info


for _spec in (
    _MnistSpec("mnist", tvd.MNIST, "mnist", None, 0.1307, 0.3081),
    _MnistSpec(
        "fashion-mnist", tvd.FashionMNIST, "fashion-mnist", "dataset-fashion-mnist", 0.2860, 0.3530
    ),
):
    DATASETS.register(_spec.name)(partial(_load_mnist_family, _spec))


# ----------------------------------------------------------------------------- CIFAR


def _load_cifar(name, cls, num_classes, mean, std, root, image_size, seed, download, augment):
    size = image_size or 32
    folder = root / cls.base_folder
    files = [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    present = all((folder / f).is_file() for f in files)
    hint = (
        f"Expected {folder}/ holding {', '.join(files)} (torchvision's {cls.filename} "
        f"unpacked into {root}/), or download=True with network access."
    )
    if not present and not download:
        raise DatasetUnavailableError(f"{name} not found. {hint}")
    info = DatasetInfo(name, num_classes, 3, size, mean, std)
    test_tf = _padded_transform(size, 32, 4, True, False, mean, std)
    train_tf = _padded_transform(size, 32, 4, True, augment, mean, std)
    with _unavailable(name, hint):
        train = cls(root, train=True, transform=train_tf, download=not present)
        test = cls(root, train=False, transform=test_tf)
    return train, test, info


_CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
_CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
DATASETS.register("cifar10")(partial(_load_cifar, "cifar10", tvd.CIFAR10, 10, *_CIFAR10_STATS))
DATASETS.register("cifar100")(partial(_load_cifar, "cifar100", tvd.CIFAR100, 100, *_CIFAR100_STATS))


# ----------------------------------------------------------------------------- photos


@DATASETS.register("caltech101")
def _load_caltech101(root, image_size, seed, download, augment):
    from sklearn.model_selection import train_test_split

    size = image_size or 128
    categories = root / "caltech101" / "101_ObjectCategories"
    hint = (
        f"Expected {categories}/<class>/image_0001.jpg, ... and its BACKGROUND_Google/ "
        "(torchvision needs it, then leaves it out), as caltech-101.zip's "
        f"101_ObjectCategories.tar.gz unpacks into {categories.parent}/; or download=True "
        "with network access."
    )
    present = categories.is_dir()
    incomplete = present and not (categories / "BACKGROUND_Google").is_dir()
    if incomplete or (not present and not download):
        raise DatasetUnavailableError(f"caltech101 not found or incomplete. {hint}")
    mean = std = (0.5, 0.5, 0.5)
    tf = partial(_natural_transform, size, size, mean=mean, std=std)
    with _unavailable("caltech101", hint):
        train_base = tvd.Caltech101(root, "category", transform=tf(augment), download=not present)
        test_base = tvd.Caltech101(root, "category", transform=tf(False))
    # torchvision gives no split: a fixed stratified 80/20 one, by seed.
    idx = np.arange(len(train_base.y))
    train_idx, test_idx = train_test_split(
        idx, test_size=0.2, stratify=train_base.y, random_state=seed
    )
    info = DatasetInfo("caltech101", len(train_base.categories), 3, size, mean, std)
    train = Subset(train_base, np.sort(train_idx).tolist())
    return train, Subset(test_base, np.sort(test_idx).tolist()), info


@DATASETS.register("imagefolder")
def _load_imagefolder(root, image_size, seed, download, augment):
    size = image_size or 224
    hint = (
        f"imagefolder expects {root}/train/<class>/<image> and {root}/val/<class>/<image> "
        "with the same class folders in both (mini-ImageNet or your own data); it never downloads."
    )
    if not (root / "train").is_dir() or not (root / "val").is_dir():
        raise DatasetUnavailableError(f"imagefolder not found. {hint}")
    resize = round(size * 256 / 224)  # 256 -> 224 crop, as for ImageNet
    tf = partial(_natural_transform, size, resize, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    with _unavailable("imagefolder", hint):
        train = tvd.ImageFolder(root / "train", transform=tf(augment))
        test = tvd.ImageFolder(root / "val", transform=tf(False))
    if train.classes != test.classes:
        raise ValueError(f"train/ and val/ class folders differ. {hint}")
    info = DatasetInfo("imagefolder", len(train.classes), 3, size, IMAGENET_MEAN, IMAGENET_STD)
    return train, test, info
