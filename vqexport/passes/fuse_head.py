"""Fuse the standard-op head into one ``VQLogits`` node (see vqexport.ops.vqlogits), carrying its function body.

Before:  logits = Add(Gather(MatMul(h, head.codebook_t), head.map, axis=-1), head.bias)
                  (+ MatMul(MatMul(h, head.lowrank_p_t), head.lowrank_u_t) with a rank-r correction)
After:   logits = VQLogits(h, head.codebook_t, head.map, head.bias[, head.lowrank_p_t, head.lowrank_u_t])
         + the model-local function VQLogits for the form used (4 or 6 inputs)
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import VQExportError
from ..graph import head_copy, initializer_array, prune_unused, rename_tensors
from ..ops.vqlogits import DOMAIN, OP_TYPE, PLUGIN_NAMESPACE, PLUGIN_VERSION, function_proto


def fuse_head(proto: onnx.ModelProto, select: str = "gather") -> onnx.ModelProto:
    out, head = head_copy(proto)
    g = out.graph
    if head.kind != "vq" or head.gather is None or head.gather.op_type == OP_TYPE:
        raise VQExportError("--head fused needs a VQ-Logits head with a logits output")
    mapping = initializer_array(out, head.map_name).reshape(-1).astype(np.int32)
    V = mapping.shape[0]
    bias = next((i for i in (head.add.input if head.add is not None else []) if i == "head.bias"), None)
    g.initializer.append(numpy_helper.from_array(mapping, "head.map_1d"))
    if bias is None:  # the op always takes a bias; a head without one gets zeros
        bias = "head.bias"
        g.initializer.append(numpy_helper.from_array(np.zeros(V, np.float32), bias))
    inputs = [head.matmul.input[0], head.matmul.input[1], "head.map_1d", bias]
    kill = set(head.matmul.output) | set(head.gather.output) | (set(head.add.output) if head.add is not None else set())
    logits = (head.add or head.gather).output[0]
    if head.lowrank is not None:
        inputs += [head.lowrank.p.input[1], head.lowrank.u.input[1]]
        kill |= set(head.lowrank.p.output) | set(head.lowrank.u.output) | set(head.lowrank.add.output)
        logits = head.lowrank.add.output[0]
    fused = helper.make_node(OP_TYPE, inputs, [logits], name="head/VQLogits", domain=DOMAIN,
                             plugin_namespace=PLUGIN_NAMESPACE, plugin_version=PLUGIN_VERSION)
    pos = next(i for i, n in enumerate(g.node) if list(n.output) == list(head.matmul.output))
    keep = [n for n in g.node if not set(n.output) & kill]
    del g.node[:]
    g.node.extend(keep)
    g.node.insert(min(pos, len(g.node)), fused)
    prune_unused(out)
    rename_tensors(out, {"head.map_1d": "head.map"})
    opset = next(o.version for o in out.opset_import if o.domain in ("", "ai.onnx"))
    out.functions.append(function_proto(select, opset, lowrank=head.lowrank is not None))
    if DOMAIN not in {o.domain for o in out.opset_import}:
        out.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    onnx.checker.check_model(out, full_check=True)
    return out
