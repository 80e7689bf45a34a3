"""vqexport doctor: which targets this machine can build and run, and why not."""

import json

import pytest

from vqexport.backends.trt import env
from vqexport.doctor import target_status
from vqexport.profiles import bundled_names, load_profile

from .conftest import run_cli

FULL = {"onnxruntime": "1.32.0", "ort_providers": ["CPUExecutionProvider", "CUDAExecutionProvider"],
        "onnxruntime_extensions": "0.15.2", "tritonclient": "2.73.0", "triton": "3.6.0", "tensorrt": "10.15.1",
        "tensorrt_error": None, "gpu": {"name": "NVIDIA H100", "compute_capability": "9.0"}, "gpu_error": None,
        "tensorrt_strongly_typed": True, "tensorrt_plugin_api": True, "openvino": "2026.0.0",
        "openvino_devices": ["CPU", "GPU.0"], "nncf": "3.4.0", "onnxruntime_genai": "0.18.0"}


@pytest.mark.parametrize("name", bundled_names())
def test_a_complete_machine_builds_every_target(name):
    assert target_status(load_profile(name), FULL) == {"build": True, "run": True, "why_not": []}


@pytest.mark.parametrize("change,target,fragments", [
    ({"tensorrt": None, "tensorrt_error": "the tensorrt package is not installed"}, "trt-int8",
     ["tensorrt package is not installed", "vqexport[trt]"]),
    ({"gpu": None, "gpu_error": "torch sees no CUDA device"}, "trt-int8", ["no NVIDIA GPU", "no CUDA device"]),
    ({"tensorrt": "8.6.1"}, "trt-int8", ["TensorRT 8.6.1 is older than 10.x"]),
    ({"tensorrt": "9.0.1", "tensorrt_strongly_typed": False}, "trt-fp16", ["older than 10.x", "strongly typed"]),
    ({"tensorrt_plugin_api": False}, "trt", ["tensorrt.plugin"]),
    ({"triton": None}, "trt", ["Triton"]),
    ({"gpu": None, "gpu_error": "torch sees no CUDA device"}, "triton-trt", ["no NVIDIA GPU"]),
    ({"onnxruntime_extensions": None}, "ort-fused", ["onnxruntime-extensions"]),
    ({"ort_providers": ["AzureExecutionProvider"]}, "ort", ["lacks CPUExecutionProvider"]),
    ({"onnxruntime": None, "ort_providers": []}, "ort-int8", ["onnxruntime is not installed"]),
    ({"openvino": None}, "openvino", ["OpenVINO is not installed", "vqexport[openvino]"]),
    ({"openvino_devices": ["GPU.0"]}, "openvino-int8", ["OpenVINO finds no CPU device"]),
])
def test_each_missing_piece_is_named(change, target, fragments):
    status = target_status(load_profile(target), {**FULL, **change})
    assert not status["build"] and not status["run"]
    text = "; ".join(status["why_not"])
    for f in fragments:
        assert f in text, (f, text)


def test_every_missing_piece_is_named_at_once():
    status = target_status(load_profile("trt"), {**FULL, "tensorrt": None, "tensorrt_error": "not installed", "gpu": None,
                                                 "gpu_error": "torch sees no CUDA device", "triton": None})
    text = "; ".join(status["why_not"])
    assert len(status["why_not"]) == 3 and "TensorRT" in text and "GPU" in text and "Triton" in text


def test_trt_needs_nothing_an_ort_target_needs():
    """A machine without TensorRT or a GPU still builds the ONNX Runtime targets, and vice versa."""
    no_trt = {**FULL, "tensorrt": None, "tensorrt_error": "not installed", "gpu": None, "gpu_error": "none"}
    assert target_status(load_profile("ort"), no_trt)["build"]
    assert not target_status(load_profile("trt-int8"), no_trt)["build"]
    no_ext = {**FULL, "onnxruntime_extensions": None}
    assert target_status(load_profile("trt"), no_ext)["build"]


def test_no_tritonclient_still_runs_but_cannot_build_the_repository():
    for name in ("triton-ort", "triton-trt"):
        status = target_status(load_profile(name), {**FULL, "tritonclient": None})
        assert status["run"] and not status["build"], name
        assert len(status["why_not"]) == 1 and "tritonclient" in status["why_not"][0]
    assert target_status(load_profile("ort"), {**FULL, "tritonclient": None})["build"]


@pytest.mark.parametrize("name, lacking, says", [("ort-int4", "onnxruntime_genai", "model builder (pip install 'vqexport[genai]')"),
                                                 ("openvino-int8", "nncf", "needs NNCF")])
def test_a_tool_only_the_build_uses_does_not_stop_the_artifact_from_running(name, lacking, says):
    status = target_status(load_profile(name), {**FULL, lacking: None})
    assert status["run"] and not status["build"] and len(status["why_not"]) == 1 and says in status["why_not"][0]
    without_runtime = {**FULL, lacking: None, "onnxruntime": None, "openvino": None}
    assert not target_status(load_profile(name), without_runtime)["run"]


def test_doctor_cli_reports_this_machine():
    result = run_cli("doctor", "--json")
    assert result.exit_code == 0, result.stderr
    d = json.loads(result.stdout)
    assert set(d["targets"]) == set(bundled_names())
    assert d["targets"]["ort"]["build"] is True  # CPU onnxruntime is a hard dependency
    m = d["machine"]
    here = env.probe()
    assert m["tensorrt"] == here["tensorrt"] and (m["gpu"] is None) == (here["gpu"] is None)
    for name, t in d["targets"].items():
        assert t["backend"] == load_profile(name).backend
        assert t == {"backend": t["backend"], **target_status(load_profile(name), m)}  # the rules, on this machine's facts
        assert t["build"] or t["why_not"], name  # a target that cannot be built says why
    trt_ok = m["tensorrt"] is not None and m["gpu"] is not None
    if not trt_ok:
        assert d["targets"]["trt-int8"]["build"] is False and d["targets"]["trt-int8"]["why_not"]
    assert d["targets"]["triton-ort"]["build"] is (m["tritonclient"] is not None)
    text = run_cli("doctor")
    assert text.exit_code == 0 and "trt-int8" in text.stdout and "TensorRT" in text.stdout
    for name in bundled_names():
        assert name in text.stdout
