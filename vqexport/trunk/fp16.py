"""fp16 trunk: the precision lives in the graph, so a strongly typed TensorRT build (the only kind TensorRT 11 has)
and any ONNX runtime run exactly what was verified. Runs on the trunk graph before the head is attached, so the head
is fp32 by construction (it reads ``hidden_states`` cast back to fp32).

Every float tensor gets a precision, decided node by node in graph order:

* reductions and transcendental ops that lose range or precision in fp16 (``KEEP_FP32``: RMSNorm's mean of
  squares, softmax, cos/sin of the rotary angles, ...) compute in fp32;
* a MatMul / Gemm / Gather reading a float weight starts fp16 (the trunk's layers and the embedding);
* every other node follows its inputs: fp16 if any non-constant float input is fp16, else fp32 (so position and
  mask arithmetic that never touches a weight stays fp32).

Casts are inserted where a tensor's precision differs from its reader's; float weights read in fp16 are stored in
fp16 and fp32 values cast to fp16 are first clipped, both to fp16's finite range, so a ``finfo(float32).min`` mask
fill becomes -65504, not -inf (a row of -inf scores would make a NaN softmax at padded positions).
Graph inputs and outputs keep their fp32 types (the KV cache crosses the boundary in fp32).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ..graph_io import same_constant

KEEP_FP32 = {"Pow", "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceLogSumExp", "ReduceL2", "Softmax",
             "LogSoftmax", "Exp", "Log", "Cos", "Sin", "Range", "CumSum", "LayerNormalization", "RMSNormalization",
             "SimplifiedLayerNormalization"}
WEIGHT_OPS = {"MatMul", "Gemm", "Gather"}
FP16_MAX = float(np.finfo(np.float16).max)
F32, F16 = ir.DataType.FLOAT, ir.DataType.FLOAT16


def _half(array: np.ndarray) -> np.ndarray:
    return np.clip(array, -FP16_MAX, FP16_MAX).astype(np.float16)


def fp16_trunk(model: ir.Model) -> ir.Model:
    g = model.graph
    prec: dict[ir.Value, ir.DataType] = {v: F32 for v in g.inputs if v.dtype == F32}
    half_weights: dict[str, ir.Value] = {}
    casts: dict[tuple[ir.Value, ir.DataType], ir.Value] = {}

    def weight(v: ir.Value) -> ir.Value:
        if v.name not in half_weights:
            h = ir.Value(name=f"{v.name}__fp16", shape=v.shape, type=ir.TensorType(F16),
                         const_value=ir.tensor(_half(v.const_value.numpy()), name=f"{v.name}__fp16"))
            g.register_initializer(h)
            half_weights[v.name] = h
        return half_weights[v.name]

    def clip_bound(name: str, value: float) -> ir.Value:
        array = np.array(value, np.float32)
        if same_constant(g, name, array) is None:
            g.register_initializer(ir.Value(name=name, shape=ir.Shape([]), type=ir.TensorType(F32),
                                            const_value=ir.tensor(array, name=name)))
        return g.initializers[name]

    def convert(v: ir.Value, want: ir.DataType, stem: str, put) -> ir.Value:
        """``v`` cast to ``want`` (to fp16: clipped to its range first), nodes named from ``stem`` and placed by
        ``put``."""
        src = v
        if want == F16:  # fp32 values beyond fp16's range would become +-inf
            clip = ir.Node("", "Clip", [v, clip_bound("fp16/min", -FP16_MAX), clip_bound("fp16/max", FP16_MAX)],
                           name=f"fp16/{stem}__clip")
            clip.outputs[0].name = f"{stem}__clip"
            clip.outputs[0].type, clip.outputs[0].shape = ir.TensorType(F32), v.shape
            put(clip)
            src = clip.outputs[0]
        tag = "fp16" if want == F16 else "fp32"
        node = ir.Node("", "Cast", [src], [ir.AttrInt64("to", want.value)], name=f"fp16/{stem}__to_{tag}")
        node.outputs[0].name = f"{stem}__to_{tag}"
        node.outputs[0].type, node.outputs[0].shape = ir.TensorType(want), v.shape
        put(node)
        return node.outputs[0]

    def cast(v: ir.Value, want: ir.DataType, before: ir.Node) -> ir.Value:
        """``v`` in ``want``, computed just before ``before`` in ``before``'s graph, once per graph (a value made in
        an If's branch is not visible outside it)."""
        key = (v, want, id(before.graph))
        if key not in casts:
            where = "" if before.graph is g else f"{before.name}/"  # unique names per branch
            casts[key] = convert(v, want, f"{where}{v.name}", lambda n: before.graph.insert_before(before, n))
        return casts[key]

    def branches(node: ir.Node) -> None:
        """An If: its branches' nodes, then both branches' output made the wider precision of the two (fp16 if
        either is), as the If's output."""
        graphs = [(key, a.as_graph()) for key, a in node.attributes.items() if a.type == ir.AttributeType.GRAPH]
        for _, sub in graphs:
            for n in list(sub):
                visit(n)
        for i, o in enumerate(node.outputs):
            if not _is_float(o):
                continue
            want = F16 if any(prec.get(sub.outputs[i], F32) == F16 for _, sub in graphs) else F32
            for key, sub in graphs:
                if prec.get(sub.outputs[i], F32) != want:  # a branch's fp32 result (zeros, in the experts' graph)
                    sub.outputs[i] = convert(sub.outputs[i], want, f"{node.name}/{key}/{i}", sub.append)
            prec[o] = want
            o.type = ir.TensorType(want)

    def visit(node: ir.Node) -> None:
        if node.name and node.name.startswith("fp16/"):
            return
        if node.op_type == "If":
            branches(node)
            return
        floats = [v for v in node.inputs if _is_float(v)]
        dynamic = [v for v in floats if not v.is_initializer()]
        if node.op_type in KEEP_FP32:
            want = F32
        elif node.op_type in WEIGHT_OPS and any(v.is_initializer() for v in floats):
            want = F16
        else:
            want = F16 if any(prec.get(v) == F16 for v in dynamic) else F32
        for i, v in enumerate(node.inputs):
            if not _is_float(v):
                continue
            if v.is_initializer():
                if want == F16:
                    node.replace_input_with(i, weight(v))
            elif prec.get(v, F32) != want:
                node.replace_input_with(i, cast(v, want, node))
        if want == F16:
            _to_fp16_attributes(node)
        for o in node.outputs:
            if o.dtype == F32 or (node.op_type == "Cast" and o.dtype == F16 and want == F16):
                prec[o] = want
                o.type = ir.TensorType(want)  # a new type: an exported trunk's clones share their type objects

    for node in list(g):
        visit(node)
    for i, out in enumerate(list(g.outputs)):
        if prec.get(out) == F16:  # the boundary stays fp32: the fp16 value is renamed and cast back
            name = out.name
            out.name = f"{name}__fp16"
            node = ir.Node("", "Cast", [out], [ir.AttrInt64("to", F32.value)], name=f"fp16/{name}__to_fp32")
            node.outputs[0].name, node.outputs[0].type, node.outputs[0].shape = name, ir.TensorType(F32), out.shape
            g.append(node)
            g.outputs[i] = node.outputs[0]
    for name in [n for n, v in g.initializers.items() if not v.uses() and not v.is_graph_output()]:
        del g.initializers[name]
    return model


def _is_float(v: ir.Value | None) -> bool:
    """A float tensor of the fp32 graph (some already re-typed fp16 by this pass)."""
    return v is not None and v.dtype in (F32, F16)


def _to_fp16_attributes(node: ir.Node) -> None:
    if node.op_type == "Cast" and node.attributes.get("to") is not None and node.attributes["to"].value == F32.value:
        node.attributes["to"] = ir.AttrInt64("to", F16.value)
    elif node.op_type in ("Constant", "ConstantOfShape") and "value" in node.attributes:
        t = node.attributes["value"].value
        if t.dtype == F32:
            node.attributes["value"] = ir.AttrTensor("value", ir.tensor(_half(t.numpy()), name=t.name))
