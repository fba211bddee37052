"""CIFAR-10 and CIFAR-100 from torchvision's python pickles (unpacked into the root, or downloaded)."""

from __future__ import annotations

from functools import partial

from torchvision import datasets as tvd

from cdfkd.data.base import (
    DatasetInfo,
    TeacherRecipe,
    padded_transform,
    register_dataset,
    unavailable,
)
from cdfkd.errors import DatasetUnavailableError


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
    test_tf = padded_transform(size, 32, 4, True, False, mean, std)
    train_tf = padded_transform(size, 32, 4, True, augment, mean, std)
    with unavailable(name, hint):
        train = cls(root, train=True, transform=train_tf, download=not present)
        test = cls(root, train=False, transform=test_tf)
    return train, test, info


_CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
_CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
_CIFAR_RECIPE = TeacherRecipe(epochs=200, batch_size=128, lr=0.1)
register_dataset("cifar10", channels=3, image_size=32, num_classes=10, recipe=_CIFAR_RECIPE)(
    partial(_load_cifar, "cifar10", tvd.CIFAR10, 10, *_CIFAR10_STATS)
)
register_dataset("cifar100", channels=3, image_size=32, num_classes=100, recipe=_CIFAR_RECIPE)(
    partial(_load_cifar, "cifar100", tvd.CIFAR100, 100, *_CIFAR100_STATS)
)
