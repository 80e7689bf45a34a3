"""ONNX-only facts about an exported decoder graph: its I/O contract, dynamic axes, and where the head is.

No torch here: the app-side path (runners, generate, inspect of an .onnx) uses this module.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import VQExportError

BATCH, SEQ, PAST, TOTAL = "batch_size", "sequence_length", "past_sequence_length", "total_sequence_length"

# Which axes of each graph input/output must stay symbolic, and what they are called.
INPUT_AXES = {"input_ids": {0: BATCH, 1: SEQ}, "attention_mask": {0: BATCH, 1: TOTAL}}
PAST_AXES = {0: BATCH, 2: PAST}
LOGITS_AXES = {0: BATCH, 1: SEQ}
PRESENT_AXES = {0: BATCH, 2: TOTAL}


def past_name(layer: int, kind: str) -> str:
    return f"past_key_values.{layer}.{kind}"


def present_name(layer: int, kind: str) -> str:
    return f"present.{layer}.{kind}"


def cache_names(n_layers: int) -> tuple[list[str], list[str]]:
    past = [past_name(i, k) for i in range(n_layers) for k in ("key", "value")]
    present = [present_name(i, k) for i in range(n_layers) for k in ("key", "value")]
    return past, present


def dims_of(vi: onnx.ValueInfoProto) -> list:
    return [d.dim_param if d.dim_param else (d.dim_value if d.HasField("dim_value") else "?") for d in vi.type.tensor_type.shape.dim]


def expected_axes(model: onnx.ModelProto) -> dict[str, dict[int, str]]:
    """name -> {axis: dim name} for every graph input/output of the decoder contract."""
    out: dict[str, dict[int, str]] = {}
    for vi in model.graph.input:
        if vi.name in INPUT_AXES:
            out[vi.name] = INPUT_AXES[vi.name]
        elif vi.name.startswith("past_key_values."):
            out[vi.name] = PAST_AXES
    for vi in model.graph.output:
        if vi.name == "logits":
            out[vi.name] = LOGITS_AXES
        elif vi.name.startswith("present."):
            out[vi.name] = PRESENT_AXES
    return out


def check_dynamic_axes(model: onnx.ModelProto) -> None:
    """Fail if any batch or sequence axis of the decoder's inputs/outputs was fixed to a number."""
    axes = expected_axes(model)
    for vi in list(model.graph.input) + list(model.graph.output):
        if vi.name not in axes:
            continue
        dims = dims_of(vi)
        for axis, name in axes[vi.name].items():
            got = dims[axis] if axis < len(dims) else None
            if got != name:
                raise VQExportError(
                    f"exported graph: axis {axis} of {vi.name!r} is {got!r}, expected the dynamic axis {name!r} "
                    "(the exporter fixed a dimension that must stay dynamic)"
                )
    names = {vi.name for vi in model.graph.input}
    if not {"input_ids", "attention_mask"} <= names:
        raise VQExportError("exported graph: inputs must include input_ids and attention_mask")
    if "logits" not in {vi.name for vi in model.graph.output}:
        raise VQExportError("exported graph: no 'logits' output")


@dataclass
class LowRankNodes:
    """The rank-r correction ``logits = base + MatMul(MatMul(h, head.lowrank_p_t), head.lowrank_u_t)``."""

    add: onnx.NodeProto  # base + correction
    p: onnx.NodeProto  # MatMul (or MatMulNBits) h [.., d] -> [.., r]
    u: onnx.NodeProto  # MatMul (or MatMulNBits) [.., r] -> [.., V]


@dataclass
class HeadNodes:
    """The head's nodes and initializers in a standard-op graph."""

    kind: str  # "vq" | "dense"
    matmul: onnx.NodeProto
    gather: onnx.NodeProto | None
    add: onnx.NodeProto | None
    initializers: list[str]  # names of the head's weights
    map_name: str | None = None  # the token -> code map initializer (vq heads with logits)
    lowrank: LowRankNodes | None = None  # the rank-r correction, when the head has one (standard-op form)

    def outputs(self) -> set[str]:
        """Every tensor the head's nodes write (the codebook MatMul, selection, bias Add, correction)."""
        nodes = (self.matmul, self.gather, self.add) + ((self.lowrank.p, self.lowrank.u, self.lowrank.add) if self.lowrank else ())
        return {o for n in nodes if n is not None for o in n.output}


def _weight_matmul(node, inits, producer) -> bool:
    if node is None or node.op_type not in ("MatMul", "MatMulNBits"):
        return False
    if node.op_type == "MatMulNBits":
        return node.input[1] in inits
    return _constant_sources(node.input[1], producer, inits) is not None


def activation_source(name: str, producer: dict) -> str:
    """The tensor behind an activation Quantize/DequantizeLinear pair (``name`` itself when there is none)."""
    while name in producer and producer[name].op_type == "DequantizeLinear":
        q = producer.get(producer[name].input[0])
        if q is None or q.op_type != "QuantizeLinear":
            break
        name = q.input[0]
    return name


def _lowrank_branch(add: onnx.NodeProto, producer: dict, inits: set) -> tuple[LowRankNodes, str] | None:
    """``Add(base, MatMul(MatMul(h, P_t), U_t))`` -> (its nodes, the base tensor); None if ``add`` is not that."""
    if len(add.input) != 2 or any(i in inits for i in add.input):
        return None
    for j, name in enumerate(add.input):
        u = producer.get(name)
        if not _weight_matmul(u, inits, producer):
            continue
        p = producer.get(activation_source(u.input[0], producer))
        if _weight_matmul(p, inits, producer):
            return LowRankNodes(add, p, u), add.input[1 - j]
    return None


def _weight_names(node: onnx.NodeProto, producer: dict, inits: set) -> list[str]:
    if node.op_type == "MatMulNBits":
        return [i for i in node.input[1:] if i in inits]
    names = _constant_sources(node.input[1], producer, inits) or []
    return names + [n for n in (_constant_sources(node.input[0], producer, inits, quant_only=True) or []) if n not in names]


def find_head(model: onnx.ModelProto, _lowrank: bool = True) -> HeadNodes:
    """Locate ``logits = Gather(MatMul(h, C_T), map, axis=-1) (+ bias)`` (or the dense ``MatMul (+ bias)``)."""
    g = model.graph
    inits = {t.name for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    node = producer.get("logits")
    topk = node is None and any(n.name == "topk/score" for n in g.node)
    if topk:  # exact top-k variant without logits: the head's MatMul feeds the cluster scores
        node = producer.get(next(n for n in g.node if n.name == "topk/score").input[0])
    if node is not None and node.op_type == "VQLogits":  # fused head: one node plays MatMul + selection + bias
        names = _weight_names(node, producer, inits)
        names += [n for n in node.input[2:4] if n in inits and n not in names]
        for extra in node.input[4:6]:  # optional rank-r factors, fp32 or through a DequantizeLinear
            names += [n for n in (_constant_sources(extra, producer, inits) or []) if n not in names]
        names += sorted(n for n in inits if n.startswith("head.") and n not in names)
        return HeadNodes("vq", node, node, None, names, node.input[2])
    lowrank = None
    if _lowrank and node is not None and node.op_type == "Add":
        found = _lowrank_branch(node, producer, inits)
        if found is not None:
            lowrank, base = found
            node = producer.get(base)
    add = None
    if node is not None and node.op_type == "Add":
        add = node
        node = next((producer[i] for i in node.input if i in producer), None)
    gather, map_name = None, None
    if node is not None and node.op_type in ("Gather", "GatherElements"):
        gather = node
        map_name = node.input[1]
        if node.op_type == "GatherElements" and map_name in producer and producer[map_name].op_type == "Expand":
            map_name = producer[map_name].input[0]  # the map broadcast to the logits' shape
        node = producer.get(node.input[0])
    if lowrank is not None and (gather is None or node is None or node.op_type not in ("MatMul", "MatMulNBits")
                                or activation_source(lowrank.p.input[0], producer) != activation_source(node.input[0], producer)):
        return find_head(model, _lowrank=False)  # not a VQ head's correction (it must read the codebook's hidden state)
    if node is None or node.op_type not in ("MatMul", "MatMulNBits"):
        raise VQExportError("graph: cannot find the output head (MatMul with a constant weight feeding 'logits')")
    if node.op_type == "MatMulNBits":  # ORT-native int8 codebook: weight and scales are its inputs
        names = _weight_names(node, producer, inits)
        names += [i for i in ([gather.input[1], map_name] if gather is not None else []) if i in inits and i not in names]
        if add is not None:
            names += [i for i in add.input if i in inits and i not in names]
        names += _lowrank_names(lowrank, producer, inits, names)
        names += sorted(n for n in inits if n.startswith("head.") and n not in names)
        return HeadNodes("vq" if gather is not None or topk else "dense", node, gather, add, names, map_name, lowrank)
    if _constant_sources(node.input[1], producer, inits) is None:
        raise VQExportError("graph: cannot find the output head (MatMul with a constant weight feeding 'logits')")
    names = _weight_names(node, producer, inits)
    if gather is not None:
        if map_name not in inits:
            raise VQExportError("graph: the head's Gather indices are not a constant map")
        names.append(map_name)
    if add is not None:
        names.extend(i for i in add.input if i in inits)
    names += _lowrank_names(lowrank, producer, inits, names)
    # weights and tables added by passes are named "head.*" (structural constants "head/...")
    names += sorted(n for n in inits if n.startswith("head.") and n not in names)
    return HeadNodes("vq" if gather is not None or topk else "dense", node, gather, add, names, map_name, lowrank)


def _lowrank_names(lowrank: LowRankNodes | None, producer: dict, inits: set, taken: list[str]) -> list[str]:
    if lowrank is None:
        return []
    out: list[str] = []
    for node in (lowrank.p, lowrank.u):
        out += [n for n in _weight_names(node, producer, inits) if n not in taken and n not in out]
    return out


def _constant_sources(name, producer, inits, quant_only=False):
    """Initializers behind ``name`` when it is a constant or a Q/DQ chain of constants (quant_only: just the
    Q/DQ parameters of an activation)."""
    if name in inits:
        return None if quant_only else [name]
    node = producer.get(name)
    if node is None or node.op_type not in ("DequantizeLinear", "QuantizeLinear"):
        return None
    params = [i for i in node.input[1:] if i in inits]
    if quant_only:
        rest = _constant_sources(node.input[0], producer, inits, quant_only=True) or []
        return params + [p for p in rest if p not in params]
    data = _constant_sources(node.input[0], producer, inits)
    return None if data is None else data + params


def head_copy(proto: onnx.ModelProto, need_vq: str | None = None) -> tuple[onnx.ModelProto, HeadNodes]:
    """A copy of ``proto`` to rewrite and its head; ``need_vq`` names the feature that requires a VQ head."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    head = find_head(out)
    if need_vq and head.kind != "vq":
        raise VQExportError(f"{need_vq} needs a VQ-Logits head")
    return out, head


def rename_tensors(proto: onnx.ModelProto, renames: dict[str, str]) -> None:
    """Rename initializers (and every node input and value_info that refers to them), in place."""
    taken = {t.name for t in proto.graph.initializer} - set(renames)
    for new in renames.values():
        if new in taken:
            raise RuntimeError(f"rename collides with an existing tensor name: {new}")
    for t in proto.graph.initializer:
        t.name = renames.get(t.name, t.name)
    for node in proto.graph.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
    for vi in proto.graph.value_info:
        vi.name = renames.get(vi.name, vi.name)


def prune_unused(proto: onnx.ModelProto) -> None:
    """Drop nodes whose outputs nobody reads, then unused initializers and stale value_info (in place)."""
    g = proto.graph
    outputs = {o.name for o in g.output}
    while True:
        used = {i for n in g.node for i in n.input} | outputs
        keep = [n for n in g.node if any(o in used for o in n.output)]
        if len(keep) == len(g.node):
            break
        del g.node[:]
        g.node.extend(keep)
    used = {i for n in g.node for i in n.input}
    inits = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(inits)
    live = {o for n in g.node for o in n.output} | {t.name for t in g.initializer}
    vis = [vi for vi in g.value_info if vi.name in live]
    del g.value_info[:]
    g.value_info.extend(vis)


def initializer_stats(model: onnx.ModelProto) -> dict[str, tuple[int, int]]:
    """name -> (elements, bytes) of every initializer."""
    out = {}
    for t in model.graph.initializer:
        n = int(np.prod(t.dims)) if len(t.dims) else 1
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        out[t.name] = (n, n * itemsize)
    return out


def op_histogram(model: onnx.ModelProto) -> dict[str, int]:
    c = Counter((f"{n.domain}::" if n.domain not in ("", "ai.onnx") else "") + n.op_type for n in model.graph.node)
    return dict(sorted(c.items(), key=lambda kv: (-kv[1], kv[0])))


def initializer_array(model: onnx.ModelProto, name: str) -> np.ndarray:
    for t in model.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    raise KeyError(name)
