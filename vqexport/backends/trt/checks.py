"""Profile-level rules of the TensorRT backend, checked before any export (one clear error each)."""

from __future__ import annotations

from ...source import Source
from ...errors import VQExportError
from ...profiles import Profile
from .shapes import check_fits_model


def check_trt_profile(profile: Profile, source: Source) -> None:
    where = f"target {profile.name}"
    check_fits_model(profile.trt, source.geometry, where)
    if profile.codebook == "int8":
        if profile.int8.encoding != "qdq" or not profile.int8.activations:
            raise VQExportError(f"{where}: TensorRT runs int8 GEMMs only with explicit Q/DQ on both MatMul inputs; "
                                "set [int8] encoding = 'qdq' and activations = true")
        if profile.head == "fused":
            raise VQExportError(f"{where}: the int8 head runs as a standard MatMul with Q/DQ; set head = 'standard'")
    if profile.triton.enabled:
        if profile.head == "fused":
            raise VQExportError(f"{where}: Triton's TensorRT backend cannot load the Python (tensorrt.plugin) VQLogits "
                                "plugin; set head = 'standard'")
        most = min(profile.trt.prefill_batch.max, profile.trt.decode_batch.max)
        if profile.triton.max_batch_size > most:
            raise VQExportError(f"{where}: triton.max_batch_size {profile.triton.max_batch_size} exceeds the engine's "
                                f"largest batch {most} (trt.prefill.batch / trt.decode.batch max)")
