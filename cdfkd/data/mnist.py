"""MNIST and Fashion-MNIST: IDX files from the root, from Debian's dataset packages, or downloaded.

Files are looked for before anything is downloaded: ``<root>/<MNIST|FashionMNIST>/raw/``,
then the system folders of Debian's dataset packages (``SYSTEM_DATA_DIRS``;
``dataset-fashion-mnist`` installs ``/usr/share/datasets/fashion-mnist/*.gz``).
"""

from __future__ import annotations

import gzip
import logging
import shutil
import tempfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from torchvision import datasets as tvd

from cdfkd.data.base import (
    DatasetInfo,
    TeacherRecipe,
    padded_transform,
    register_dataset,
    unavailable,
)
from cdfkd.errors import DatasetUnavailableError

log = logging.getLogger(__name__)

# Parent folders of Debian's dataset packages (one sub-folder per dataset).
# A module-level list so that tests and unusual installs can point elsewhere.
SYSTEM_DATA_DIRS: list[Path] = [Path("/usr/share/datasets")]

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
            assert src is not None  # all four found
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
    test_tf = padded_transform(size, 28, 2, False, False, info.mean, info.std)
    train_tf = padded_transform(size, 28, 2, False, augment, info.mean, info.std)
    with unavailable(spec.name, hint):
        train = spec.cls(root, train=True, transform=train_tf, download=not staged)
        test = spec.cls(root, train=False, transform=test_tf)
    return train, test, info


for _spec, _recipe in (
    (
        _MnistSpec("mnist", tvd.MNIST, "mnist", None, 0.1307, 0.3081),
        TeacherRecipe(epochs=10, batch_size=128, lr=0.05),
    ),
    (
        _MnistSpec(
            "fashion-mnist",
            tvd.FashionMNIST,
            "fashion-mnist",
            "dataset-fashion-mnist",
            0.2860,
            0.3530,
        ),
        TeacherRecipe(epochs=15, batch_size=128, lr=0.05),
    ),
):
    register_dataset(_spec.name, channels=1, image_size=32, num_classes=10, recipe=_recipe)(
        partial(_load_mnist_family, _spec)
    )
