"""The dense-head twin of a VQ-Logits graph: ``logits = h @ W_t + b`` with ``W[v] = C[M[v]] (+ U[v] P)``.

Same trunk, same logits (an int8 codebook is dequantized first), so a side-by-side benchmark measures
exactly what the VQ head saves. Only graphs with a ``logits`` output have a twin.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import VQExportError
from ..graph import head_copy, initializer_array, prune_unused
from .int8_codebook import codebook_t, lowrank_t


def dense_twin(proto: onnx.ModelProto) -> onnx.ModelProto:
    if "logits" not in {o.name for o in proto.graph.output}:
        raise VQExportError("this artifact has no logits output (decode = 'topk'); its dense twin cannot be built")
    out, head = head_copy(proto, "a dense twin")
    g = out.graph
    mapping = initializer_array(out, head.map_name).reshape(-1)
    weight_t = codebook_t(out, head)[:, mapping].astype(np.float64)  # [d, V]
    factors = lowrank_t(out, head)
    if factors is not None:  # the rank-r correction folds into the dense weight: W_t += P_t @ U_t
        weight_t += factors[0].astype(np.float64) @ factors[1].astype(np.float64)
        if head.lowrank is not None:
            add = head.lowrank.add
            base = next(i for i in add.input if i != head.lowrank.u.output[0])
            for n in g.node:  # the base sum now writes the logits itself; the correction's nodes die
                for j, o in enumerate(n.output):
                    if o == base:
                        n.output[j] = add.output[0]
            pos = next(i for i, n in enumerate(g.node) if n is add)
            del g.node[pos]
    weight_t = np.ascontiguousarray(weight_t, dtype=np.float32)
    sel_out = head.gather.output[0]  # (read after the rename above: without a bias the selection writes the logits)
    h = head.matmul.input[0]
    h_src = h
    producer = {o: n for n in g.node for o in n.output}
    while h_src in producer and producer[h_src].op_type in ("DequantizeLinear", "QuantizeLinear") and producer[h_src].name.startswith("head/"):
        h_src = producer[h_src].input[0]
    g.initializer.append(numpy_helper.from_array(weight_t, "head.weight_t"))
    # the selection node is replaced by a dense MatMul writing the same tensor; the codebook path dies
    pos = next(i for i, n in enumerate(g.node) if list(n.output) == [sel_out])
    fused_bias = head.gather.input[3] if head.gather.op_type == "VQLogits" else None
    del g.node[pos]
    if fused_bias is None:
        g.node.insert(pos, helper.make_node("MatMul", [h_src, "head.weight_t"], [sel_out], name="head/dense/MatMul"))
    else:  # the fused node also added the bias
        g.node.insert(pos, helper.make_node("MatMul", [h_src, "head.weight_t"], ["head/dense/z"], name="head/dense/MatMul"))
        g.node.insert(pos + 1, helper.make_node("Add", ["head/dense/z", fused_bias], [sel_out], name="head/dense/Add"))
        del out.functions[:]
    prune_unused(out)
    onnx.checker.check_model(out, full_check=True)
    return out
