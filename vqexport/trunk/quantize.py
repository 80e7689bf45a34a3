"""Weight-only int4 / int8 quantization of the portable trunk with onnxruntime's own quantizer
(``MatMulNBitsQuantizer``, the one onnxruntime-genai's builder runs): every MatMul reading a constant weight becomes a
``MatMulNBits`` node (symmetric blocks along the input dimension), and at int4 the embedding table a
``GatherBlockQuantized`` one (blocks along the hidden dimension; the quantizer takes Gather at 4 bits only). Runs on
the trunk graph before the head is attached, so the head keeps the form its profile gives it.

transformers' experts layers (``trunk/experts.py``) multiply each expert's rows by its weights with ``Gemm``
(``transB = 1``), and GPT-2's Conv1D layers export as ``Gemm`` too; the quantizer leaves Gemm alone, so those are
first rewritten as MatMul (+ Add of the bias), on the transposed weight where the Gemm transposed it (a lazy tensor:
transposed when the graph is serialized for the quantizer, not before).
"""

from __future__ import annotations

import contextlib
import logging
import warnings

import numpy as np
import onnx_ir as ir

from ..errors import VQExportError
from ..graph_io import embedding_lookup

BITS = {"int4": 4, "int8": 8}
EMBEDDING_PRECISIONS = ("int4",)  # the quantizer's Gather (GatherBlockQuantized) takes 4 bits only
MIN_OPSET = 21  # the quantizer moves an older graph to opset 21 without converting its nodes
BLOCK_SIZES = (16, 32, 64, 128, 256)
QUANTIZER_OPS = ("MatMul", "Gather")
QUANTIZER_LOGGER = "onnxruntime.quantization.matmul_nbits_quantizer"


def _constant(value: ir.Value | None) -> ir.TensorProtocol | None:
    return None if value is None else value.const_value


def _float_matrix(tensor: ir.TensorProtocol | None) -> bool:
    return tensor is not None and tensor.dtype == ir.DataType.FLOAT and len(tensor.shape) == 2


def _transposed(tensor: ir.TensorProtocol, name: str) -> ir.LazyTensor:
    rows, cols = tensor.shape
    return ir.LazyTensor(lambda: ir.tensor(np.ascontiguousarray(tensor.numpy().T)), dtype=tensor.dtype,
                         shape=ir.Shape([cols, rows]), name=name)


def gemm_as_matmul(model: ir.Model) -> int:
    """Rewrite each ``Gemm(A, W, [c])`` with a constant float W and c (alpha = beta = 1, A not transposed) as
    ``MatMul(A, W) [+ c]``, or ``MatMul(A, Wᵀ) [+ c]`` where ``transB = 1``; returns how many were rewritten. A weight
    read transposed by several such nodes is transposed once."""
    g = model.graph
    done: dict[ir.Value, ir.Value] = {}
    count = 0
    for node in list(ir.traversal.RecursiveGraphIterator(g)):  # experts' Gemms are in If branches
        if node.op_type != "Gemm" or node.domain not in ("", "ai.onnx"):
            continue
        attr = {k: a.value for k, a in node.attributes.items()}
        if attr.get("transA", 0) != 0 or attr.get("alpha", 1.0) != 1.0 or attr.get("beta", 1.0) != 1.0:
            continue
        a, w, c = (list(node.inputs) + [None, None])[:3]
        if not _float_matrix(_constant(w)) or (c is not None and _constant(c) is None):
            continue
        transposed = bool(attr.get("transB", 0))
        if transposed and w not in done:
            t = ir.Value(name=f"{w.name}.T", type=w.type, shape=ir.Shape(list(reversed(w.shape.dims))),
                         const_value=_transposed(w.const_value, f"{w.name}.T"))
            g.register_initializer(t)
            done[w] = t
        out = node.outputs[0]
        matmul = ir.node("MatMul", [a, done[w] if transposed else w], name=f"{node.name}/MatMul")
        matmul.outputs[0].name = matmul.name  # named here: a branch's own naming knows nothing of the outer graph
        new = [matmul]
        result = matmul.outputs[0]
        if c is not None:
            add = ir.node("Add", [result, c], name=f"{node.name}/Add")
            new.append(add)
            result = add.outputs[0]
        name, out.name = out.name, None
        result.name, result.type, result.shape = name, out.type, out.shape
        node.graph.insert_after(node, new)
        out.replace_all_uses_with(result, replace_graph_outputs=True)
        node.graph.remove(node, safe=True)
        count += 1
    for w in done:  # the untransposed weight, when nothing else reads it
        if not w.uses() and w.name in g.initializers:
            g.initializers.pop(w.name)
    return count


def weights_to_quantize(model: ir.Model, embedding: bool, block_size: int) -> list[str]:
    """Names of the nodes the quantizer is given: MatMuls whose second input is a constant 2-d float matrix with at
    least a block of inputs (a layer's weight, not a small constant table), and (``embedding``) the lookup of
    input_ids in the embedding table. Other constant tables a graph gathers from (positions, rotary caches) stay as
    they are."""
    def weight(node) -> bool:
        w = _constant(node.inputs[1])
        return _float_matrix(w) and w.shape[0] >= block_size

    names = [n.name for n in ir.traversal.RecursiveGraphIterator(model.graph)
             if n.op_type == "MatMul" and n.domain in ("", "ai.onnx") and n.name and weight(n)]
    lookup = embedding_lookup(model.graph) if embedding else None
    if lookup is not None and lookup.op_type == "Gather" and lookup.name and _float_matrix(_constant(lookup.inputs[0])) \
            and lookup.attributes.get_int("axis", 0) == 0:
        names.append(lookup.name)
    return names


def _quantizer():
    """onnxruntime's QuantFormat and MatMulNBitsQuantizer. Importing the quantizer's module calls
    ``logging.basicConfig(level=INFO)``; the root logger's handlers and level are put back, so the process's other
    loggers keep printing what they printed before."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        from onnxruntime.quantization import QuantFormat
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    except ImportError as e:
        raise VQExportError(f"int4 / int8 weights need onnxruntime's MatMulNBits quantizer (onnxruntime >= 1.22): {e}") from None
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    return QuantFormat, MatMulNBitsQuantizer


@contextlib.contextmanager
def _quiet_quantizer():
    log = logging.getLogger(QUANTIZER_LOGGER)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        log.setLevel(level)


def quantize_weights(model: ir.Model, precision: str, block_size: int, accuracy_level: int,
                     embedding: bool = True) -> ir.Model:
    """``model`` with its MatMul weights (and, with ``embedding``, its embedding table: int4 only) quantized to
    ``precision`` (int4 | int8), symmetric, ``block_size`` values per scale; MatMulNBits runs at ``accuracy_level``
    (4: int8 activations). Returns a new model; ``model`` itself is left with its Gemms rewritten and its weights
    loaded into memory."""
    gemm_as_matmul(model)
    names = weights_to_quantize(model, embedding and precision in EMBEDDING_PRECISIONS, block_size)
    return quantize_nodes(model, names, precision, block_size, accuracy_level)


def quantize_nodes(model: ir.Model, nodes: list[str], precision: str, block_size: int, accuracy_level: int) -> ir.Model:
    """The named MatMul / Gather nodes of ``model`` quantized by onnxruntime's quantizer (a new model; ``model``
    itself when ``nodes`` is empty)."""
    if not nodes:
        return model
    QuantFormat, MatMulNBitsQuantizer = _quantizer()
    ir.external_data.load_to_model(model)  # the quantizer reads the weights from the graph itself
    # the quantizer takes every node of its op types not excluded (its nodes_to_include only adds to those)
    chosen = set(nodes)
    keep = sorted({n.name or "" for n in ir.traversal.RecursiveGraphIterator(model.graph)
                   if n.op_type in QUANTIZER_OPS and n.name not in chosen})
    proto = ir.to_proto(model)
    with _quiet_quantizer():
        quantizer = MatMulNBitsQuantizer(proto, bits=BITS[precision], block_size=block_size, is_symmetric=True,
                                         accuracy_level=accuracy_level, nodes_to_exclude=keep,
                                         quant_format=QuantFormat.QOperator, op_types_to_quantize=QUANTIZER_OPS,
                                         quant_axes=(("MatMul", 0), ("Gather", 1)))
        quantizer.process()
    del proto
    return ir.from_proto(quantizer.model.model)


def dequantized_rows(lookup: ir.Node) -> np.ndarray:
    """Every row of the table a ``GatherBlockQuantized`` node reads, in fp32, as onnxruntime's own kernel gives them
    (the node run on ids 0 .. V-1)."""
    import onnxruntime as ort

    data = lookup.inputs[0]
    V = data.shape[0]
    ids = ir.Value(name="ids", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([V]))
    # copies: no view of a memory-mapped weights file outlives the call (it would stop the file from being closed)
    consts = [ir.Value(name=f"c{i}", type=v.type, shape=v.shape, const_value=ir.tensor(np.array(v.const_value.numpy())))
              for i, v in enumerate(lookup.inputs) if i != 1 and v is not None]
    inputs = [consts[0], ids, *consts[1:]]
    node = ir.node(lookup.op_type, inputs, {k: a.value for k, a in lookup.attributes.items()}, domain=lookup.domain)
    out = node.outputs[0]
    out.name, out.type = "rows", ir.TensorType(ir.DataType.FLOAT)
    graph = ir.Graph([ids], [out], nodes=[node], initializers=consts, opset_imports={"": 21, lookup.domain: 1})
    proto = ir.to_proto(ir.Model(graph, ir_version=10))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (rows,) = session.run(None, {"ids": np.arange(V, dtype=np.int64)})
    return rows.reshape(V, -1).astype(np.float32, copy=False)
