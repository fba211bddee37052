"""Photos of any shape: Caltech-101 (a fixed stratified split by seed) and an ImageFolder tree."""

from __future__ import annotations

from functools import partial

import numpy as np
from torch.utils.data import Subset
from torchvision import datasets as tvd

from cdfkd.data.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DatasetInfo,
    TeacherRecipe,
    natural_transform,
    register_dataset,
    unavailable,
)
from cdfkd.errors import DatasetUnavailableError


@register_dataset(
    "caltech101",
    channels=3,
    image_size=128,
    num_classes=101,
    recipe=TeacherRecipe(epochs=200, batch_size=64, lr=0.05),
)
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
    tf = partial(natural_transform, size, size, mean=mean, std=std)
    with unavailable("caltech101", hint):
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


@register_dataset(
    "imagefolder",
    channels=3,
    image_size=224,
    num_classes=None,
    recipe=TeacherRecipe(epochs=100, batch_size=64, lr=0.1),
)
def _load_imagefolder(root, image_size, seed, download, augment):
    size = image_size or 224
    hint = (
        f"imagefolder expects {root}/train/<class>/<image> and {root}/val/<class>/<image> "
        "with the same class folders in both (mini-ImageNet or your own data); it never downloads."
    )
    if not (root / "train").is_dir() or not (root / "val").is_dir():
        raise DatasetUnavailableError(f"imagefolder not found. {hint}")
    resize = round(size * 256 / 224)  # 256 -> 224 crop, as for ImageNet
    tf = partial(natural_transform, size, resize, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    with unavailable("imagefolder", hint):
        train = tvd.ImageFolder(root / "train", transform=tf(augment))
        test = tvd.ImageFolder(root / "val", transform=tf(False))
    if train.classes != test.classes:
        raise ValueError(f"train/ and val/ class folders differ. {hint}")
    info = DatasetInfo("imagefolder", len(train.classes), 3, size, IMAGENET_MEAN, IMAGENET_STD)
    return train, test, info
