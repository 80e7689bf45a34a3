"""int8 codebook: store the head's codebook as int8 with one float scale per codebook row.

QDQ encoding (portable; what TensorRT needs)::

    h ──────────────────────────────────────────┐
    head.codebook_q [d, K] int8 ─ DequantizeLinear(axis=1, head.codebook_scale [K]) ─ MatMul ─ Gather ─ Add

With ``activations=True`` the hidden state gets a Quantize/DequantizeLinear pair too (static per-tensor
scale from calibration), so both MatMul inputs are explicit int8: the form int8 GEMM engines consume.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..graph import head_copy
from ..quant import quantize_rows

def _weight_base(name: str) -> str:
    return name[:-2] if name.endswith("_t") else name


def head_weight_matmuls(head) -> list:
    """The head's weight MatMuls: the codebook's, then the rank-r correction's two (when present)."""
    out = [head.matmul]
    if head.lowrank is not None:
        out += [head.lowrank.p, head.lowrank.u]
    return out


def _head_weights(head) -> list[tuple]:
    """(node, input index, base name) of every head weight to quantize; a fused node carries them all."""
    if head.matmul.op_type == "VQLogits":
        out = [(head.matmul, 1, "head.codebook")]
        if len(head.matmul.input) >= 6 and head.matmul.input[4]:
            out += [(head.matmul, 4, "head.lowrank_p"), (head.matmul, 5, "head.lowrank_u")]
        return out
    return [(m, 1, "head.codebook" if m is head.matmul else _weight_base(m.input[1])) for m in head_weight_matmuls(head)]


def quantize_codebook(proto: onnx.ModelProto, activation_scale: float | None = None,
                      lowrank_activation_scale: float | None = None) -> onnx.ModelProto:
    """Return a copy of ``proto`` whose head weights are int8 QDQ: the codebook and, with a rank-r correction,
    its factors P and U (one scale per codebook row / per P row / per U row). With ``activation_scale`` the
    hidden state gets a Quantize/DequantizeLinear pair too, and with ``lowrank_activation_scale`` the
    correction's r-dimensional projection: every head MatMul then has explicit int8 on both inputs."""
    out, head = head_copy(proto, "int8 codebook quantization")
    g = out.graph
    nodes = []
    dropped = set()
    for matmul, slot, base in _head_weights(head):
        weight_name = matmul.input[slot]
        idx = next(i for i, t in enumerate(g.initializer) if t.name == weight_name)
        weight_t = numpy_helper.to_array(g.initializer[idx])  # [in, out]: quantized per output column
        q, scale = quantize_rows(weight_t.T, base)
        del g.initializer[idx]
        g.initializer.extend([
            numpy_helper.from_array(np.ascontiguousarray(q.T), base + "_q"),
            numpy_helper.from_array(scale, base + "_scale"),
            numpy_helper.from_array(np.zeros_like(scale, dtype=np.int8), base + "_zero_point"),
        ])
        nodes.append(helper.make_node("DequantizeLinear", [base + "_q", base + "_scale", base + "_zero_point"], [base + "_t"],
                                      name=f"{base.replace('.', '/')}/DequantizeLinear", axis=1))
        matmul.input[slot] = base + "_t"
        dropped.add(weight_name)
    h = head.matmul.input[0]
    acts = []
    if activation_scale is not None:
        acts.append((h, [m for m in head_weight_matmuls(head)[:2]], activation_scale, "head.hidden"))
    if lowrank_activation_scale is not None and head.lowrank is not None:
        acts.append((head.lowrank.u.input[0], [head.lowrank.u], lowrank_activation_scale, "head.lowrank_proj"))
    for tensor, readers, scale, base in acts:
        if not np.isfinite(scale) or scale <= 0:
            raise ValueError(f"activation scale must be finite and > 0, got {scale}")
        g.initializer.extend([numpy_helper.from_array(np.array(scale, dtype=np.float32), base + "_scale"),
                              numpy_helper.from_array(np.array(0, dtype=np.int8), base + "_zero_point")])
        stem = base.replace(".", "/")
        nodes += [
            helper.make_node("QuantizeLinear", [tensor, base + "_scale", base + "_zero_point"], [base + "_q"], name=stem + "/QuantizeLinear"),
            helper.make_node("DequantizeLinear", [base + "_q", base + "_scale", base + "_zero_point"], [base + "_dq"],
                             name=stem + "/DequantizeLinear"),
        ]
        for m in readers:
            m.input[0] = base + "_dq"
    proj = [n for n in nodes if n.name.startswith("head/lowrank_proj/")]
    first = min(i for i, n in enumerate(g.node) if any(n is m for m in head_weight_matmuls(head)))
    _insert_at(g, first, [n for n in nodes if n not in proj])  # weight DQs and the hidden Q/DQ: inputs all exist here
    if proj:  # the projection's Q/DQ pair goes right after the MatMul that produces it
        _insert_at(g, next(i for i, n in enumerate(g.node) if n is head.lowrank.p) + 1, proj)
    _drop_value_info(g, dropped)
    return out


def _insert_at(g: onnx.GraphProto, pos: int, nodes: list[onnx.NodeProto]) -> None:
    for j, n in enumerate(nodes):
        g.node.insert(pos + j, n)


def _drop_value_info(g: onnx.GraphProto, names: set[str]) -> None:
    keep = [vi for vi in g.value_info if vi.name not in names]
    del g.value_info[:]
    g.value_info.extend(keep)


NATIVE_BLOCK = 32


def native_codebook(proto: onnx.ModelProto, accuracy_level: int = 4, block_size: int = NATIVE_BLOCK) -> onnx.ModelProto:
    """ORT-native encoding: the head's weight MatMuls become ONNX Runtime's ``com.microsoft.MatMulNBits`` (bits=8).

    The same per-row symmetric int8 codes, stored as uint8 (code + 128, the op's default zero point) in
    blocks of ``block_size`` along the reduction axis, every block of a row sharing that row's scale.
    ``accuracy_level`` is the node's attribute (4: int8 activations, what ORT runs fastest on this CPU; see
    bench --head). A rank-r correction's P and U are encoded the same way.
    """
    out, head = head_copy(proto, "the native int8 encoding")
    g = out.graph
    if any(m.op_type != "MatMul" for m in head_weight_matmuls(head)):
        raise ValueError("the native int8 encoding needs a standard-op VQ-Logits head")
    for matmul, _, base in _head_weights(head):
        weight_name = matmul.input[1]
        idx = next(i for i, t in enumerate(g.initializer) if t.name == weight_name)
        weight = numpy_helper.to_array(g.initializer[idx]).T  # [N, K]: one row per output
        N, K = weight.shape
        q, scale = quantize_rows(weight, base)
        blocks = -(-K // block_size)
        packed = np.full((N, blocks * block_size), 128, dtype=np.uint8)
        packed[:, :K] = (q.astype(np.int16) + 128).astype(np.uint8)
        del g.initializer[idx]
        g.initializer.extend([
            numpy_helper.from_array(packed.reshape(N, blocks, block_size), base + "_q"),
            numpy_helper.from_array(np.repeat(scale, blocks).astype(np.float32), base + "_scale"),
        ])
        node = helper.make_node("MatMulNBits", [matmul.input[0], base + "_q", base + "_scale"], list(matmul.output),
                                name=f"{base.replace('.', '/')}/MatMulNBits", domain="com.microsoft", K=K, N=N, bits=8,
                                block_size=block_size, accuracy_level=accuracy_level)
        pos = next(i for i, n in enumerate(g.node) if list(n.output) == list(matmul.output))
        del g.node[pos]
        g.node.insert(pos, node)
        _drop_value_info(g, {weight_name})
    if "com.microsoft" not in {o.domain for o in out.opset_import}:
        out.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return out


def codebook_t(proto: onnx.ModelProto, head) -> np.ndarray:
    """The head's codebook as float32 [d, K], whatever its encoding (fp32, QDQ int8, MatMulNBits)."""
    return weight_t(proto, head.matmul, head.matmul.input[1])


def lowrank_t(proto: onnx.ModelProto, head) -> tuple[np.ndarray, np.ndarray] | None:
    """The rank-r factors as float32 (P_t [d, r], U_t [r, V]) whatever their encoding; None without a correction."""
    if head.lowrank is not None:
        return weight_t(proto, head.lowrank.p, head.lowrank.p.input[1]), weight_t(proto, head.lowrank.u, head.lowrank.u.input[1])
    if head.gather is not None and head.gather.op_type == "VQLogits" and len(head.gather.input) >= 6 and head.gather.input[4]:
        return weight_t(proto, None, head.gather.input[4]), weight_t(proto, None, head.gather.input[5])
    return None


def weight_t(proto: onnx.ModelProto, matmul, name: str) -> np.ndarray:
    """A head weight [in, out] as float32: an initializer, a per-column DequantizeLinear of one, or MatMulNBits'."""
    from ..graph import initializer_array
    from ..quant import dequantize_rows

    if matmul is not None and matmul.op_type == "MatMulNBits":
        attrs = {a.name: a.i for a in matmul.attribute}
        packed = initializer_array(proto, matmul.input[1]).astype(np.float32)  # [N, blocks, block]
        N, blocks, block = packed.shape
        scales = initializer_array(proto, matmul.input[2]).reshape(N, blocks, 1)
        return np.ascontiguousarray(((packed - 128.0) * scales).reshape(N, blocks * block)[:, : attrs["K"]].T)
    names = {t.name for t in proto.graph.initializer}
    if name in names:
        return initializer_array(proto, name).astype(np.float32)
    dq = next((n for n in proto.graph.node if name in n.output and n.op_type == "DequantizeLinear"), None)
    if dq is None or dq.input[0] not in names:
        raise ValueError(f"head weight {name} is neither a constant nor a dequantized constant")
    q = initializer_array(proto, dq.input[0])  # [in, out] int8, one scale per output column
    return np.ascontiguousarray(dequantize_rows(q.T, initializer_array(proto, dq.input[1])).T)
