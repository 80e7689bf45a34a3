"""Is a graph ready for TensorRT? Checked on CPU, before any GPU or TensorRT is touched.

* every standard op is one TensorRT's ONNX parser imports (``onnx_ops.toml``, with the list's source and version),
  and the opset is in its range; the list's restrictions that matter here (TopK's constant K < 3840, zero points);
* every custom op is a plugin the parser can find (``plugin_namespace``), whose name collides with no standard op;
* index tensors are int32 where TensorRT needs them (the plugin's map), and every dtype is one TensorRT has;
* no tensor exceeds 2^31 elements at either optimization profile's max shapes;
* every QuantizeLinear feeds DequantizeLinear only and every quantized activation has its Q; with an int8
  codebook both inputs of the head's MatMul come through DequantizeLinear (TensorRT's int8 GEMM form);
* with an fp16 trunk, the head (hidden state, codebook, codebook logits, logits) still computes in fp32.
"""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper, shape_inference

from ...source import Geometry
from ...errors import VQExportError
from ...profiles import Profile
from ...ops.vqlogits import PLUGIN_NAMESPACE
from .prepare import PLUGIN_OPS
from .shapes import PROFILES, dim_values

MAX_ELEMENTS = 2**31 - 1
# dtypes TensorRT has (UINT8 only at network I/O; DOUBLE is cast down to FLOAT by the parser)
DTYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.INT32, TensorProto.INT64,
          TensorProto.INT8, TensorProto.BOOL, TensorProto.DOUBLE, TensorProto.FLOAT8E4M3FN, TensorProto.INT4}
# plugin input positions that must be int32 (TensorRT plugins get raw buffers: no implicit int64 -> int32)
INT32_INPUTS = {op: (2,) for op in PLUGIN_OPS}


@dataclass
class Readiness:
    target: str
    passed: bool
    reasons: list = field(default_factory=list)
    ops: dict = field(default_factory=dict)
    op_list: dict = field(default_factory=dict)  # source and version of the supported-op list
    largest: dict = field(default_factory=dict)  # per profile: the largest tensor at max shapes
    unresolved: int = 0  # tensors whose size shape inference could not pin down at max shapes

    def to_dict(self) -> dict:
        return asdict(self)


def op_list() -> dict:
    with open(Path(__file__).with_name("onnx_ops.toml"), "rb") as f:
        return tomllib.load(f)


def check(proto: onnx.ModelProto, profile: Profile, cfg: Geometry, weights_dir: Path | None = None) -> Readiness:
    """``proto`` may be loaded without its external weights: the few constants read here (TopK's K, zero points)
    are then read from ``weights_dir``, the directory of the saved model.onnx."""
    ops = op_list()
    supported = set(ops["supported"])
    reasons: list[str] = []
    g = proto.graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or not ops["opset_min"] <= opset <= ops["opset_max"]:
        reasons.append(f"opset {opset} is outside TensorRT {ops['tensorrt']}'s range [{ops['opset_min']}, {ops['opset_max']}]")

    counts: dict[str, int] = {}
    for n in g.node:
        key = n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}"
        counts[key] = counts.get(key, 0) + 1
        if n.domain in ("", "ai.onnx"):
            if n.op_type not in supported:
                reasons.append(f"node {n.name!r}: op {n.op_type} is not one TensorRT's ONNX parser supports "
                               f"(list for TensorRT {ops['tensorrt']})")
        else:
            reasons += _plugin_reasons(n, supported, inits)
        reasons += _restriction_reasons(n, inits, ops["restrictions"], weights_dir)
    reasons += _dtype_reasons(proto)
    reasons += _qdq_reasons(g, inits, producer, consumers)
    if profile.codebook == "int8":
        reasons += _int8_gemm_reasons(proto, producer)
    if profile.precision == "fp16":
        reasons += _fp32_head_reasons(proto)
    largest, unresolved, size_reasons = _size_reasons(proto, profile)
    reasons += size_reasons
    return Readiness(target=profile.name, passed=not reasons, reasons=reasons, ops=dict(sorted(counts.items())),
                     op_list={"source": ops["source"], "tensorrt": ops["tensorrt"], "opset": [ops["opset_min"], ops["opset_max"]]},
                     largest=largest, unresolved=unresolved)


def enforce(report: Readiness) -> None:
    if not report.passed:
        raise VQExportError(f"target {report.target} is not ready for TensorRT: " + "; ".join(report.reasons))


def _attr(n: onnx.NodeProto, name: str):
    a = next((a for a in n.attribute if a.name == name), None)
    return None if a is None else onnx.helper.get_attribute_value(a)


def _plugin_reasons(n, supported, inits) -> list[str]:
    name = f"{n.domain}::{n.op_type}"
    ns = _attr(n, "plugin_namespace")
    if ns is None:
        return [f"node {n.name!r}: custom op {name} is neither a standard op nor a TensorRT plugin "
                f"(no plugin_namespace attribute for the parser to find one)"]
    out = []
    if n.op_type in supported or onnx.defs.has(n.op_type):
        out.append(f"node {n.name!r}: plugin op {n.op_type} collides with the standard ONNX op of that name "
                   "(TensorRT's parser matches op type only and would import the standard op); rename the plugin")
    if isinstance(ns, bytes):
        ns = ns.decode()
    if n.op_type in PLUGIN_OPS and ns != PLUGIN_NAMESPACE:
        out.append(f"node {n.name!r}: plugin_namespace {ns!r}, but vqexport registers its plugins in {PLUGIN_NAMESPACE!r}")
    elif n.op_type not in PLUGIN_OPS:
        out.append(f"node {n.name!r}: plugin {ns}::{n.op_type} is not one vqexport provides ({', '.join(PLUGIN_OPS)})")
    for pos in INT32_INPUTS.get(n.op_type, ()):
        src = n.input[pos] if pos < len(n.input) else ""
        if src in inits and inits[src].data_type != TensorProto.INT32:
            dt = TensorProto.DataType.Name(inits[src].data_type)
            out.append(f"node {n.name!r}: input {pos} ({src}) is {dt}; the plugin needs int32 indices")
    return out


def _constant(t: onnx.TensorProto, weights_dir: Path | None) -> np.ndarray:
    if t.data_location == TensorProto.EXTERNAL and weights_dir is None:
        raise ValueError(f"initializer {t.name!r} is stored outside the graph and no weights_dir was given")
    return numpy_helper.to_array(t, str(weights_dir or ""))


def _restriction_reasons(n, inits, rules, weights_dir) -> list[str]:
    out = []
    for pos in rules["constant_inputs"].get(n.op_type, []):
        if pos < len(n.input) and n.input[pos] and n.input[pos] not in inits:
            out.append(f"node {n.name!r}: {n.op_type} input {pos} must be a build-time constant for TensorRT")
    if n.op_type == "TopK":
        if len(n.input) > 1 and n.input[1] in inits:
            k = int(_constant(inits[n.input[1]], weights_dir).reshape(-1)[0])
            if k >= rules["topk_k_max"]:
                out.append(f"node {n.name!r}: TopK k = {k}; TensorRT needs k < {rules['topk_k_max']}")
        if _attr(n, "sorted") == 0:
            out.append(f"node {n.name!r}: TopK sorted = 0; TensorRT needs sorted = 1")
    if n.op_type in rules["zero_point_must_be_zero"] and len(n.input) > 2 and n.input[2] in inits:
        if np.any(_constant(inits[n.input[2]], weights_dir) != 0):
            out.append(f"node {n.name!r}: {n.op_type} zero point must be 0 for TensorRT")
    return out


def _dtype_reasons(proto) -> list[str]:
    out = []
    g = proto.graph
    io = {vi.name for vi in list(g.input) + list(g.output)}
    values = [(t.name, t.data_type) for t in g.initializer]
    values += [(vi.name, vi.type.tensor_type.elem_type) for vi in list(g.input) + list(g.output) + list(g.value_info)]
    for name, dt in values:
        if dt in DTYPES or dt == TensorProto.UNDEFINED or (dt == TensorProto.UINT8 and name in io):
            continue
        out.append(f"tensor {name!r} is {TensorProto.DataType.Name(dt)}, a type TensorRT does not have")
    return out


def _qdq_reasons(g, inits, producer, consumers) -> list[str]:
    out = []
    for n in g.node:
        if n.op_type == "QuantizeLinear":
            users = consumers.get(n.output[0], [])
            if not users:
                out.append(f"node {n.name!r}: QuantizeLinear output {n.output[0]!r} has no DequantizeLinear")
            for u in users:
                if u.op_type != "DequantizeLinear":
                    out.append(f"node {n.name!r}: QuantizeLinear feeds {u.op_type} {u.name!r}, not its DequantizeLinear")
        elif n.op_type == "DequantizeLinear":
            src = n.input[0]
            if src not in inits and (src not in producer or producer[src].op_type != "QuantizeLinear"):
                out.append(f"node {n.name!r}: DequantizeLinear of activation {src!r} has no QuantizeLinear")
    return out


def _codebook_matmul(g) -> onnx.NodeProto | None:
    from ...head.graph import CODEBOOK_MATMUL

    return next((n for n in g.node if n.name == CODEBOOK_MATMUL), None)


def _int8_gemm_reasons(proto, producer) -> list[str]:
    matmul = _codebook_matmul(proto.graph)
    if matmul is None:
        head = next((n for n in proto.graph.node if n.name.startswith("head/") and "MatMul" in n.op_type), None)
        kind = head.op_type if head is not None else "none"
        return [f"the int8 head's codebook product must be a standard MatMul for TensorRT, not {kind}"]
    out = []
    for i, src in enumerate(matmul.input[:2]):
        p = producer.get(src)
        if p is None or p.op_type != "DequantizeLinear":
            out.append(f"head MatMul {matmul.name!r}: input {i} ({src!r}) does not come through DequantizeLinear; "
                       "TensorRT runs int8 GEMMs only with explicit Q/DQ on both inputs ([int8] activations = true)")
    return out


def _fp32_head_reasons(proto) -> list[str]:
    """Under an fp16 trunk the head's codebook logits and the logits output must still be computed in fp32."""
    try:
        g = shape_inference.infer_shapes(proto).graph
    except Exception:  # a graph onnx cannot type (other reasons name why): nothing to say about the head here
        return []
    types = {vi.name: vi.type.tensor_type.elem_type for vi in list(g.value_info) + list(g.input) + list(g.output)}
    types.update({t.name: t.data_type for t in g.initializer})
    producer = {o: n for n in g.node for o in n.output}
    node = producer.get("logits")
    if node is None:
        return []
    if node.op_type == "Cast" and types.get(node.input[0]) not in (None, TensorProto.FLOAT):
        return [f"the logits are computed in {TensorProto.DataType.Name(types[node.input[0]])} and cast up by {node.name!r}; "
                "the head must compute in fp32"]
    if node.op_type in PLUGIN_OPS:
        checks = [(node, node.input[0], "hidden state"), (node, node.input[1], "codebook")]
    else:
        matmul = _codebook_matmul(g)
        if matmul is None:
            return []
        checks = [(matmul, matmul.input[0], "hidden state"), (matmul, matmul.input[1], "codebook"),
                  (matmul, matmul.output[0], "codebook logits")]
    return [f"head node {n.name!r}: its {what} {t!r} is {TensorProto.DataType.Name(types[t])}; the head must compute in fp32"
            for n, t, what in checks if types.get(t) not in (None, TensorProto.FLOAT)]


def _size_reasons(proto, profile: Profile) -> tuple[dict, int, list[str]]:
    largest, reasons, unresolved = {}, [], 0
    for t in proto.graph.initializer:
        n = int(np.prod(t.dims)) if len(t.dims) else 1
        if n > MAX_ELEMENTS:
            reasons.append(f"initializer {t.name!r} has {n:,} elements, over TensorRT's 2^31 limit")
    for which in PROFILES:
        dims = dim_values(profile.trt, which, "max")
        sizes, unknown = _sizes_at(proto, dims)
        unresolved = max(unresolved, unknown)
        if sizes:
            n, name, shape = max(sizes)
            largest[which] = {"tensor": name, "shape": shape, "elements": n}
        for n, name, shape in sorted(sizes, reverse=True):
            if n <= MAX_ELEMENTS:
                break
            knob = "prefill.batch / prefill.sequence" if which == "prefill" else "decode.batch / decode.past"
            reasons.append(f"tensor {name!r} would have {n:,} elements (shape {shape}) at the {which} profile's max shapes, "
                           f"over TensorRT's 2^31 limit; lower trt.{knob} max")
    return largest, unresolved, reasons


def _sizes_at(proto, dims: dict[str, int]) -> tuple[list[tuple[int, str, list[int]]], int]:
    """(elements, name, shape) of every tensor whose shape inference resolves at these axis sizes; and how many don't."""
    m = onnx.ModelProto()
    m.CopyFrom(proto)
    del m.graph.value_info[:]
    del m.functions[:]  # a plugin op has no body to infer through; its output comes from the graph's declared shape
    declared = {o.name: [dims.get(d.dim_param, d.dim_value if d.HasField("dim_value") else None)
                         for d in o.type.tensor_type.shape.dim] for o in m.graph.output}
    for vi in m.graph.input:
        for d in vi.type.tensor_type.shape.dim:
            if d.dim_param in dims:
                value = dims[d.dim_param]
                d.Clear()
                d.dim_value = value
    try:
        inferred = shape_inference.infer_shapes(m, data_prop=True)
    except Exception:  # a graph onnx cannot infer: fall back to the declared outputs
        inferred = m
    out, unknown = [], 0
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        shape = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
        if vi.name in declared and None in shape:
            shape = declared[vi.name]
        if not vi.type.tensor_type.HasField("shape") or None in shape:
            unknown += 1
            continue
        out.append((int(np.prod(shape, dtype=np.int64)) if shape else 1, vi.name, shape))
    return out, unknown
