"""The Runner for an artifact's runtime section: ONNX Runtime, TensorRT or OpenVINO (imported only when used)."""

from __future__ import annotations


def runner_from_runtime(model_path, runtime: dict):
    if runtime.get("backend") == "openvino":
        from .openvino.runner import OvRunner

        return OvRunner.from_runtime(model_path, runtime)
    if runtime.get("backend", "ort") == "trt":
        from .trt.runner import TrtRunner

        return TrtRunner.from_runtime(model_path, runtime)
    from .ort.runner import OrtRunner

    return OrtRunner.from_runtime(model_path, runtime)
