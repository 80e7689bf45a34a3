"""``VQLogits``: the whole VQ-Logits head as one node (contract documented in ops/vqlogits/README.md).

    logits = VQLogits(hidden, codebook_t, map, bias[, lowrank_p_t, lowrank_u_t])   domain ai.onnx.contrib, version 1
        hidden       [..., d]  float32
        codebook_t   [d, K]    float32 (an int8 codebook reaches it through DequantizeLinear)
        map          [V]       int32, values in [0, K)
        bias         [V]       float32 (zeros for a head without bias)
        lowrank_p_t  [d, r]    float32, optional (both or neither): the rank-r correction's P, transposed
        lowrank_u_t  [r, V]    float32, optional: its U, transposed
        logits       [..., V]  float32 = (hidden @ codebook_t)[..., map] + bias (+ (hidden @ lowrank_p_t) @ lowrank_u_t)
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
LOWRANK_INPUTS = ("lowrank_p_t", "lowrank_u_t")


def reference(hidden: np.ndarray, codebook_t: np.ndarray, mapping: np.ndarray, bias: np.ndarray,
              lowrank_p_t: np.ndarray | None = None, lowrank_u_t: np.ndarray | None = None) -> np.ndarray:
    """The op's definition; every kernel is tested against this."""
    if (lowrank_p_t is None) != (lowrank_u_t is None):
        raise ValueError("lowrank_p_t and lowrank_u_t come together")
    h = hidden.astype(np.float32)
    z = np.matmul(h, codebook_t.astype(np.float32))
    out = np.take(z, mapping.astype(np.int64), axis=-1) + bias.astype(np.float32)
    if lowrank_p_t is not None:
        out = out + np.matmul(np.matmul(h, lowrank_p_t.astype(np.float32)), lowrank_u_t.astype(np.float32))
    return out.astype(np.float32)


def function_proto(select: str = "gather", opset: int = 18, lowrank: bool = False) -> onnx.FunctionProto:
    """The standard-op body ONNX runtimes inline when they have no kernel for the op (``lowrank``: the 6-input
    form; a model carries the body for the form its node uses)."""
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
    inputs = list(INPUTS)
    if lowrank:
        nodes[-1].output[0] = "base"
        nodes += [n("MatMul", ["hidden", "lowrank_p_t"], ["proj"]), n("MatMul", ["proj", "lowrank_u_t"], ["correction"]),
                  n("Add", ["base", "correction"], ["logits"])]
        inputs += LOWRANK_INPUTS
    return helper.make_function(DOMAIN, OP_TYPE, inputs, ["logits"], nodes,
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
