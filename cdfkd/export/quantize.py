"""int8 post-training static quantization of the ONNX student, calibrated without real data.

onnxruntime's ``quantize_static`` in QDQ format: weights signed int8 per output channel,
activations unsigned int8 per tensor, ranges from MinMax over the calibration batches.
The calibration images are the run's own generator's (``cdfkd.export.calibration``), so no
real sample is needed, as for the distillation itself. Measured on this project's CPU
(onnxruntime 1.32, 2 cores, 1 thread per session): signed activations made the int8 files
slower than fp32; calibrating on Gaussian noise instead of generated images cost accuracy;
``quant_pre_process`` changed nothing for these graphs and is not run.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from cdfkd.export.onnx_model import INPUT

#: the settings written next to the int8 file's figures in export.json
SETTINGS = {
    "format": "QDQ",
    "weights": "int8 per channel",
    "activations": "uint8 per tensor",
    "calibration_method": "MinMax",
}


class _NoPreprocessAdvice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing" not in record.getMessage()


@contextlib.contextmanager
def _quiet_advice() -> Iterator[None]:
    """onnxruntime advises ``quant_pre_process`` on the root logger at every call; it was
    measured to change nothing here (module docstring), so that advice is dropped."""
    root, advice = logging.getLogger(), _NoPreprocessAdvice()
    root.addFilter(advice)
    try:
        yield
    finally:
        root.removeFilter(advice)


def quantize_int8(
    fp32_path: Path, out_path: Path, images: torch.Tensor, batch_size: int = 32
) -> None:
    """Write the int8 version of ``fp32_path`` to ``out_path``, calibrated on ``images``."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    batches = [b.numpy().astype(np.float32) for b in images.split(batch_size)]

    class Batches(CalibrationDataReader):
        """Feeds the calibration images under the model's input name, batch by batch."""

        def __init__(self) -> None:
            self.rewind()

        def get_next(self):
            return next(self._it, None)

        def rewind(self) -> None:
            self._it = iter({INPUT: b} for b in batches)

    with _quiet_advice():
        quantize_static(
            str(fp32_path),
            str(out_path),
            Batches(),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            calibrate_method=CalibrationMethod.MinMax,
        )
