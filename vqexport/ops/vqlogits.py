"""``VQLogits``: the whole VQ-Logits head as one node (contract documented in ops/vqlogits/README.md).

    logits = VQLogits(hidden, codebook_t, map, bias)        domain ai.onnx.contrib, since version 1
        hidden      [..., d]  float32
        codebook_t  [d, K]    float32 (an int8 codebook reaches it through DequantizeLinear)
        map         [V]       int32, values in [0, K)
        bias        [V]       float32 (zeros for a head without bias)
        logits      [..., V]  float32 = (hidden @ codebook_t)[..., map] + bias
    attributes: plugin_namespace (string), plugin_version (string): how TensorRT's parser names the plugin.

Every runtime can run it: the model carries a local function with the standard-op body; ONNX Runtime uses a
registered kernel instead when there is one (``register_ort_kernel``). numpy only, no torch.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

OP_TYPE = "VQLogits"
DOMAIN = "ai.onnx.contrib"  # onnxruntime-extensions registers Python kernels in this domain only
PLUGIN_NAMESPACE = "vqexport"
PLUGIN_VERSION = "1"
INPUTS = ("hidden", "codebook_t", "map", "bias")


def reference(hidden: np.ndarray, codebook_t: np.ndarray, mapping: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """The op's definition; every kernel is tested against this."""
    z = np.matmul(hidden.astype(np.float32), codebook_t.astype(np.float32))
    return (np.take(z, mapping.astype(np.int64), axis=-1) + bias.astype(np.float32)).astype(np.float32)


def function_proto(select: str = "gather", opset: int = 18) -> onnx.FunctionProto:
    """The standard-op body ONNX runtimes inline when they have no kernel for the op."""
    n = helper.make_node
    if select == "gather":
        nodes = [n("MatMul", ["hidden", "codebook_t"], ["z"]), n("Gather", ["z", "map"], ["sel"], axis=-1),
                 n("Add", ["sel", "bias"], ["logits"])]
    elif select == "gather_elements":
        nodes = [
            n("MatMul", ["hidden", "codebook_t"], ["z"]),
            n("Shape", ["map"], ["v"]),
            n("Shape", ["z"], ["lead"], end=-1),
            n("Concat", ["lead", "v"], ["out_shape"], axis=0),
            n("Shape", ["z"], ["rank_shape"]),  # [r]
            n("Size", ["rank_shape"], ["rank"]),
            n("Constant", [], ["one"], value=helper.make_tensor("one", onnx.TensorProto.INT64, [1], [1])),
            n("Sub", ["rank", "one"], ["lead_rank"]),
            n("Expand", ["one", "lead_rank"], ["ones_lead"]),
            n("Concat", ["ones_lead", "v"], ["map_shape"], axis=0),
            n("Reshape", ["map", "map_shape"], ["map_b"]),
            n("Expand", ["map_b", "out_shape"], ["index"]),
            n("GatherElements", ["z", "index"], ["sel"], axis=-1),
            n("Add", ["sel", "bias"], ["logits"]),
        ]
    else:
        raise ValueError(select)
    return helper.make_function(DOMAIN, OP_TYPE, list(INPUTS), ["logits"], nodes,
                                [helper.make_opsetid("", opset)], attributes=["plugin_namespace", "plugin_version"])


_calls = {"n": 0}


def kernel_calls() -> int:
    """How many times the registered ORT kernel has run in this process (for tests and diagnostics)."""
    return _calls["n"]


def register_ort_kernel() -> str:
    """Register the VQLogits kernel with onnxruntime-extensions; returns the custom-ops library path to load."""
    try:
        from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op
    except ImportError:
        from ..errors import VQExportError

        raise VQExportError("the fused head's ORT kernel needs onnxruntime-extensions (pip install onnxruntime-extensions), "
                            "or set [ort] kernel = \"function\" to run the op's function body") from None
    if not _registered:
        @onnx_op(op_type=OP_TYPE,
                 inputs=[PyCustomOpDef.dt_float, PyCustomOpDef.dt_float, PyCustomOpDef.dt_int32, PyCustomOpDef.dt_float],
                 outputs=[PyCustomOpDef.dt_float],
                 attrs={"plugin_namespace": PyCustomOpDef.dt_string, "plugin_version": PyCustomOpDef.dt_string})
        def _vq_logits(hidden, codebook_t, mapping, bias, **_attrs):
            _calls["n"] += 1
            return reference(hidden, codebook_t, mapping, bias)

        _registered.append(True)
    return get_library_path()


_registered: list = []
