"""fp16 trunk, fp32 head: the precision lives in the graph, so a strongly typed TensorRT build (the only kind
TensorRT 11 has) and any ONNX runtime run exactly what was verified.

Every float tensor gets a precision, decided node by node in graph order:

* the head (its MatMul / selection / bias, a rank-r correction's two MatMuls and Add, the fused node, anything named ``head/`` or ``topk/``) computes in fp32,
  so the codebook logits and the ``logits`` output stay fp32 (the head's hidden-state input is cast up);
* reductions and transcendental ops that lose range or precision in fp16 (``KEEP_FP32``: RMSNorm's mean of
  squares, softmax, cos/sin of the rotary angles, ...) compute in fp32;
* a MatMul / Gemm / Gather reading a float weight starts fp16 (the trunk's layers and the embedding);
* every other node follows its inputs: fp16 if any non-constant float input is fp16, else fp32 (so position and
  mask arithmetic that never touches a weight stays fp32).

Casts are inserted where a tensor's precision differs from its reader's; float weights read in fp16 are stored
in fp16 (values clamped to fp16's finite range, so a ``finfo(float32).min`` mask fill becomes -65504, not -inf).
Graph inputs and outputs keep their fp32 types (the KV cache crosses the boundary in fp32).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..graph import find_head

KEEP_FP32 = {"Pow", "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceLogSumExp", "ReduceL2", "Softmax",
             "LogSoftmax", "Exp", "Log", "Cos", "Sin", "Range", "CumSum", "LayerNormalization", "RMSNormalization"}
WEIGHT_OPS = {"MatMul", "Gemm", "Gather"}
FP16_MAX = float(np.finfo(np.float16).max)
F32, F16 = TensorProto.FLOAT, TensorProto.FLOAT16


def head_nodes(proto: onnx.ModelProto) -> set[str]:
    """Output names identifying the head's nodes (kept fp32)."""
    head = find_head(proto)
    keep = head.outputs()
    keep |= {o for n in proto.graph.node if n.name.startswith(("head/", "topk/")) for o in n.output}
    return keep


def fp16_trunk(proto: onnx.ModelProto) -> onnx.ModelProto:
    inferred = onnx.shape_inference.infer_shapes(proto)
    g = inferred.graph
    types = {vi.name: vi.type.tensor_type.elem_type for vi in list(g.value_info) + list(g.input) + list(g.output)}
    inits = {t.name: t for t in g.initializer}
    types.update({name: t.data_type for name, t in inits.items()})
    head = head_nodes(proto)
    is_float = lambda name: bool(name) and types.get(name) == F32  # noqa: E731

    out = onnx.ModelProto()
    out.CopyFrom(proto)
    og = out.graph
    prec: dict[str, int] = {vi.name: F32 for vi in og.input if is_float(vi.name)}
    half_weights: dict[str, str] = {}
    casts: dict[tuple[str, int], str] = {}
    new_nodes: list[onnx.NodeProto] = []

    def weight_in(name: str, want: int) -> str:
        if want == F32:
            return name
        if name not in half_weights:
            arr = numpy_helper.to_array(inits[name])
            half = np.clip(arr, -FP16_MAX, FP16_MAX).astype(np.float16)
            half_weights[name] = f"{name}__fp16"
            og.initializer.append(numpy_helper.from_array(half, half_weights[name]))
        return half_weights[name]

    def cast_in(name: str, want: int) -> str:
        key = (name, want)
        if key not in casts:
            casts[key] = f"{name}__to_{'fp16' if want == F16 else 'fp32'}"
            new_nodes.append(helper.make_node("Cast", [name], [casts[key]], name=f"fp16/{casts[key]}", to=want))
        return casts[key]

    for node in og.node:
        floats = [i for i in node.input if is_float(i)]
        dynamic = [i for i in floats if i not in inits]
        if any(o in head for o in node.output) or node.op_type == "VQLogits":
            want = F32
        elif node.op_type in KEEP_FP32:
            want = F32
        elif node.op_type in WEIGHT_OPS and any(i in inits for i in floats):
            want = F16
        else:
            want = F16 if any(prec.get(i) == F16 for i in dynamic) else F32
        for k, name in enumerate(node.input):
            if not is_float(name):
                continue
            if name in inits:
                node.input[k] = weight_in(name, want)
            elif prec.get(name, F32) != want:
                node.input[k] = cast_in(name, want)
        if want == F16:
            _to_fp16_attributes(node)
        for o in node.output:
            if is_float(o) or (node.op_type == "Cast" and types.get(o) == F32):
                prec[o] = want
        new_nodes.append(node)

    renames = {}
    for o in og.output:
        if prec.get(o.name) == F16:
            renames[o.name] = f"{o.name}__fp16"
    for n in new_nodes:
        for k, name in enumerate(n.output):
            if name in renames:
                n.output[k] = renames[name]
        for k, name in enumerate(n.input):
            if name in renames:
                n.input[k] = renames[name]
    for name, half in renames.items():
        new_nodes.append(helper.make_node("Cast", [half], [name], name=f"fp16/{name}__to_fp32", to=F32))
    del og.node[:]
    og.node.extend(new_nodes)
    del og.value_info[:]
    used = {i for n in og.node for i in n.input}
    keep = [t for t in og.initializer if t.name in used]
    del og.initializer[:]
    og.initializer.extend(keep)
    onnx.checker.check_model(out, full_check=True)
    return out


def _to_fp16_attributes(node: onnx.NodeProto) -> None:
    for a in node.attribute:
        if node.op_type == "Cast" and a.name == "to" and a.i == F32:
            a.i = F16
        elif node.op_type in ("Constant", "ConstantOfShape") and a.name == "value" and a.t.data_type == F32:
            arr = np.clip(numpy_helper.to_array(a.t), -FP16_MAX, FP16_MAX).astype(np.float16)
            a.t.CopyFrom(numpy_helper.from_array(arr, a.t.name))
