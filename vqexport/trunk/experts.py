"""Mixture-of-experts layers on the portable trunk: each expert runs on the tokens routed to it, in standard ops.

transformers keeps a layer's experts stacked ([experts, out, in] tensors) and runs them with grouped matrix products
that ONNX has no operator for. Tracing a loop over the experts through torch.export costs about half a second per
expert and layer (its row counts are data-dependent), so the export leaves each experts layer as one placeholder
node, ``vqexport.RoutedExperts(hidden [tokens, d], top_k_index [tokens, k], top_k_weights [tokens, k])``, and
``expand_routed_experts`` then replaces it by a graph built here:

    routed, weight [tokens, experts]  <- which experts each token's top-k holds, and their routing weights
    for each expert e:   if any token chose e:              (an If: in a decode step, most experts are not chosen)
                           rows = NonZero(routed[:, e])           (the tokens routed to e)
                           y = expert(hidden[rows]; e's weights)  (transformers' computation of one expert, exported
                                                                   once per kind of experts layer)
                           out[rows] += y * weight[rows, e]       (Gather, Add, ScatterND)

Each expert's weights are initializers of their own (``<stacked name>.<e>``), so nothing gathers or copies weights
at run time, and an expert no token chose runs none of its nodes (about 20), only its If and the test before it.
Each NonZero has a data-dependent size: timed on onnxruntime's CPU runtime, run on OpenVINO's; never on a GPU.
"""

from __future__ import annotations

import contextlib
import types

import numpy as np
import onnx_ir as ir
import torch

from ..errors import VQExportError
from ..graph_io import same_constant

DOMAIN = "vqexport"
_ACTIVE: dict[int, torch.nn.Module] = {}  # layer -> experts module, while exportable_experts is open


def expert_modules(decoder: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """transformers' experts layers (those made by its ``use_experts_implementation``, which sets
    ``_is_expert_parallel``), with their names in ``decoder``."""
    return [(name, m) for name, m in decoder.named_modules() if hasattr(m, "_is_expert_parallel")]


def _projections(module) -> tuple[str, str]:
    return ("gate_up_proj" if module.has_gate else "up_proj"), "down_proj"


@torch.library.custom_op("vqexport::routed_experts", mutates_args=())
def routed_experts(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                   layer: int) -> torch.Tensor:
    """The experts layer ``layer`` of the module being exported (transformers' own computation)."""
    module = _ACTIVE[layer]
    return type(module).forward(module, hidden, top_k_index, top_k_weights)


@routed_experts.register_fake
def _(hidden, top_k_index, top_k_weights, layer):
    return torch.empty_like(hidden)


def _schema():
    """The placeholder's ONNX schema, which the exporter's graph builder asks for (registered once)."""
    import onnx

    if not onnx.defs.has("RoutedExperts", DOMAIN):
        param = onnx.defs.OpSchema.FormalParameter
        onnx.defs.register_schema(onnx.defs.OpSchema(
            "RoutedExperts", DOMAIN, 1,
            inputs=[param("hidden", "T"), param("top_k_index", "I"), param("top_k_weights", "T")],
            outputs=[param("out", "T")],
            type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], ""),
                              ("I", ["tensor(int64)"], "")],
            attributes=[onnx.defs.OpSchema.Attribute("layer", onnx.defs.OpSchema.AttrType.INT, "")]))


def _placeholder(hidden, top_k_index, top_k_weights, layer: int):
    from onnxscript.values import Opset

    _schema()
    return Opset(DOMAIN, 1).RoutedExperts(hidden, top_k_index, top_k_weights, layer=layer)


TRANSLATIONS = {torch.ops.vqexport.routed_experts.default: _placeholder}


def _check(name: str, m: torch.nn.Module, where) -> None:
    def refuse(why: str):
        raise VQExportError(f"{where}: the experts layer {name} ({type(m).__name__}) {why}; vqexport exports "
                            "transformers' stacked experts only")

    from transformers.integrations.moe import _default_apply_gate

    n = getattr(m, "num_experts", None)
    if not isinstance(n, int):
        refuse("has no num_experts")
    for t in _tensor_names(m):
        tensor = getattr(m, t, None)
        if not isinstance(tensor, torch.Tensor):
            refuse(f"has no {t} of stacked expert weights")
        if tensor.shape[0] != n:
            refuse(f"stacks {tensor.shape[0]} experts in {t}, not its num_experts {n}")
    if not m.is_concatenated and m.has_gate and getattr(type(m), "_apply_gate", None) is _default_apply_gate:
        refuse("interleaves its gate and up projections without a gate function of its own")


@contextlib.contextmanager
def exportable_experts(decoder: torch.nn.Module, where):
    """Inside the block, ``decoder``'s experts layers are the placeholder op (numbered in module order). Yields the
    modules, for ``expand_routed_experts``."""
    modules = expert_modules(decoder)
    for name, m in modules:
        _check(name, m, where)
    saved = [vars(m).get("forward") for _, m in modules]
    for i, (_, m) in enumerate(modules):
        _ACTIVE[i] = m
        m.forward = types.MethodType(lambda self, h, idx, w, _i=i: routed_experts(h, idx, w, _i), m)
    try:
        yield modules
    finally:
        for i, ((_, m), forward) in enumerate(zip(modules, saved)):
            if forward is None:
                del m.forward
            else:
                m.forward = forward
            _ACTIVE.pop(i, None)


class _OneExpert(torch.nn.Module):
    """One expert of ``module`` with its weights as inputs: ``module``'s own gate, activation and post-norm."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x, w0, w1, w2=None, w3=None):
        m = self.module
        weights = [w for w in (w0, w1, w2, w3) if w is not None]
        y = x
        for i in range(len(_projections(m))):  # the up (or gate and up) projection, then the down projection
            w = weights.pop(0)
            y = y @ w if m.is_transposed else torch.nn.functional.linear(y, w)
            if m.has_bias:
                y = y + weights.pop(0)
            if i == 0:
                y = m._apply_gate(y) if m.has_gate else m.act_fn(y)
        if m.has_post_expert_norm:
            y = m.post_expert_norm(y)
        return y


def _body_key(module) -> tuple:
    """Experts layers with equal keys compute alike: same class, config, shapes, settings and submodules (the
    activation), and no parameters or buffers of their own beside the stacked weights (a post-expert norm has)."""
    names = _tensor_names(module)
    own = [n for n, _ in module.named_parameters() if n not in names] + [n for n, _ in module.named_buffers()]
    if own:
        return (id(module),)
    shapes = tuple((tuple(getattr(module, n).shape), getattr(module, n).dtype) for n in names)
    settings = tuple(sorted((k, repr(v)) for k, v in vars(module).items()
                            if not k.startswith("_") and k != "config" and not isinstance(v, torch.Tensor)))
    children = tuple((n, repr(c)) for n, c in module.named_children())
    return (type(module), id(module.config), shapes, settings, children)


def _tensor_names(module) -> list[str]:
    """The stacked [experts, ...] tensors an expert reads, in the order of its computation."""
    return [n for p in _projections(module) for n in ((p, f"{p}_bias") if module.has_bias else (p,))]


def _export_expert(module, opset: int) -> ir.Graph:
    from torch.export import Dim

    weights = [getattr(module, n)[0].detach() for n in _tensor_names(module)]
    x = torch.zeros(3, weights[0].shape[0 if module.is_transposed else 1], dtype=weights[0].dtype)
    args = (x, *weights)
    dynamic = {"x": {0: Dim("rows")}, **{f"w{i}": None for i in range(len(weights))}}
    with torch.no_grad():
        program = torch.onnx.export(_OneExpert(module).eval(), args, dynamic_shapes=dynamic, opset_version=opset,
                                    dynamo=True, optimize=True, verbose=False)
    model = program.model
    others = {n.domain for n in model.graph.all_nodes()} - {"", "ai.onnx"}
    if others or model.functions or len(model.graph.inputs) != len(args) or len(model.graph.outputs) != 1:
        raise VQExportError(f"one expert of {type(module).__name__} exports to a graph of other operator domains "
                            f"({', '.join(sorted(others)) or 'functions'}) or other inputs than its rows and weights")
    return model.graph


_OUTPUT_TYPES = {"Equal": ir.DataType.BOOL, "Greater": ir.DataType.BOOL, "Shape": ir.DataType.INT64,
                 "NonZero": ir.DataType.INT64, "ConstantOfShape": ir.DataType.FLOAT}


class _Builder:
    """Nodes inserted before ``anchor`` in ``graph`` (or, inside ``branch()``, collected for a subgraph), named
    ``<nodes>/<op>_<count>``; initializers ``<prefix>.<name>`` (always the main graph's)."""

    def __init__(self, graph: ir.Graph, anchor: ir.Node, prefix: str, nodes: str):
        self.graph, self.anchor, self.prefix, self.nodes, self.count = graph, anchor, prefix, nodes, 0
        self.collected: list[ir.Node] | None = None

    def emit(self, node: ir.Node) -> None:
        if self.collected is not None:
            self.collected.append(node)
        else:
            self.graph.insert_before(self.anchor, node)

    @contextlib.contextmanager
    def branch(self):
        """The nodes made inside go to the list yielded, for a subgraph, instead of into the graph."""
        outer, self.collected = self.collected, []
        try:
            yield self.collected
        finally:
            self.collected = outer

    def when(self, condition: ir.Value, then: list[ir.Node], result: ir.Value, otherwise: ir.Value) -> ir.Value:
        """``If(condition)``: ``then``'s nodes giving ``result``, else ``otherwise`` unchanged."""
        keep = ir.node("Identity", [otherwise], name=self.name("Identity"))
        keep.outputs[0].name, keep.outputs[0].type = keep.name, otherwise.type
        branches = {"then_branch": ir.Graph([], [result], nodes=then, name=self.name("then")),
                    "else_branch": ir.Graph([], [keep.outputs[0]], nodes=[keep], name=self.name("else"))}
        node = ir.node("If", [condition], attributes=branches, name=self.name("If"))
        node.outputs[0].name, node.outputs[0].type = node.name, otherwise.type
        self.emit(node)
        return node.outputs[0]

    def name(self, what: str) -> str:
        self.count += 1
        return f"{self.nodes}/{what}_{self.count}"

    def op(self, op_type: str, *inputs, **attributes) -> ir.Value:
        """One node; its output typed (the fp16 pass reads types): ``to`` for a Cast, else by the op."""
        node = ir.node(op_type, list(inputs), attributes=attributes, name=self.name(op_type))
        out = node.outputs[0]
        out.name = node.name
        dtype = _OUTPUT_TYPES.get(op_type) or attributes.get("to") or inputs[-1 if op_type == "CastLike" else 0].dtype
        out.type = ir.TensorType(ir.DataType(dtype))
        self.emit(node)
        return node.outputs[0]

    def const(self, name: str, array: np.ndarray) -> ir.Value:
        return _initializer(self.graph, f"{self.prefix}.{name}", array)

    def inline(self, body: ir.Graph, inputs: list[ir.Value], tag: str, shared: dict[str, ir.Value]) -> ir.Value:
        """A copy of ``body`` on ``inputs``; its initializers are shared through ``shared`` (by name)."""
        clone = body.clone()
        mapping = {}
        for name, v in list(clone.initializers.items()):
            if name not in shared:
                shared[name] = self.const(f"expert.{name}", v.const_value.numpy())
            mapping[v] = shared[name]
        for v, outer in zip(clone.inputs, inputs):
            mapping[v] = outer
        for v, outer in mapping.items():
            ir.convenience.replace_all_uses_with(v, outer)
        result = clone.outputs[0]
        clone.inputs.clear()  # the copy's values leave it: none stays its input or output
        clone.outputs.clear()
        for node in list(clone):
            clone.remove(node)
            node.name = self.name(f"{tag}/{node.op_type}")
            for out in node.outputs:  # no shapes: each expert's row count is its own, not the body's one "rows"
                out.name = node.name if len(node.outputs) == 1 else f"{node.name}:{out.index()}"
                out.shape = None
            self.emit(node)
        return result


def expand_routed_experts(model: ir.Model, modules: list[tuple[str, torch.nn.Module]], prefix: str,
                          opset: int) -> None:
    """Replace each ``vqexport.RoutedExperts`` node of ``model`` by its experts (module docstring). ``prefix`` is the
    decoder's name in the checkpoint (``model``), for the weights' names."""
    graph = model.graph
    bodies: dict = {}
    placeholders = [n for n in graph if n.domain == DOMAIN and n.op_type == "RoutedExperts"]
    calls: dict[int, int] = {}
    for node in placeholders:
        layer = node.attributes["layer"].as_int()
        name, module = modules[layer]
        base = f"{prefix}.{name}" if prefix else name
        calls[layer] = calls.get(layer, 0) + 1  # a layer called twice shares its weights, not its nodes' names
        key = _body_key(module)
        if key not in bodies:
            bodies[key] = _export_expert(module, opset)
        hidden, top_k_index, top_k_weights = node.inputs
        b = _Builder(graph, node, base, base if calls[layer] == 1 else f"{base}#{calls[layer]}")
        n = module.num_experts
        last, axis1 = b.const("axis_last", np.array([-1], np.int64)), b.const("axis_1", np.array([1], np.int64))
        chosen = b.op("Cast", b.op("Equal", b.op("Unsqueeze", top_k_index, last),
                                   b.const("expert_ids", np.arange(n, dtype=np.int64))), to=ir.DataType.FLOAT)
        zero = b.const("zero", np.array(0, np.float32))
        routed = b.op("Greater", b.op("ReduceSum", chosen, axis1, keepdims=0), zero)
        weights = b.op("Unsqueeze", b.op("Cast", top_k_weights, to=ir.DataType.FLOAT), last)
        weight = b.op("CastLike", b.op("ReduceSum", b.op("Mul", chosen, weights), axis1, keepdims=0), hidden)
        out = b.op("ConstantOfShape", b.op("Shape", hidden))
        tokens = b.op("ReduceSum", b.op("Cast", routed, to=ir.DataType.FLOAT), b.const("axis_0", np.array([0], np.int64)),
                      keepdims=0)  # [experts]: how many tokens each expert got
        shared: dict[str, ir.Value] = {}
        for e in range(n):
            index = b.const(f"index.{e}", np.array(e, np.int64))
            # an expert no token chose runs none of its nodes (in a decode step, most of them)
            chosen_by_any = b.op("Greater", b.op("Gather", tokens, index, axis=0), zero)
            with b.branch() as then:
                rows = b.op("Reshape", b.op("NonZero", b.op("Gather", routed, index, axis=1)), last)
                x = b.op("Gather", hidden, rows, axis=0)
                tensors = [_initializer(graph, f"{base}.{t}.{e}", getattr(module, t)[e].detach().float().numpy())
                           for t in _tensor_names(module)]
                y = b.inline(bodies[key], [x, *tensors], f"expert{e}", shared)
                w = b.op("Unsqueeze", b.op("Gather", b.op("Gather", weight, index, axis=1), rows, axis=0), axis1)
                # NonZero gives each token once (an expert it chose twice has both weights summed), so the rows are
                # distinct: gather, add, scatter (ScatterND's reduction would do it in one node, but onnxruntime's
                # CPU kernel has no fp16 form of it)
                y = b.op("Add", b.op("Gather", out, rows, axis=0), b.op("Mul", y, w))
                added = b.op("ScatterND", out, b.op("Unsqueeze", rows, axis1), y)
            out = b.when(chosen_by_any, then, added, out)
        result = node.outputs[0]
        output_name = result.name if result.is_graph_output() else None
        ir.convenience.replace_all_uses_with(result, out, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        if output_name is not None:  # the layer's output is the graph's (a graph of one experts layer)
            out.name = output_name
    if placeholders:
        model.opset_imports.pop(DOMAIN, None)


def unwrap_experts(model: ir.Model) -> int:
    """Each expert's ``If`` replaced by its then-branch, run unconditionally (the graph before the experts had their
    Ifs): for runtimes whose tools do not look into branches (NNCF compresses no weight inside one; TensorRT's
    readiness check reads the top-level graph). Returns how many were replaced."""
    graph, count = model.graph, 0
    for node in [n for n in graph if n.op_type == "If" and ".experts" in (n.name or "") and "/If_" in n.name]:
        then = node.attributes["then_branch"].as_graph()
        result = then.outputs[0]
        then.outputs.clear()
        for inner in list(then):
            then.remove(inner)
            graph.insert_before(node, inner)
        out = node.outputs[0]
        name, out.name = out.name, None
        result.name = name
        out.replace_all_uses_with(result, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        count += 1
    return count


def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """The initializer ``name`` of ``graph``: ``array``, registered unless a call before registered it
    (``graph_io.same_constant``)."""
    existing = same_constant(graph, name, array)
    if existing is not None:
        return existing
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
    value.shape, value.type = value.const_value.shape, ir.TensorType(value.const_value.dtype)
    graph.register_initializer(value)
    return value
