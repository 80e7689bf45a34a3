"""Build an OpenVINO artifact: model.onnx (+ data, the portable graph, as for every target) converted with OpenVINO's
own Python API (``openvino.convert_model`` / ``save_model``) to IR, ``model.xml`` + ``model.bin``, weights kept fp32
(no fp16 compression: parity is against fp32 PyTorch), or compressed by NNCF (``nncf.compress_weights``, data-free):
``weights = "int8"`` INT8_ASYM per output channel, every MatMul / embedding weight and the head's codebook;
``weights = "int4"`` INT4_ASYM in groups of 128 (NNCF's and optimum-intel's default), the embedding table and the
last MatMul (the standard head's codebook) kept INT8_ASYM, NNCF's own rule. The ONNX graph is dropped once the IR is
verified and its sizes recorded (``drop_onnx``), so the artifact is the IR alone, unless ``[openvino] keep_onnx``."""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

from ...errors import VQExportError
from ...head.spec import write_artifact_head
from ...profiles import Profile
from ...source import Source
from .env import error_line, require_device, require_nncf, require_openvino

MODEL_FILE = "model.xml"
ONNX_FILE = "model.onnx"


@contextlib.contextmanager
def quiet_logs():
    loggers = [logging.getLogger(n) for n in ("nncf", "openvino")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def compress(nncf, model, weights: str, what: str):
    """NNCF's data-free weight compression of an OpenVINO model: int8 per output channel, or int4 in groups of 128
    (a layer whose input size 128 does not divide gets NNCF's ADJUST fallback instead of an error: the largest group
    of at least 32 that divides it, or int8 where none does)."""
    if weights == "int8":
        return nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
    try:
        from nncf.quantization.advanced_parameters import AdvancedCompressionParameters, GroupSizeFallbackMode
    except ImportError:
        raise VQExportError(f"{what}: int4 weights need NNCF >= 2.18 (its group-size fallback); "
                            f"this one is {nncf.__version__}") from None
    return nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT4_ASYM, group_size=128, ratio=1.0,
                                 advanced_parameters=AdvancedCompressionParameters(
                                     group_size_fallback_mode=GroupSizeFallbackMode.ADJUST))


def to_ir(onnx_path: Path, xml_path: Path, weights: str, what: str) -> None:
    """``onnx_path`` converted to IR at ``xml_path`` (+ .bin), weights fp32 or (``weights = "int8"`` / ``"int4"``)
    compressed by NNCF."""
    ov = require_openvino(what)
    nncf = require_nncf(what) if weights != "fp32" else None
    try:
        with quiet_logs():
            model = ov.convert_model(str(onnx_path))
            if nncf is not None:
                model = compress(nncf, model, weights, what)
            ov.save_model(model, str(xml_path), compress_to_fp16=False)
    except VQExportError:
        raise
    except Exception as e:  # OpenVINO's conversion errors (OpConversionFailure, RuntimeError, ...)
        raise VQExportError(f"{what}: OpenVINO could not convert the graph ({error_line(e)})") from None


def drop_onnx(directory: Path, runtime: dict) -> dict:
    """Remove the ONNX graph (and its external data) the IR in ``directory`` was made from; ``runtime`` without its
    ``onnx_file``."""
    from ...artifact import weights_beside

    name = runtime["onnx_file"]
    for f in (name, weights_beside(name)):
        (directory / f).unlink(missing_ok=True)
    return {k: v for k, v in runtime.items() if k != "onnx_file"}


def build_openvino(out: Path, profile: Profile, source: Source) -> dict:
    what = f"target {profile.name}"
    ov = require_openvino(what)
    require_device(profile.openvino.device, what)
    to_ir(out / ONNX_FILE, out / MODEL_FILE, profile.openvino.weights, what)
    write_artifact_head(out, source.head)
    source.copy_tokenizer(out)
    return {
        "backend": "openvino",
        "model_file": MODEL_FILE,
        "onnx_file": ONNX_FILE,
        "openvino": ov.__version__.split("-")[0],
        "device": profile.openvino.device,
        "weights": profile.openvino.weights,
        "inference_precision": profile.openvino.inference_precision,
        "past_present_share_buffer": False,
    }
