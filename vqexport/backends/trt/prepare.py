"""The graph TensorRT parses: the fused head handed to the plugin rather than to its function body.

TensorRT's ONNX parser imports a model-local function when one matches a node, so the fused node would run as
its standard-op body; without the function it falls back to the plugin registry and finds the plugin by the
node's op type and its ``plugin_namespace`` / ``plugin_version`` attributes. A node with the two optional
low-rank inputs becomes ``VQLogitsLowRank`` (a plugin's inputs are fixed), everything else is left as it is.
"""

from __future__ import annotations

import onnx

from ...ops.vqlogits import OP_TYPE

LOWRANK_OP_TYPE = "VQLogitsLowRank"
PLUGIN_OPS = (OP_TYPE, LOWRANK_OP_TYPE)


def prepare_for_trt(proto: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    fused = [n for n in out.graph.node if n.op_type == OP_TYPE]
    for n in fused:
        if len([i for i in n.input if i]) == 6:
            n.op_type = LOWRANK_OP_TYPE
    if fused:
        keep = [f for f in out.functions if f.name != OP_TYPE]
        del out.functions[:]
        out.functions.extend(keep)
    return out
