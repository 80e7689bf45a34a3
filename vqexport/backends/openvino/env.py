"""What this machine has for OpenVINO: the openvino package, its devices, and NNCF for weight compression."""

from __future__ import annotations

import importlib.util

from ...errors import VQExportError

INSTALL_HINT = "pip install 'vqexport[openvino]' (openvino, nncf)"


def require_openvino(what: str):
    """The openvino module, or one line naming what is missing."""
    if importlib.util.find_spec("openvino") is None:
        raise VQExportError(f"{what} needs OpenVINO, which is not installed ({INSTALL_HINT})")
    import openvino

    return openvino


def error_line(e: Exception) -> str:
    """OpenVINO's or NNCF's error as one line: its first non-empty line, at most 200 characters."""
    return next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)[:200]


def require_device(device: str, what: str) -> None:
    ov = require_openvino(what)
    devices = ov.Core().available_devices
    if device.split(".")[0] not in {d.split(".")[0] for d in devices}:
        raise VQExportError(f"{what}: OpenVINO finds no {device} device here (available: {', '.join(devices) or 'none'})")


def require_nncf(what: str):
    if importlib.util.find_spec("nncf") is None:
        raise VQExportError(f"{what} compresses weights with NNCF, which is not installed ({INSTALL_HINT})")
    import nncf

    return nncf


def probe() -> dict:
    """{"openvino": version | None, "openvino_devices": [...], "nncf": version | None} without building anything."""
    out = {"openvino": None, "openvino_devices": [], "nncf": None}
    if importlib.util.find_spec("openvino") is not None:
        try:
            import openvino

            out["openvino"] = openvino.__version__.split("-")[0]
            out["openvino_devices"] = list(openvino.Core().available_devices)
        except Exception as e:  # installed but unusable
            out["openvino_error"] = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
    if importlib.util.find_spec("nncf") is not None:
        from importlib.metadata import version

        out["nncf"] = version("nncf")
    return out
