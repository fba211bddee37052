"""Every dataset loader on tiny files written here in the real on-disk formats; all offline."""

from __future__ import annotations

import gzip
import json
import pickle
import struct
import urllib.request
from collections import Counter
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset, Subset
from torchvision import datasets as tvd
from torchvision.datasets.utils import calculate_md5

from cdfkd import data
from cdfkd.data import (
    DatasetInfo,
    DatasetUnavailableError,
    class_balanced_subset,
    dataset_labels,
    list_datasets,
    load_dataset,
)

# ----------------------------------------------------------------------------- writers


def _write_idx(path: Path, array: np.ndarray) -> None:
    """IDX (SN3) file: magic 0x0000_08_<ndim> (uint8), big-endian dims, then the bytes."""
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(payload)


def _write_mnist(folder: Path, gz: bool, n_train: int = 20, n_test: int = 10) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    suffix = ".gz" if gz else ""
    for split, n in (("train", n_train), ("t10k", n_test)):
        _write_idx(folder / f"{split}-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(folder / f"{split}-labels-idx1-ubyte{suffix}", np.arange(n) % 10)


class _Py2Str(bytes):
    """A Python 2 ``str``: the type of every key and name in CIFAR's pickles."""


class _Py2Pickler(pickle._Pickler):
    """Pickles ``_Py2Str`` as BINSTRING, as Python 2 did: it loads as ``b'data'`` with
    ``encoding='bytes'`` and as ``'data'`` with the ``'latin1'`` torchvision uses."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2str(self, obj):
        self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + bytes(obj))
        self.memoize(obj)

    dispatch[_Py2Str] = _save_py2str


def _pickle_py2(path: Path, obj: dict) -> None:
    def convert(x):
        if isinstance(x, str):
            return _Py2Str(x.encode())
        if isinstance(x, dict):
            return {convert(k): convert(v) for k, v in x.items()}
        if isinstance(x, list):
            return [convert(v) for v in x]
        return x

    with open(path, "wb") as f:
        _Py2Pickler(f, protocol=2).dump(convert(obj))


def _cifar_batch(n: int, label_key: str, num_classes: int, rng) -> dict:
    return {
        "batch_label": "training batch",
        label_key: [i % num_classes for i in range(n)],
        "data": rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8),  # row: R plane, G, B
        "filenames": [f"img_{i}.png" for i in range(n)],
    }


def _write_cifar(root: Path, cls: type, monkeypatch: pytest.MonkeyPatch) -> int:
    """Write ``cls``'s python-pickle files (4 images per train file, 6 in the test file)."""
    rng = np.random.default_rng(0)
    folder = root / cls.base_folder
    folder.mkdir(parents=True)
    if cls is tvd.CIFAR100:
        num_classes, label_key = 100, "fine_labels"
        meta = {
            "fine_label_names": [f"f{i}" for i in range(100)],
            "coarse_label_names": [f"c{i}" for i in range(20)],
        }
    else:
        num_classes, label_key = 10, "labels"
        meta = {
            "num_cases_per_batch": 4,
            "label_names": [f"l{i}" for i in range(10)],
            "num_vis": 3072,
        }
    for name, _ in cls.train_list:
        _pickle_py2(folder / name, _cifar_batch(4, label_key, num_classes, rng))
    for name, _ in cls.test_list:
        _pickle_py2(folder / name, _cifar_batch(6, label_key, num_classes, rng))
    _pickle_py2(folder / cls.meta["filename"], meta)
    with open(folder / cls.test_list[0][0], "rb") as f:  # the format really is Python 2's
        assert b"data" in pickle.load(f, encoding="bytes")

    # Test only: torchvision checks each file's md5 against the real dataset's. Point its
    # lists at our files' md5s so that the real integrity check still runs on them.
    def md5(name):
        return calculate_md5(folder / name)

    monkeypatch.setattr(cls, "train_list", [[n, md5(n)] for n, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[n, md5(n)] for n, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5(cls.meta["filename"])})
    return 4 * len(cls.train_list)


def _write_images(folder: Path, n: int, fmt: str, mode: str = "RGB", first: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    suffix = {"JPEG": "jpg", "PNG": "png"}[fmt]
    for i in range(n):
        color = (i * 40) % 256 if mode == "L" else (i * 40, 80, 160)
        img = Image.new(mode, (40 + i, 30), color=color)
        img.save(folder / f"image_{first + i + 1:04d}.{suffix}", fmt)


@pytest.fixture
def no_system_dirs(monkeypatch, tmp_path):
    monkeypatch.setattr(data.mnist, "SYSTEM_DATA_DIRS", [tmp_path / "no-system"])


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise URLError("network is unreachable (test)")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


# ----------------------------------------------------------------------------- API


def test_registry_lists_every_dataset_and_rejects_unknown_names():
    assert list_datasets() == sorted(
        ["digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "caltech101", "imagefolder"]
    )
    with pytest.raises(KeyError, match="known: caltech101"):
        load_dataset("imagenet")


def test_dataset_info_round_trips_through_json():
    info = DatasetInfo("cifar10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
    assert DatasetInfo.from_dict(json.loads(json.dumps(info.to_dict()))) == info
    with pytest.raises(ValueError, match="unknown"):
        DatasetInfo.from_dict({**info.to_dict(), "extra": 1})
    with pytest.raises(ValueError, match="one per channel"):
        DatasetInfo("x", 10, 3, 32, (0.5,), (0.5,))
    with pytest.raises(AttributeError):
        info.num_classes = 3  # frozen


# ----------------------------------------------------------------------------- digits


def test_digits_shapes_split_and_normalisation():
    train, test, info = load_dataset("digits", augment=False)
    assert (len(train), len(test)) == (1437, 360)
    assert info == DatasetInfo("digits", 10, 1, 32, info.mean, info.std)
    x, y = train[0]
    assert x.shape == (1, 32, 32) and x.dtype == torch.float32 and isinstance(y, int)
    xs = torch.stack([train[i][0] for i in range(len(train))])
    assert abs(xs.mean().item()) < 1e-4 and abs(xs.std().item() - 1) < 1e-4
    # stratified: every class's share of the test split is 20 % of it, to within one sample
    full = Counter(dataset_labels(train)) + Counter(dataset_labels(test))
    for c, n in Counter(dataset_labels(test)).items():
        assert abs(n - 0.2 * full[c]) <= 1
    assert len(full) == 10


def test_digits_split_is_fixed_by_seed():
    a, _, info_a = load_dataset("digits", seed=1, image_size=16, augment=False)
    b, _, info_b = load_dataset("digits", seed=1, image_size=16, augment=False)
    c, _, _ = load_dataset("digits", seed=2, image_size=16, augment=False)
    assert a[0][0].shape == (1, 16, 16) and info_a == info_b
    assert torch.equal(a.images, b.images) and a.targets == b.targets
    assert not torch.equal(a.images, c.images)


# ----------------------------------------------------------------------------- MNIST family


@pytest.mark.parametrize(
    ("name", "folder", "system"),
    [("mnist", "MNIST", "mnist"), ("fashion-mnist", "FashionMNIST", "fashion-mnist")],
)
def test_mnist_family_found_in_system_dir(monkeypatch, tmp_path, no_network, name, folder, system):
    _write_mnist(tmp_path / "share" / system, gz=True)
    monkeypatch.setattr(data.mnist, "SYSTEM_DATA_DIRS", [tmp_path / "empty", tmp_path / "share"])
    train, test, info = load_dataset(name, root=tmp_path / "data", download=False)
    assert (len(train), len(test)) == (20, 10)
    assert info.channels == 1 and info.num_classes == 10 and info.image_size == 32
    x, y = test[3]
    assert x.shape == (1, 32, 32) and y == 3
    assert (tmp_path / "data" / folder / "raw" / "train-images-idx3-ubyte").is_file()


def test_mnist_read_from_root_raw_and_resized(tmp_path, no_system_dirs, no_network):
    _write_mnist(tmp_path / "MNIST" / "raw", gz=False)
    train, test, info = load_dataset("mnist", root=tmp_path, image_size=28, download=True)
    assert (info.mean, info.std) == ((0.1307,), (0.3081,))
    assert train[0][0].shape == (1, 28, 28) and len(train) == 20


def test_mnist_gz_files_in_root_raw_are_unpacked(tmp_path, no_system_dirs):
    _write_mnist(tmp_path / "FashionMNIST" / "raw", gz=True)
    train, _, info = load_dataset("fashion-mnist", root=tmp_path, download=False)
    assert len(train) == 20 and (info.mean, info.std) == ((0.2860,), (0.3530,))


def test_mnist_missing_files_say_what_to_install(tmp_path, no_system_dirs):
    with pytest.raises(DatasetUnavailableError, match="apt-get install dataset-fashion-mnist") as e:
        load_dataset("fashion-mnist", root=tmp_path, download=False)
    assert "FashionMNIST/raw" in str(e.value) and "train-images-idx3-ubyte" in str(e.value)


def test_augment_false_gives_train_the_test_transform(tmp_path, no_system_dirs):
    _write_mnist(tmp_path / "MNIST" / "raw", gz=False)
    train, test, _ = load_dataset("mnist", root=tmp_path, download=False)
    assert "RandomCrop(size=(32, 32), padding=2)" in repr(train.transform)
    assert "Flip" not in repr(train.transform)
    train, _, _ = load_dataset("mnist", root=tmp_path, download=False, augment=False)
    assert repr(train.transform) == repr(test.transform)
    assert torch.equal(train[0][0], train[0][0])


# ----------------------------------------------------------------------------- CIFAR


@pytest.mark.parametrize(
    ("name", "cls", "num_classes"), [("cifar10", tvd.CIFAR10, 10), ("cifar100", tvd.CIFAR100, 100)]
)
def test_cifar_from_pickled_batches(monkeypatch, tmp_path, no_network, name, cls, num_classes):
    n_train = _write_cifar(tmp_path, cls, monkeypatch)
    train, test, info = load_dataset(name, root=tmp_path, download=True)
    assert (len(train), len(test)) == (n_train, 6)
    assert (info.num_classes, info.channels, info.image_size) == (num_classes, 3, 32)
    x, y = test[5]
    assert x.shape == (3, 32, 32) and y == 5
    assert "RandomHorizontalFlip" in repr(train.transform)


def test_cifar_missing_or_corrupt_files_raise_clear_error(tmp_path):
    with pytest.raises(DatasetUnavailableError, match="cifar-10-batches-py/ holding data_batch_1"):
        load_dataset("cifar10", root=tmp_path, download=False)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name in ("train", "test", "meta"):
        (folder / name).write_bytes(b"not the real file")  # md5 mismatch: corrupt
    with pytest.raises(DatasetUnavailableError, match="cifar-100-python"):
        load_dataset("cifar100", root=tmp_path, download=False)


# ----------------------------------------------------------------------------- Caltech-101


def _write_caltech(root: Path) -> Path:
    categories = root / "caltech101" / "101_ObjectCategories"
    _write_images(categories / "BACKGROUND_Google", 2, "JPEG")
    _write_images(categories / "Faces", 5, "JPEG")
    _write_images(categories / "accordion", 5, "JPEG", mode="L")  # Caltech has grey images
    _write_images(categories / "airplanes", 5, "JPEG")
    return categories


def test_caltech101_stratified_split_rgb_and_fixed_by_seed(tmp_path):
    _write_caltech(tmp_path)
    train, test, info = load_dataset("caltech101", root=tmp_path, image_size=24, download=False)
    assert (len(train), len(test)) == (12, 3)
    assert sorted(dataset_labels(test)) == [0, 1, 2]  # BACKGROUND_Google is no class
    assert sorted(train.indices + test.indices) == list(range(15))
    assert info == DatasetInfo("caltech101", 3, 3, 24, (0.5,) * 3, (0.5,) * 3)
    grey = next(i for i, y in enumerate(dataset_labels(test)) if y == 1)
    x, y = test[grey]
    assert x.shape == (3, 24, 24) and y == 1
    again, _, _ = load_dataset("caltech101", root=tmp_path, image_size=24, download=False)
    assert again.indices == train.indices
    assert load_dataset("caltech101", root=tmp_path, download=False)[0][0][0].shape == (3, 128, 128)


def test_caltech101_missing_files_raise_clear_error(tmp_path):
    with pytest.raises(DatasetUnavailableError, match="101_ObjectCategories/<class>/image_0001"):
        load_dataset("caltech101", root=tmp_path, download=False)
    _write_images(tmp_path / "caltech101" / "101_ObjectCategories" / "Faces", 2, "JPEG")
    with pytest.raises(DatasetUnavailableError, match="BACKGROUND_Google"):
        load_dataset("caltech101", root=tmp_path, download=False)


# ----------------------------------------------------------------------------- download failures


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist", "cifar10", "cifar100", "caltech101"])
def test_failed_download_becomes_clear_error(tmp_path, no_system_dirs, no_network, name):
    with pytest.raises(DatasetUnavailableError, match="could not be loaded or downloaded") as e:
        load_dataset(name, root=tmp_path, download=True)
    assert "network is unreachable" in str(e.value)


# ----------------------------------------------------------------------------- imagefolder


def test_imagefolder_tree(tmp_path):
    for split, n in (("train", 3), ("val", 2)):
        for cls in ("cat", "dog"):
            _write_images(tmp_path / split / cls, n, "PNG")
    train, test, info = load_dataset("imagefolder", root=tmp_path, image_size=16)
    assert (len(train), len(test)) == (6, 4)
    assert info == DatasetInfo("imagefolder", 2, 3, 16, data.IMAGENET_MEAN, data.IMAGENET_STD)
    x, y = test[3]
    assert x.shape == (3, 16, 16) and y == 1
    _write_images(tmp_path / "val" / "emu", 1, "PNG")
    with pytest.raises(ValueError, match="class folders differ"):
        load_dataset("imagefolder", root=tmp_path, image_size=16)
    with pytest.raises(DatasetUnavailableError, match="val/<class>/<image>"):
        load_dataset("imagefolder", root=tmp_path / "train")


# ----------------------------------------------------------------------------- few-shot subsets


class _LabelsOnly(Dataset):
    """Labels without images: reading an item would fail, so labels must come from .targets."""

    def __init__(self, targets):
        self.targets = torch.tensor(targets)

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        raise AssertionError("labels must be read without loading items")


def test_class_balanced_subset_exact_counts_and_deterministic():
    ds = _LabelsOnly([i % 4 for i in range(40)] + [0] * 10)
    subset = class_balanced_subset(ds, per_class=3, seed=7)
    assert Counter(dataset_labels(subset)) == {0: 3, 1: 3, 2: 3, 3: 3}
    assert subset.indices == class_balanced_subset(ds, 3, seed=7).indices
    assert subset.indices != class_balanced_subset(ds, 3, seed=8).indices
    with pytest.raises(ValueError, match="fewer than 11"):
        class_balanced_subset(ds, per_class=11)


def test_dataset_labels_walks_down_subsets():
    ds = _LabelsOnly(list(range(10)))
    inner = Subset(ds, [9, 7, 5, 3, 1])
    assert dataset_labels(Subset(inner, [0, 2])) == [9, 5]
    assert Counter(dataset_labels(class_balanced_subset(inner, 1))) == Counter([9, 7, 5, 3, 1])


# ----------------------------------------------------------------------------- the real thing

FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not FASHION.is_dir(), reason="Debian's dataset-fashion-mnist not installed")
def test_real_fashion_mnist_from_debian_package(tmp_path, no_network):
    train, test, info = load_dataset("fashion-mnist", root=tmp_path, download=False)
    assert (len(train), len(test), info.num_classes) == (60000, 10000, 10)
    x, y = test[0]
    assert x.shape == (1, 32, 32) and y == 9  # the first test image is an ankle boot
