"""The student for deployment: ONNX files (fp32, and int8 calibrated on generated images).

``export_run(RUN_DIR, "onnx", int8=True)`` is what ``cdfkd export RUN_DIR --format onnx
--int8`` runs: it writes ``RUN_DIR/export/student.onnx`` (+ ``student.int8.onnx``) and
``export.json`` with the parity, accuracy, size and latency figures (``run_export.py``).
``onnx`` and ``onnxruntime`` are imported only inside the functions that use them.
Logging the files to MLflow is the tracking layer's (``cdfkd.tracking.exports``).
"""

from __future__ import annotations

from cdfkd.export.run_export import FORMATS, INT8, ONNX, REPORT, export_run

__all__ = ["FORMATS", "INT8", "ONNX", "REPORT", "export_run"]
