"""The Runner for an artifact's runtime section: ONNX Runtime or TensorRT (imported only when used)."""

from __future__ import annotations


def runner_from_runtime(model_path, runtime: dict):
    if runtime.get("backend", "ort") == "trt":
        from .trt.runner import TrtRunner

        return TrtRunner.from_runtime(model_path, runtime)
    from .ort.runner import OrtRunner

    return OrtRunner.from_runtime(model_path, runtime)
