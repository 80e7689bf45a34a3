"""Prefill emits head outputs for the last position only: the head sees ``h[:, -1:, :]``.

A 512-token prompt then computes one row of logits, not 512 x V; decode steps (one token) are unchanged.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..graph import head_copy

HIDDEN_LAST = "head.hidden_last"


def last_position_only(proto: onnx.ModelProto) -> onnx.ModelProto:
    out, head = head_copy(proto)
    g = out.graph
    h = head.matmul.input[0]
    # The head's readers of the hidden state: the MatMul, or the activation QuantizeLinear in front of it.
    # With a rank-r correction, its first MatMul reads the hidden state too.
    firsts = [list(head.matmul.output)] + ([list(head.lowrank.p.output)] if head.lowrank is not None else [])
    readers = [i for i, n in enumerate(g.node) if h in n.input and (list(n.output) in firsts or n.name.startswith("head/"))]
    for i in readers:
        node = g.node[i]
        node.input[list(node.input).index(h)] = HIDDEN_LAST
    g.initializer.extend([
        numpy_helper.from_array(np.array([-1], np.int64), "head/last/start"),
        numpy_helper.from_array(np.array([np.iinfo(np.int64).max], np.int64), "head/last/end"),
        numpy_helper.from_array(np.array([1], np.int64), "head/last/axis"),
    ])
    g.node.insert(min(readers), helper.make_node("Slice", [h, "head/last/start", "head/last/end", "head/last/axis"],
                                                 [HIDDEN_LAST], name="head/last_position"))
    for o in g.output:
        if o.name == "logits":
            o.type.tensor_type.shape.dim[1].dim_value = 1
    # shapes inferred for the full sequence no longer hold downstream of the slice
    head_values = head.outputs()
    keep = [vi for vi in g.value_info if vi.name not in head_values]
    del g.value_info[:]
    g.value_info.extend(keep)
    onnx.checker.check_model(out, full_check=True)
    return out
