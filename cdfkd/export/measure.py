"""What export.json reports about a file: parity with torch, accuracy, CPU latency."""

from __future__ import annotations

import time

import numpy as np
import torch

from cdfkd.export.onnx_model import INPUT, OUTPUT

#: the batch sizes parity and latency are measured at
BATCHES = (1, 64)


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max()) if a.size else 0.0


def accuracy(logits: np.ndarray, labels: torch.Tensor) -> float | None:
    if labels.numel() == 0:
        return None
    return float((logits.argmax(1) == labels.numpy()).mean())


def latency_ms_per_image(sess, image_shape: tuple[int, ...], batch: int, budget_s: float) -> float:
    """Median wall time of one ``sess.run`` at ``batch`` over ``budget_s`` seconds (at least 5
    runs, after 3 warm-up runs), divided by ``batch``: milliseconds per image."""
    x = np.random.default_rng(0).standard_normal((batch, *image_shape)).astype(np.float32)
    for _ in range(3):
        sess.run([OUTPUT], {INPUT: x})
    times: list[float] = []
    stop = time.perf_counter() + budget_s
    while len(times) < 5 or time.perf_counter() < stop:
        t0 = time.perf_counter()
        sess.run([OUTPUT], {INPUT: x})
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e3 / batch
