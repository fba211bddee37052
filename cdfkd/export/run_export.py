"""``export_run``: a finished run's student as deployable files in ``RUN_DIR/export/``.

The export folder (this module owns its format)::

    student.onnx        the served prediction, fp32, dynamic batch (``onnx_model.py``)
    student.int8.onnx   with ``int8=True``: static int8, calibrated on generated images
    export.json         what was checked and measured (below)

``export.json``: the input (shape, mean, std), the files (bytes, sha256), ``parity`` (the
max absolute logit difference between onnxruntime and torch at batch 1 and 64, on the
test images), ``accuracy`` (torch and onnxruntime on the test set), ``latency_ms_per_image``
(onnxruntime, CPU, one thread, batch 1 and 64), and with ``int8`` its accuracy, its
top-1 agreement with fp32, the calibration and the quantization settings. Where the test
data cannot be loaded, parity is measured on generated images and accuracies are null.
"""

from __future__ import annotations

import logging
import platform
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from cdfkd.config import ExperimentConfig
from cdfkd.data import DatasetInfo, DatasetUnavailableError
from cdfkd.errors import ConfigError
from cdfkd.export import onnx_model
from cdfkd.export.calibration import generated_images
from cdfkd.export.measure import BATCHES, accuracy, latency_ms_per_image, max_abs_diff
from cdfkd.export.quantize import SETTINGS, quantize_int8
from cdfkd.files import write_atomic, write_json_atomic
from cdfkd.runs import RESULT, RunDir, ensure_writable
from cdfkd.teachers import sha256_file
from cdfkd.tracking.export import serving_module

log = logging.getLogger(__name__)

FORMATS = ("onnx",)
ONNX = "student.onnx"
INT8 = "student.int8.onnx"
REPORT = "export.json"


def _test_images(
    cfg: ExperimentConfig, data_root: str | None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The test split as (images, labels) tensors; None when it cannot be loaded here."""
    data = cfg.data if data_root is None else cfg.data.model_copy(update={"root": data_root})
    try:
        _, test, _ = data.load(augment=False)
    except DatasetUnavailableError as err:
        log.warning("test data not available (%s): parity is checked on generated images", err)
        return None
    xs, ys = zip(
        *(batch for batch in torch.utils.data.DataLoader(test, batch_size=512)), strict=True
    )
    return torch.cat(xs).float(), torch.cat(ys)


@torch.no_grad()
def _torch_logits(module: torch.nn.Module, images: torch.Tensor) -> np.ndarray:
    return torch.cat([module(chunk) for chunk in images.split(64)]).numpy()


def _file_entry(path: Path) -> dict:
    # Atomic writes create 0600 files; deployable ones are meant to be copied and shared.
    path.chmod(0o644)
    return {"file": path.name, "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def _versions() -> dict:
    import onnx
    import onnxruntime

    from cdfkd.teachers.manifest import cdfkd_version

    return {
        "cdfkd": cdfkd_version(),
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(),
    }


def _metadata(info: DatasetInfo, cfg: ExperimentConfig) -> dict:
    return {
        "cdfkd.input": f"{info.channels}x{info.image_size}x{info.image_size}",
        "cdfkd.mean": ",".join(map(str, info.mean)),
        "cdfkd.std": ",".join(map(str, info.std)),
        "cdfkd.num_classes": info.num_classes,
        "cdfkd.dataset": info.name,
        "cdfkd.student": cfg.student.arch,
        "cdfkd.method": cfg.method.name,
    }


def export_run(
    run_dir: str | Path,
    fmt: str = "onnx",
    *,
    int8: bool = False,
    calibration_images: int = 256,
    data_root: str | None = None,
    latency_budget_s: float = 1.0,
) -> dict:
    """Export the student of finished run ``run_dir``; returns what export.json holds
    (``files`` maps each written file's role to its path)."""
    run = RunDir(run_dir)
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r} (known: {', '.join(FORMATS)})")
    if not run.finished:
        raise ConfigError(f"{run.path} holds no finished run (no {RESULT}): run `cdfkd distill`")
    if calibration_images < 1:
        raise ConfigError(f"calibration_images={calibration_images} must be >= 1")
    cfg = run.read_config()
    student, info = run.load_student("cpu")
    module = serving_module(student)
    generator = run.load_generator("cpu")
    if int8 and generator is None:
        raise ConfigError(
            f"{run.path} was trained by {cfg.method.name}, which has no generator, so there are "
            "no generated images to calibrate int8 on: export without --int8"
        )
    images, labels, source = _check_images(cfg, info, generator, data_root)
    out = run.export_dir
    ensure_writable(out)
    (out / INT8).unlink(missing_ok=True)  # a stale int8 file would pose as this student's
    fp32 = out / ONNX
    meta = _metadata(info, cfg)
    write_atomic(fp32, lambda tmp: onnx_model.export_onnx(module, images, tmp, meta))
    report: dict = {
        "format": fmt,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "run": str(run.path.resolve()),
        "input": {
            "name": onnx_model.INPUT,
            "shape": ["batch", *module_input(info)],
            "mean": list(info.mean),
            "std": list(info.std),
        },
        "output": {"name": onnx_model.OUTPUT, "shape": ["batch", info.num_classes]},
        "student": {"arch": cfg.student.arch, "family": cfg.student.family},
        "fp32": _file_entry(fp32),
    }
    sessions = {"fp32": onnx_model.session(fp32)}
    fp32_logits = _parity(report, module, sessions["fp32"], images, labels, source)
    if int8:
        assert generator is not None
        calib = generated_images(generator, calibration_images, cfg.train.seed)
        q_path = out / INT8
        write_atomic(q_path, lambda tmp: quantize_int8(fp32, tmp, calib))
        onnx_model.stamp(q_path, meta)
        sessions["int8"] = onnx_model.session(q_path)
        q_logits = onnx_model.run(sessions["int8"], images, BATCHES[-1])
        report["int8"] = {
            **_file_entry(q_path),
            "accuracy": accuracy(q_logits, labels),
            "top1_agreement_with_fp32": float((q_logits.argmax(1) == fp32_logits.argmax(1)).mean()),
            "max_abs_diff_to_fp32": max_abs_diff(q_logits, fp32_logits),
            "calibration": {
                "images": calibration_images,
                "source": f"the run's {cfg.method.name} generator (last checkpoint), seed "
                f"{cfg.train.seed}",
            },
            "settings": SETTINGS,
        }
    report["latency_ms_per_image"] = {"threads": 1}
    for kind, sess in sessions.items():
        report["latency_ms_per_image"][kind] = {
            f"batch_{b}": latency_ms_per_image(sess, module_input(info), b, latency_budget_s)
            for b in BATCHES
        }
    report["versions"] = _versions()
    write_json_atomic(out / REPORT, report)
    (out / REPORT).chmod(0o644)
    report["files"] = {"fp32": str(fp32), "report": str(out / REPORT)}
    if int8:
        report["files"]["int8"] = str(out / INT8)
    return report


def _check_images(cfg: ExperimentConfig, info: DatasetInfo, generator, data_root: str | None):
    """(images, labels, what they are) to compare the file with torch on: the test set, or
    without it generated images (labels empty: no accuracy), or else Gaussian noise."""
    test = _test_images(cfg, data_root)
    if test is not None:
        return test[0], test[1], "test set"
    none = torch.empty(0, dtype=torch.long)
    if generator is not None:
        return generated_images(generator, 256, cfg.train.seed), none, "generated images"
    noise = torch.randn(256, *module_input(info), generator=torch.Generator().manual_seed(0))
    return noise, none, "Gaussian noise"


def _parity(report: dict, module, sess, images, labels, source: str) -> np.ndarray:
    """Add ``parity`` and ``accuracy`` to ``report``; returns the file's logits of ``images``."""
    reference = _torch_logits(module, images)
    batched = onnx_model.run(sess, images, BATCHES[-1])
    single = onnx_model.run(sess, images[: BATCHES[-1]], 1)
    report["parity"] = {
        "images": len(images),
        "source": source,
        "max_abs_diff": {
            "batch_1": max_abs_diff(single, reference[: len(single)]),
            f"batch_{BATCHES[-1]}": max_abs_diff(batched, reference),
        },
        "max_abs_logit": float(np.abs(reference).max()),
    }
    report["accuracy"] = {
        "torch": accuracy(reference, labels),
        "onnxruntime": accuracy(batched, labels),
    }
    return batched


def module_input(info: DatasetInfo) -> tuple[int, int, int]:
    """(C, H, W) of one input image."""
    return (info.channels, info.image_size, info.image_size)
