"""What this machine has for TensorRT: the tensorrt package and a CUDA GPU. Probed without building anything.

Also the engine compatibility rule: an engine runs on the TensorRT version and the GPU it was built for, unless it
was built version-compatible (later TensorRT of the same major) or hardware-compatible (Ampere and later, or the
same compute capability).
"""

from __future__ import annotations

import importlib.util

from ...errors import VQExportError

INSTALL_HINT = "pip install 'vqexport[trt]' (TensorRT's Python wheel)"


def probe() -> dict:
    """{"tensorrt": version | None, "tensorrt_error": str | None, "gpu": {"name", "compute_capability"} | None,
    "gpu_error": str | None}"""
    out = {"tensorrt": None, "tensorrt_error": None, "gpu": None, "gpu_error": None}
    if importlib.util.find_spec("tensorrt") is None:
        out["tensorrt_error"] = "the tensorrt package is not installed"
    else:
        try:
            import tensorrt

            out["tensorrt"] = tensorrt.__version__
        except Exception as e:  # installed but unusable (missing CUDA libraries, wrong platform)
            out["tensorrt_error"] = f"tensorrt does not load: {str(e).splitlines()[0][:200] if str(e) else type(e).__name__}"
    out.update(_gpu())
    return out


def _gpu() -> dict:
    try:
        import torch
    except ImportError:
        return {"gpu": None, "gpu_error": "torch is not installed"}
    if not torch.cuda.is_available():
        return {"gpu": None, "gpu_error": "torch sees no CUDA device"}
    major, minor = torch.cuda.get_device_capability(0)
    return {"gpu": {"name": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}"}, "gpu_error": None}


def require(what: str, here: dict | None = None):
    """The tensorrt module, or one VQExportError naming everything missing for ``what``."""
    here = probe() if here is None else here
    _refuse_missing(what, here)
    import tensorrt

    return tensorrt


def _refuse_missing(what: str, here: dict) -> None:
    missing = []
    if here["tensorrt"] is None:
        missing.append(f"TensorRT ({here['tensorrt_error']}; {INSTALL_HINT})")
    if here["gpu"] is None:
        missing.append(f"an NVIDIA GPU ({here['gpu_error']})")
    if missing:
        raise VQExportError(f"{what} needs {' and '.join(missing)}")


def _cc(v: str) -> tuple[int, int]:
    major, _, minor = str(v).partition(".")
    return int(major), int(minor or 0)


def check_engine_runs_here(engine: dict, here: dict, where: str) -> None:
    """Refuse, in one line, an engine built for another TensorRT version or GPU than this machine's."""
    _refuse_missing(f"{where}: running a TensorRT engine", here)
    built, now = engine.get("tensorrt"), here["tensorrt"]
    if built != now:
        same_major = str(built).split(".")[0] == str(now).split(".")[0]
        later = tuple(int(x) for x in str(now).split(".")[:3] if x.isdigit()) >= tuple(int(x) for x in str(built).split(".")[:3] if x.isdigit())
        if not (engine.get("version_compatible") and same_major and later):
            raise VQExportError(f"{where}: the engine was built with TensorRT {built}, this machine has TensorRT {now}; "
                                "rebuild it here (or build with [trt] version_compatible = true)")
    cc_built, cc_now = engine.get("compute_capability"), here["gpu"]["compute_capability"]
    level = engine.get("hardware_compatibility", "none")
    ok = (cc_built == cc_now if level in ("none", "same_compute_capability")
          else level == "ampere_plus" and _cc(cc_now) >= (8, 0))
    if not ok:
        raise VQExportError(f"{where}: the engine was built for a GPU of compute capability {cc_built} "
                            f"({engine.get('gpu', '?')}), this GPU ({here['gpu']['name']}) is {cc_now}; rebuild it here "
                            "(or build with [trt] hardware_compatibility = \"ampere_plus\")")
