"""The decoder graph's I/O contract (the names Optimum and onnxruntime-genai use) and ONNX-only facts about a
saved graph. No torch here: the app-side path (runners, generate, inspect) uses this module.

    inputs   input_ids [batch_size, sequence_length], attention_mask [batch_size, total_sequence_length],
             past_key_values.{i}.key|value [batch_size, n_kv_heads, past_sequence_length, head_dim]
    outputs  logits [batch_size, sequence_length, V] (or the top-k outputs), present.{i}.key|value
             [batch_size, n_kv_heads, total_sequence_length, head_dim]

One past/present pair per layer that keeps keys and values of its own (layers that read another layer's, as
Gemma 4's last ``num_kv_shared_layers`` do, have none); each pair has its layer's n_kv_heads and head_dim. A layer's
cache shape is ``(n_kv_heads, head_dim)``, or ``(n_kv_heads, key_dim, value_dim)`` where its values have a size of
their own (the latent cache of multi-head latent attention: DeepSeek-V3, MiniCPM3).

Inside every joined graph the trunk's final hidden state (times the model's logit scale, ``Trunk.hidden_scale``) is
the value ``hidden_states``; the head's initializers are named ``head.*`` and its nodes ``head/*``.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx

from .errors import VQExportError

if TYPE_CHECKING:
    import onnx_ir as ir

BATCH, SEQ, PAST, TOTAL = "batch_size", "sequence_length", "past_sequence_length", "total_sequence_length"
HIDDEN = "hidden_states"
HEAD_PREFIX = "head."
HEAD_NODE_PREFIX = "head/"

INPUT_AXES = {"input_ids": {0: BATCH, 1: SEQ}, "attention_mask": {0: BATCH, 1: TOTAL}}
PAST_AXES = {0: BATCH, 2: PAST}
PER_POSITION_AXES = {0: BATCH, 1: SEQ}
PRESENT_AXES = {0: BATCH, 2: TOTAL}
PER_POSITION_OUTPUTS = ("logits", "topk_ids", "topk_logprobs", "cluster_logprobs", HIDDEN)


def cache_dims(shape) -> tuple[int, int, int]:
    """(n_kv_heads, key_dim, value_dim) of a layer's cache shape, (n_kv_heads, head_dim) or all three."""
    heads, key, *value = (int(v) for v in shape)
    return heads, key, value[0] if value else key


def cache_shape(heads: int, key: int, value: int) -> tuple[int, ...]:
    """A layer's cache shape as the geometry and the runners keep it: two sizes where keys and values share one."""
    return (heads, key) if key == value else (heads, key, value)


def cache_shapes(layers: int, dims) -> list[tuple[int, ...]]:
    """The cache shape of each of ``layers`` layers, from ``dims(input name)``: (heads, size) of a past input."""
    return [cache_shape(*dims(past_name(i, "key")), dims(past_name(i, "value"))[1]) for i in range(layers)]


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
        if vi.name in PER_POSITION_OUTPUTS:
            out[vi.name] = PER_POSITION_AXES
        elif vi.name.startswith("present."):
            out[vi.name] = PRESENT_AXES
    return out


def check_dynamic_axes(model: onnx.ModelProto, last_position_only: bool = False) -> None:
    """Fail if any batch or sequence axis of the decoder's inputs/outputs was fixed to a number."""
    axes = expected_axes(model)
    for vi in list(model.graph.input) + list(model.graph.output):
        if vi.name not in axes:
            continue
        dims = dims_of(vi)
        for axis, name in axes[vi.name].items():
            got = dims[axis] if axis < len(dims) else None
            if last_position_only and name == SEQ and vi.name in PER_POSITION_OUTPUTS:
                name = 1
            if got != name:
                raise VQExportError(
                    f"exported graph: axis {axis} of {vi.name!r} is {got!r}, expected the dynamic axis {name!r} "
                    "(the exporter fixed a dimension that must stay dynamic)"
                )
    names = {vi.name for vi in model.graph.input}
    if not {"input_ids", "attention_mask"} <= names:
        raise VQExportError("exported graph: inputs must include input_ids and attention_mask")


def all_graphs(graph: onnx.GraphProto):
    """The graph and every subgraph in it (an If's branches: a mixture of experts' experts)."""
    yield graph
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from all_graphs(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    yield from all_graphs(g)


def all_nodes(graph: onnx.GraphProto):
    """The nodes of the graph and of every subgraph in it."""
    for g in all_graphs(graph):
        yield from g.node


def initializer_stats(model: onnx.ModelProto) -> dict[str, tuple[int, int]]:
    """name -> (elements, bytes) of every initializer (read from its dims: external data need not be loaded). A
    weight onnxruntime's MatMulNBits or GatherBlockQuantized reads packed in bytes counts its values: 8 / bits per
    byte."""
    packed = {}
    for node in all_nodes(model.graph):
        if node.domain == "com.microsoft" and node.op_type in ("MatMulNBits", "GatherBlockQuantized"):
            bits = next((a.i for a in node.attribute if a.name == "bits"), 4)
            packed[node.input[1 if node.op_type == "MatMulNBits" else 0]] = bits
    out = {}
    for t in model.graph.initializer:
        n = int(np.prod(t.dims)) if len(t.dims) else 1
        if t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
            nbytes = (n + 1) // 2
        else:
            nbytes = n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        if t.name in packed and t.data_type == onnx.TensorProto.UINT8:
            n = nbytes * 8 // packed[t.name]
        out[t.name] = (n, nbytes)
    return out


def op_histogram(model: onnx.ModelProto) -> dict[str, int]:
    c = Counter((f"{n.domain}::" if n.domain not in ("", "ai.onnx") else "") + n.op_type for n in all_nodes(model.graph))
    return dict(sorted(c.items(), key=lambda kv: (-kv[1], kv[0])))


def attention_windows(model: onnx.ModelProto) -> list[int]:
    """The ``local_window_size`` of each GroupQueryAttention node (-1: no window), in graph order."""
    return [a.i for n in model.graph.node if n.op_type == "GroupQueryAttention" for a in n.attribute
            if a.name == "local_window_size"]


def load_graph(path, load_weights: bool = False) -> onnx.ModelProto:
    """A saved model.onnx; by default without its external weights (enough for names, shapes and small constants)."""
    try:
        return onnx.load(str(path), load_external_data=load_weights)
    except Exception as e:  # onnx raises DecodeError / OSError variants
        raise VQExportError(f"{path}: cannot read ONNX model ({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})") from None


def check_external_data(model: onnx.ModelProto, path: Path) -> None:
    """Every file the graph's initializers keep their data in (beside ``path``) is there and long enough for them (the
    offsets and lengths in the graph; nothing is read): one line if not, such as a truncated copy of model.onnx.data."""
    need: dict[str, int] = {}
    for t in model.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        end = int(info.get("offset", 0) or 0) + int(info.get("length", 0) or 0)
        need[info.get("location", "")] = max(need.get(info.get("location", ""), 0), end)
    for location, end in sorted(need.items()):
        f = Path(path).parent / location
        if not f.is_file():
            raise VQExportError(f"{f}: missing; {Path(path).name} keeps its weights there")
        size = f.stat().st_size
        if size < end:
            raise VQExportError(f"{f}: {size:,} bytes, and {Path(path).name}'s weights reach byte {end:,}: the file is "
                                "truncated")


def metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


_ID_PASSTHROUGH = ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Cast", "Identity")  # the same ids, another shape


def same_constant(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value | None:
    """The initializer ``name`` of ``graph`` when it already holds ``array`` (a builder asking twice for one constant
    gets it once), None when there is none. A name holding another value (numbers, shape or type) is an error, not
    a silent reuse: two constants named alike would make a wrong graph."""
    if name not in graph.initializers:
        return None
    existing = graph.initializers[name]
    held = existing.const_value.numpy() if existing.const_value is not None else None
    if held is None or held.dtype != array.dtype or held.shape != array.shape or not np.array_equal(held, array):
        raise ValueError(f"initializer {name!r} already holds another value")
    return existing


def embedding_lookup(graph: ir.Graph) -> ir.Node | None:
    """The trunk's embedding lookup of input_ids (Gather, or GatherBlockQuantized on a quantized table), if any."""
    return next((n for n in graph if n.op_type in ("Gather", "GatherBlockQuantized")
                 and n.inputs[1] is not None and _reads_input_ids(n.inputs[1])), None)


def _reads_input_ids(value: ir.Value) -> bool:
    """Is ``value`` the graph input ``input_ids``, or those ids reshaped or cast (its first input, op by op)?"""
    while value.name != "input_ids":
        node = value.producer()
        if node is None or node.op_type not in _ID_PASSTHROUGH or not node.inputs or node.inputs[0] is None:
            return False
        value = node.inputs[0]
    return value.producer() is None
