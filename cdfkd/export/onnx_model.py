"""The student as an ONNX file, and running it with onnxruntime.

The exported graph is the served prediction (``cdfkd.tracking.export.ServingStudent``:
(B, C, H, W) normalised images -> (B, num_classes) logits, the mean over headers of a
multi-header student), traced by ``torch.onnx.export(dynamo=True)`` (``torch.export``
underneath, then onnxscript) with a dynamic batch dimension named ``batch``. The file is
self-contained (``external_data=False``: weights inside, no side file) and carries the
input normalisation as metadata, since a deployment must normalise as the dataset did.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

INPUT = "images"
OUTPUT = "logits"


def export_onnx(module: nn.Module, example: torch.Tensor, path: Path, metadata: dict) -> None:
    """Write ``module`` (eval mode, CPU) to ``path``: input ``images`` (batch, C, H, W),
    output ``logits`` (batch, classes); ``metadata`` (str -> str) goes into the file."""
    import onnx
    from torch.export import Dim

    x = example[:2].to("cpu", torch.float32)
    if x.shape[0] < 2:  # a batch of 1 would let the exporter fix the batch size
        x = x.repeat(2, 1, 1, 1)
    torch.onnx.export(
        module,
        (x,),
        str(path),
        dynamo=True,
        external_data=False,
        verbose=False,
        input_names=[INPUT],
        output_names=[OUTPUT],
        dynamic_shapes=({0: Dim("batch")},),
    )
    stamp(path, metadata)
    onnx.checker.check_model(str(path))


def stamp(path: Path, metadata: dict) -> None:
    """Set ``metadata`` as the model's metadata_props (kept by readers of the file)."""
    import onnx

    model = onnx.load(str(path))
    onnx.helper.set_model_props(model, {str(k): str(v) for k, v in metadata.items()})
    onnx.save(model, str(path))


def session(path: Path, threads: int = 1):
    """An onnxruntime CPU session on ``path`` with ``threads`` intra-op threads (1: the
    per-core figures an edge device compares against)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: no optimiser notes on stderr
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run(sess, images: torch.Tensor, batch_size: int) -> np.ndarray:
    """Logits (N, classes) of ``images`` (N, C, H, W), fed ``batch_size`` at a time."""
    out = [
        sess.run([OUTPUT], {INPUT: chunk.numpy().astype(np.float32)})[0]
        for chunk in images.split(batch_size)
    ]
    return np.concatenate(out)
