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

CODEBOOK_Q = "head.codebook_q"
CODEBOOK_SCALE = "head.codebook_scale"
CODEBOOK_ZP = "head.codebook_zero_point"
ACT_SCALE = "head.hidden_scale"
ACT_ZP = "head.hidden_zero_point"


def quantize_codebook(proto: onnx.ModelProto, activation_scale: float | None = None) -> onnx.ModelProto:
    """Return a copy of ``proto`` whose head codebook is int8 QDQ (and the hidden state too if a scale is given)."""
    out, head = head_copy(proto, "int8 codebook quantization")
    g = out.graph
    weight_name = head.matmul.input[1]
    idx = next(i for i, t in enumerate(g.initializer) if t.name == weight_name)
    codebook_t = numpy_helper.to_array(g.initializer[idx])  # [d, K]
    q, scale = quantize_rows(codebook_t.T, "head.codebook")  # rows of C = columns of C_T
    del g.initializer[idx]
    g.initializer.extend([
        numpy_helper.from_array(np.ascontiguousarray(q.T), CODEBOOK_Q),
        numpy_helper.from_array(scale, CODEBOOK_SCALE),
        numpy_helper.from_array(np.zeros_like(scale, dtype=np.int8), CODEBOOK_ZP),
    ])
    nodes = [helper.make_node("DequantizeLinear", [CODEBOOK_Q, CODEBOOK_SCALE, CODEBOOK_ZP], ["head.codebook_t"],
                              name="head/codebook/DequantizeLinear", axis=1)]
    head.matmul.input[1] = "head.codebook_t"
    if activation_scale is not None:
        if not np.isfinite(activation_scale) or activation_scale <= 0:
            raise ValueError(f"activation scale must be finite and > 0, got {activation_scale}")
        h = head.matmul.input[0]
        g.initializer.extend([numpy_helper.from_array(np.array(activation_scale, dtype=np.float32), ACT_SCALE),
                              numpy_helper.from_array(np.array(0, dtype=np.int8), ACT_ZP)])
        nodes += [
            helper.make_node("QuantizeLinear", [h, ACT_SCALE, ACT_ZP], ["head.hidden_q"], name="head/hidden/QuantizeLinear"),
            helper.make_node("DequantizeLinear", ["head.hidden_q", ACT_SCALE, ACT_ZP], ["head.hidden_dq"],
                             name="head/hidden/DequantizeLinear"),
        ]
        head.matmul.input[0] = "head.hidden_dq"
    _insert_before(g, head.matmul, nodes)
    _drop_value_info(g, {weight_name})
    return out


def _insert_before(g: onnx.GraphProto, anchor: onnx.NodeProto, nodes: list[onnx.NodeProto]) -> None:
    pos = next(i for i, n in enumerate(g.node) if n is anchor or (n.name == anchor.name and n.output == anchor.output))
    for j, n in enumerate(nodes):
        g.node.insert(pos + j, n)


def _drop_value_info(g: onnx.GraphProto, names: set[str]) -> None:
    keep = [vi for vi in g.value_info if vi.name not in names]
    del g.value_info[:]
    g.value_info.extend(keep)


NATIVE_BLOCK = 32


def native_codebook(proto: onnx.ModelProto, accuracy_level: int = 4, block_size: int = NATIVE_BLOCK) -> onnx.ModelProto:
    """ORT-native encoding: the codebook MatMul becomes ONNX Runtime's ``com.microsoft.MatMulNBits`` (bits=8).

    The same per-row symmetric int8 codes, stored as uint8 (code + 128, the op's default zero point) in
    blocks of ``block_size`` along d, every block of a row sharing that row's scale. ``accuracy_level`` is
    the node's attribute (4: int8 activations, what ORT runs fastest on this CPU; see bench --head).
    """
    out, head = head_copy(proto, "the native int8 encoding")
    g = out.graph
    if head.matmul.op_type != "MatMul":
        raise ValueError("the native int8 encoding needs a standard-op VQ-Logits head")
    weight_name = head.matmul.input[1]
    idx = next(i for i, t in enumerate(g.initializer) if t.name == weight_name)
    codebook = numpy_helper.to_array(g.initializer[idx]).T  # [K, d]
    K, d = codebook.shape
    q, scale = quantize_rows(codebook, "head.codebook")
    blocks = -(-d // block_size)
    packed = np.full((K, blocks * block_size), 128, dtype=np.uint8)
    packed[:, :d] = (q.astype(np.int16) + 128).astype(np.uint8)
    del g.initializer[idx]
    g.initializer.extend([
        numpy_helper.from_array(packed.reshape(K, blocks, block_size), CODEBOOK_Q),
        numpy_helper.from_array(np.repeat(scale, blocks).astype(np.float32), CODEBOOK_SCALE),
    ])
    node = helper.make_node("MatMulNBits", [head.matmul.input[0], CODEBOOK_Q, CODEBOOK_SCALE], list(head.matmul.output),
                            name="head/codebook/MatMulNBits", domain="com.microsoft", K=d, N=K, bits=8,
                            block_size=block_size, accuracy_level=accuracy_level)
    pos = next(i for i, n in enumerate(g.node) if list(n.output) == list(head.matmul.output))
    del g.node[pos]
    g.node.insert(pos, node)
    _drop_value_info(g, {weight_name})
    if "com.microsoft" not in {o.domain for o in out.opset_import}:
        out.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return out


def codebook_t(proto: onnx.ModelProto, head) -> np.ndarray:
    """The head's codebook as float32 [d, K], whatever its encoding (fp32, QDQ int8, MatMulNBits)."""
    from ..graph import initializer_array
    from ..quant import dequantize_rows

    if head.matmul.op_type == "MatMulNBits":
        attrs = {a.name: a.i for a in head.matmul.attribute}
        packed = initializer_array(proto, head.matmul.input[1]).astype(np.float32)  # [K, blocks, block]
        K, blocks, block = packed.shape
        scales = initializer_array(proto, head.matmul.input[2]).reshape(K, blocks, 1)
        return np.ascontiguousarray(((packed - 128.0) * scales).reshape(K, blocks * block)[:, : attrs["K"]].T)
    names = {t.name for t in proto.graph.initializer}
    if CODEBOOK_Q in names:
        q = initializer_array(proto, CODEBOOK_Q)  # [d, K]
        return np.ascontiguousarray(dequantize_rows(q.T, initializer_array(proto, CODEBOOK_SCALE)).T)
    return initializer_array(proto, head.matmul.input[1]).astype(np.float32)
