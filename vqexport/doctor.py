"""``vqexport doctor``: which targets this machine can build and run, and why not.

``machine_facts()`` probes packages, versions, execution providers and the GPU without building anything;
``target_status(profile, facts)`` turns them into can-build / can-run with every missing piece named. The
second is pure, so the rules are tested with any facts.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform

from .profiles import Profile, bundled_names, load_profile

TRT_MIN_MAJOR = 10  # named I/O tensors, execute_async_v3, tensorrt.plugin (10.7+)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_facts() -> dict:
    from .backends.trt.env import probe

    facts = {"python": platform.python_version(), "machine": platform.machine()}
    try:
        import onnxruntime

        facts["onnxruntime"] = onnxruntime.__version__
        facts["ort_providers"] = onnxruntime.get_available_providers()
    except ImportError:
        facts["onnxruntime"], facts["ort_providers"] = None, []
    facts["onnxruntime_extensions"] = _version("onnxruntime-extensions") if importlib.util.find_spec("onnxruntime_extensions") else None
    facts["tritonclient"] = _version("tritonclient") if importlib.util.find_spec("tritonclient") else None
    facts["triton"] = _version("triton") if importlib.util.find_spec("triton") else None
    facts["onnxruntime_genai"] = _version("onnxruntime-genai") if importlib.util.find_spec("onnxruntime_genai") else None
    from .backends.openvino.env import probe as openvino_probe

    facts.update(openvino_probe())
    trt = probe()
    facts.update(tensorrt=trt["tensorrt"], tensorrt_error=trt["tensorrt_error"], gpu=trt["gpu"], gpu_error=trt["gpu_error"])
    facts["tensorrt_strongly_typed"] = facts["tensorrt_plugin_api"] = False
    if trt["tensorrt"] is not None:
        import tensorrt

        facts["tensorrt_strongly_typed"] = hasattr(tensorrt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
        facts["tensorrt_plugin_api"] = importlib.util.find_spec("tensorrt.plugin") is not None
    return facts


def target_status(profile: Profile, facts: dict) -> dict:
    """{"build": bool, "run": bool, "why_not": [reasons]} for one profile on a machine with ``facts``."""
    build, only_build = [], []  # reasons it cannot build (a build also runs the artifact: parity), and of those the
    # ones that do not stop a built artifact from running (a tool only the build uses)
    if profile.backend == "ort":
        if facts.get("onnxruntime") is None:
            build.append("onnxruntime is not installed")
        missing = [p for p in profile.ort.providers if p not in facts.get("ort_providers", [])]
        if missing:
            build.append(f"onnxruntime here lacks {', '.join(missing)}")
        if profile.head == "fused" and profile.ort.kernel == "extensions" and not facts.get("onnxruntime_extensions"):
            build.append("the fused head's kernel needs onnxruntime-extensions (pip install 'vqexport[fused]')")
        if profile.trunk.source == "genai" and not facts.get("onnxruntime_genai"):
            only_build.append("the genai trunk needs onnxruntime-genai's model builder (pip install 'vqexport[genai]')")
    elif profile.backend == "openvino":
        if facts.get("openvino") is None:
            build.append("OpenVINO is not installed (pip install 'vqexport[openvino]')")
        elif profile.openvino.device.split(".")[0] not in {d.split(".")[0] for d in facts.get("openvino_devices", [])}:
            build.append(f"OpenVINO finds no {profile.openvino.device} device here")
        if profile.openvino.weights != "fp32" and facts.get("nncf") is None:
            only_build.append(f"{profile.openvino.weights} weight compression needs NNCF (pip install 'vqexport[openvino]')")
    else:
        if facts.get("tensorrt") is None:
            build.append(f"TensorRT: {facts.get('tensorrt_error') or 'not installed'} (pip install 'vqexport[trt]')")
        else:
            major = int(str(facts["tensorrt"]).split(".")[0])
            if major < TRT_MIN_MAJOR:
                build.append(f"TensorRT {facts['tensorrt']} is older than {TRT_MIN_MAJOR}.x")
            if not facts.get("tensorrt_strongly_typed"):
                only_build.append(f"TensorRT {facts['tensorrt']} cannot build strongly typed networks (the precision is in the graph)")
            if profile.head == "fused" and not facts.get("tensorrt_plugin_api"):
                build.append(f"the fused head's plugin needs tensorrt.plugin (TensorRT >= 10.7), not in {facts['tensorrt']}")
        if facts.get("gpu") is None:
            build.append(f"no NVIDIA GPU: {facts.get('gpu_error') or 'none visible'}")
        if profile.head == "fused" and not facts.get("triton"):
            build.append("the plugin's kernel needs Triton (pip install triton)")
    if profile.triton.enabled and not facts.get("tritonclient"):
        only_build.append("checking the Triton model config needs tritonclient (pip install 'vqexport[triton]')")
    return {"build": not (build or only_build), "run": not build, "why_not": build + only_build}


def doctor(facts: dict | None = None) -> dict:
    facts = machine_facts() if facts is None else facts
    targets = {}
    for name in bundled_names():
        p = load_profile(name)
        targets[name] = {"backend": p.backend, **target_status(p, facts)}
    return {"machine": facts, "targets": targets}
