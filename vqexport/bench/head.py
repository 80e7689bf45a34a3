"""``bench --head``: the output layer alone, batch 1, one decode step, through onnxruntime on this CPU.

Variants per head shape (random weights, seeded): dense fp32 MatMul; dense int8 (per-row int8 weights,
the fair baseline for int8); VQ fp32 and VQ int8, fused, and exact top-k (k=50, int8 codebook), each the graph
the head builder puts into artifacts (vqexport.head.graph). Both forms of the V-wide selection (Gather,
Expand + GatherElements) are measured, so the faster portable form is chosen by measurement. Reports medians, bytes each variant must move, and the fraction of the
machine's measured copy bandwidth that reaches.

With a rank-r correction (r = 8 by default): the logits path (codebook + bias + (h·Pᵀ)·Uᵀ, fp32, int8 QDQ and
int8 MatMulNBits), the exact top-k graph (TopK over the V logits), and the exact top-k by per-cluster bounds
(vqexport.head.decoding.lowrank_topk: a graph computing z and h·Pᵀ, then numpy). U is drawn with std 0.05, so the
correction's spread is about a seventh of the codebook logits' (the bound method's cost depends on that ratio).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..head.decoding import cluster_tables
from ..head.quant import quantize_rows
from .timing import copy_bandwidth, machine, time_calls

SHAPES = {
    "gpt2": (50257, 768, 1024),
    "qwen2.5-0.5b": (151936, 896, 2048),
    "llama-3.2-1b": (128256, 2048, 2048),
    "gemma-3-1b": (262144, 1152, 2048),  # the largest vocabulary of the set (not in the default run)
    "gemma-3-270m": (262144, 640, 2048),  # the same vocabulary, narrower (not in the default run)
    "tiny": (4099, 64, 256),  # a quick smoke shape (not in the default set)
}
TOPK = 50
RANK = 8
U_STD = 0.05


@dataclass
class Variant:
    name: str
    model: onnx.ModelProto
    bytes_moved: int
    session_config: dict
    data: dict | None = None  # what a numpy stage timed after the graph needs (the bound method's tables)


def _model(nodes, inits, outputs) -> onnx.ModelProto:
    d = next(t for t in inits if t.name in ("w_t", "w_q")).dims[0]
    graph = helper.make_graph(nodes, "head", [helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, 1, d])], outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _logits_out(V):
    return [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 1, V])]


def _head(head, w=None, **form) -> onnx.ModelProto:
    """The head builder's graph for ``form`` (the same nodes an artifact gets), input renamed ``h``; ``w``: the
    dense rows a two-stage head rescores with."""
    import onnx_ir as ir

    from ..head.graph import HeadForm, head_model

    proto = ir.to_proto(head_model(head, HeadForm(**form), batch=1, seq=1, rows=w))
    proto.graph.input[0].name = "h"
    for node in list(proto.graph.node) + [n for f in proto.functions for n in f.node]:
        for i, name in enumerate(node.input):
            if name == "hidden_states":
                node.input[i] = "h"
    return proto


def lowrank_factors(V: int, d: int, rank: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """P_t [d, r] with unit-norm columns and U_t [r, V] with std U_STD (see the module docstring)."""
    p = rng.standard_normal((d, rank), dtype=np.float32)
    p /= np.linalg.norm(p, axis=0, keepdims=True)
    return p, (rng.standard_normal((rank, V), dtype=np.float32) * U_STD)


def _lowrank_variants(head, rank, rng, base_bytes) -> list[Variant]:
    from ..head.spec import make_head

    K, d = head.codebook.shape
    V = head.map.shape[0]
    p_t, u_t = lowrank_factors(V, d, rank, rng)
    lr = make_head({**head.tensors, "lowrank_p": np.ascontiguousarray(p_t.T), "lowrank_u": np.ascontiguousarray(u_t.T)})
    lr_fp32 = 4 * (K * d + d * rank + rank * V)
    lr_int8 = K * d + d * rank + rank * V + 4 * (K + rank + V)
    tag = f"r{rank}"
    qdq = _head(lr, codebook="int8")
    out = [Variant(f"vq_{tag}_gather_elements", _head(lr), lr_fp32 + base_bytes, {}),
           Variant(f"vq_{tag}_int8_native", _head(lr, codebook="int8", int8_encoding="native"), lr_int8 + base_bytes, {})]
    for level in ("0", "4"):
        out.append(Variant(f"vq_{tag}_int8_acc{level}", qdq, lr_int8 + base_bytes, {"session.qdq_matmulnbits_accuracy_level": level}))
    topk = _head(lr, codebook="int8", int8_encoding="native", decode="topk", k=TOPK)
    out.append(Variant(f"topk_{tag}_logits_int8", topk, lr_int8 + base_bytes, {}))
    # the bound method's graph part: z and h·Pᵀ only (K + r values leave the graph)
    scores = _head(lr, codebook="int8", int8_encoding="native")
    producer = {o: n for n in scores.graph.node for o in n.output}
    z = producer[next(n.output[0] for n in scores.graph.node if n.name == "head/codebook/MatMulNBits")].output[0]
    proj = next(n.output[0] for n in scores.graph.node if n.name == "head/lowrank_p/MatMulNBits")
    del scores.graph.output[:]
    scores.graph.output.extend([helper.make_tensor_value_info(z, TensorProto.FLOAT, [1, 1, K]),
                                helper.make_tensor_value_info(proj, TensorProto.FLOAT, [1, 1, rank])])
    _prune(scores)
    out.append(Variant(f"scores_{tag}_int8", scores, K * d + d * rank + 4 * (K + rank) + 4 * d, {},
                       {"mapping": head.map, "bias": head.bias, "u": u_t.T, "outputs": [z, proj]}))
    return out


def _prune(proto: onnx.ModelProto) -> None:
    """Drop nodes nobody reads (then unused initializers)."""
    g = proto.graph
    while True:
        used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
        keep = [n for n in g.node if any(o in used for o in n.output)]
        if len(keep) == len(g.node):
            break
        del g.node[:]
        g.node.extend(keep)
    used = {i for n in g.node for i in n.input}
    inits = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(inits)


def _dense_nbits(w: np.ndarray, bits: int) -> onnx.ModelProto:
    """The dense head as ONNX Runtime's MatMulNBits (block 32, accuracy level 4): the builder's int4 / int8 lm_head."""
    import onnx_ir as ir

    from ..head.graph import HeadForm, _Builder

    V, d = w.shape
    h = ir.Value(name="h", shape=ir.Shape([1, 1, d]), type=ir.TensorType(ir.DataType.FLOAT))
    graph = ir.Graph(inputs=[h], outputs=[], nodes=[], opset_imports={"": 18}, name="dense")
    b = _Builder(graph, HeadForm(codebook=f"int{bits}", int8_encoding="native"), None)
    out = b._matmul_nbits(h, np.ascontiguousarray(w.T), "w", bits)
    out.name = "logits"
    graph.outputs.append(out)
    graph.opset_imports.update(b.domains)
    return ir.to_proto(ir.Model(graph, ir_version=10))


TWO_STAGE_ROWS = ("fp32", "int8", "int4")


def _two_stage_variants(V: int, d: int, w: np.ndarray, rng, h_bytes: int, out_bytes: int) -> list[Variant]:
    """A two-stage head over the dense rows ``w``: K = V/16 equal clusters of 16, stage 1 an int4 codebook, stage 2
    at P = K/32 and K/16 in each row form (fp32 Gather, int8 copy + MatMulInteger, int4 GatherBlockQuantized)."""
    from ..head.spec import make_head

    K = max(1, V // 16)
    members = rng.permutation(V).astype(np.int32)
    cap = -(-V // K)
    table = np.full(K * cap, -1, np.int32)
    table[:V] = members
    table = table.reshape(cap, K).T.copy()  # cluster k holds every K-th token of the permutation: sizes differ by <= 1
    c = rng.standard_normal((K, d), dtype=np.float32) * d**-0.5
    out = []
    for P in (max(1, K // 32), max(1, K // 16)):
        head = make_head({"codebook": c, "members": table, "bias": rng.standard_normal(V, dtype=np.float32)}, probes=P)
        n = P * cap
        stage1 = K * d // 2 + 8 * V + out_bytes + h_bytes
        for rows in TWO_STAGE_ROWS:
            nbytes = stage1 + n * d * {"fp32": 4, "int8": 1, "int4": 0.5}[rows] + n * 8
            out.append(Variant(f"two_stage_P{P}_{rows}", _head(head, codebook="int4", int8_encoding="native", rows=rows, w=w),
                               int(nbytes), {}))
    return out


def build_variants(V: int, d: int, K: int, seed: int = 0, forms=("gather", "gather_elements"), rank: int = RANK,
                   two_stage: bool = True) -> list[Variant]:
    from ..head.spec import make_head

    rng = np.random.default_rng(seed)
    n = helper.make_node
    h_bytes = 4 * d
    out_bytes = 4 * V
    variants = []

    w = rng.standard_normal((V, d), dtype=np.float32) * d**-0.5
    dense = _model([n("MatMul", ["h", "w_t"], ["logits"])], [numpy_helper.from_array(np.ascontiguousarray(w.T), "w_t")], _logits_out(V))
    variants.append(Variant("dense", dense, 4 * V * d + h_bytes + out_bytes, {}))
    variants.append(Variant("dense_int4_nbits", _dense_nbits(w, 4), V * d // 2 + 4 * V * d // 32 + h_bytes + out_bytes, {}))
    variants.append(Variant("dense_int8_nbits", _dense_nbits(w, 8), V * d + 4 * V * d // 32 + h_bytes + out_bytes, {}))
    if two_stage:
        variants += _two_stage_variants(V, d, w, rng, h_bytes, out_bytes)
    wq, ws = quantize_rows(w)
    del w
    dq_inits = [numpy_helper.from_array(np.ascontiguousarray(wq.T), "w_q"), numpy_helper.from_array(ws, "w_s"),
                numpy_helper.from_array(np.zeros(V, np.int8), "w_zp")]
    dense8 = _model([n("DequantizeLinear", ["w_q", "w_s", "w_zp"], ["w_t"], axis=1), n("MatMul", ["h", "w_t"], ["logits"])],
                    dq_inits, _logits_out(V))
    del wq
    for level in ("0", "4"):
        variants.append(Variant(f"dense_int8_acc{level}", dense8, V * d + 4 * V + h_bytes + out_bytes,
                                {"session.qdq_matmulnbits_accuracy_level": level}))

    c = rng.standard_normal((K, d), dtype=np.float32) * d**-0.5
    mapping = rng.permutation(np.concatenate([np.arange(K), rng.integers(0, K, V - K)])).astype(np.int32)
    bias = rng.standard_normal(V, dtype=np.float32)
    head = make_head({"codebook": c, "map": mapping, "bias": bias})
    table_bytes = 4 * V + 4 * V  # map (int32) + bias
    for form in forms:
        extra = 8 * V if form == "gather_elements" else 0
        variants.append(Variant(f"vq_{form}", _head(head, select=form), 4 * K * d + table_bytes + extra + h_bytes + out_bytes, {}))
        q = _head(head, select=form, codebook="int8")
        if form == "gather_elements":  # the ORT-native encoding: MatMulNBits (bits=8) in the graph itself
            variants.append(Variant("vq_int8_native_gather_elements", _head(head, select=form, codebook="int8", int8_encoding="native"),
                                    K * d + 4 * K + table_bytes + extra + h_bytes + out_bytes, {}))
        for level in ("0", "4"):
            variants.append(Variant(f"vq_int8_{form}_acc{level}", q, K * d + 4 * K + table_bytes + extra + h_bytes + out_bytes,
                                    {"session.qdq_matmulnbits_accuracy_level": level}))

    nbytes = 4 * K * d + table_bytes + h_bytes + out_bytes
    fused = _head(head, fused=True)
    variants += [Variant("fused_kernel", fused, nbytes, {"vqexport.custom_ops": "onnxruntime-extensions"}),
                 Variant("fused_function", fused, nbytes, {})]
    if rank:
        variants += _lowrank_variants(head, rank, rng, table_bytes + 8 * V + h_bytes + out_bytes)
    t = cluster_tables(mapping, bias, K, width=TOPK)
    topk = _head(head, codebook="int8", decode="topk", k=TOPK)
    for level in ("0", "4"):
        w_tab = t.members.shape[1]
        variants.append(Variant(f"topk_int8_acc{level}", topk, K * d + 4 * K + 3 * 4 * K + 12 * K * w_tab + h_bytes,
                                {"session.qdq_matmulnbits_accuracy_level": level}))
    return variants


def _lowrank_timing(V, d, K, rank, timed, sessions, h, min_seconds, details, name, bandwidth) -> dict:
    """Rows for the rank-r head, and the bound method's numpy part timed on the scores graph's own outputs."""
    from ..head.decoding import cluster_tables, lowrank_tables, lowrank_topk

    tag = f"r{rank}"
    sess, data = sessions[f"scores_{tag}_int8"]
    tables = cluster_tables(data["mapping"], data["bias"], K, width=1)
    lr = lowrank_tables(data["mapping"], data["bias"], data["u"], tables)
    z, proj = sess.run(data["outputs"], {"h": h})
    stats = {}

    def prune():
        found = lowrank_topk(z[0, 0], proj[0, 0], tables, lr, TOPK, logprobs=False)[2]
        stats.update(clusters_visited=found["clusters_visited"], tokens_scored=found["tokens_scored"])

    prune_s = float(np.median(time_calls(prune, min_seconds=min_seconds)))
    nbytes = 2 * 8 * K * rank + stats["tokens_scored"] * (8 * rank + 8 + 8 + 4)  # bounds, then U rows, bias, ids, map
    details.append({"shape": name, "variant": f"prune_{tag}_numpy", "ms": prune_s * 1e3, "bytes": nbytes,
                    "bandwidth_fraction": nbytes / prune_s / bandwidth})
    vq_r = min((v, k) for k, v in timed.items() if k.startswith(f"vq_{tag}_"))
    vq_r_fp32 = timed[f"vq_{tag}_gather_elements"]
    pruned = timed[f"scores_{tag}_int8"] + prune_s
    return {"rank": rank, "vq_lowrank_ms": vq_r_fp32 * 1e3, "vq_lowrank_speedup": timed["dense"] / vq_r_fp32,
            "vq_lowrank_best_ms": vq_r[0] * 1e3, "vq_lowrank_best_form": vq_r[1], "vq_lowrank_best_speedup": timed["dense"] / vq_r[0],
            "topk_lowrank_logits_ms": timed[f"topk_{tag}_logits_int8"] * 1e3,
            "topk_lowrank_bounds_ms": pruned * 1e3, "topk_lowrank_bounds_speedup": timed["dense"] / pruned,
            "topk_lowrank_bounds_tokens_scored": stats.get("tokens_scored"), "topk_lowrank_bounds_clusters_visited": stats.get("clusters_visited")}


def run_head_bench(shapes=tuple(SHAPES), threads: int = 2, min_seconds: float = 0.5, progress=None, rank: int = RANK) -> dict:
    """Time every variant of every shape in one run; returns {"machine", "bandwidth_gbps", "rows", "forms"}."""
    import onnxruntime as ort

    from ..backends.ort.session import session_options

    bandwidth = copy_bandwidth()
    rows, details = [], []
    for si, name in enumerate(shapes):
        V, d, K = SHAPES[name]
        h = np.random.default_rng(1).standard_normal((1, 1, d), dtype=np.float32)
        timed, sessions = {}, {}
        variants = build_variants(V, d, K, rank=rank)
        for vi, var in enumerate(variants):
            if progress is not None:
                progress(f"{name}: {var.name}", si * len(variants) + vi, len(shapes) * len(variants))
            config = dict(var.session_config)
            custom = config.pop("vqexport.custom_ops", None)
            so = session_options("all", threads, config)
            if custom:
                from ..ops.vqlogits import register_ort_kernel

                so.register_custom_ops_library(register_ort_kernel())
            sess = ort.InferenceSession(var.model.SerializeToString(), so, providers=["CPUExecutionProvider"])
            out_names = [o.name for o in sess.get_outputs()]
            med = float(np.median(time_calls(lambda s=sess: s.run(out_names, {"h": h}), min_seconds=min_seconds)))
            timed[var.name] = med
            if var.data is not None:
                sessions[var.name] = (sess, var.data)
            details.append({"shape": name, "variant": var.name, "ms": med * 1e3, "bytes": var.bytes_moved,
                            "bandwidth_fraction": var.bytes_moved / med / bandwidth})
        lowrank_row = {}
        if rank:
            lowrank_row = _lowrank_timing(V, d, K, rank, timed, sessions, h, min_seconds, details, name, bandwidth)
        best = lambda prefix: min((v, k) for k, v in timed.items() if k.startswith(prefix))  # noqa: E731
        dense8, dense8_name = best("dense_int8_")
        vq_name = min((k for k in timed if k.startswith("vq_") and "int8" not in k and not k.startswith("vq_r")), key=timed.get)
        vq8, vq8_name = best("vq_int8_")
        tk, tk_name = best("topk_int8_")
        rows.append({
            "name": name, "V": V, "d": d, "K": K,
            "dense_ms": timed["dense"] * 1e3, "dense_int8_ms": dense8 * 1e3, "vq_ms": timed[vq_name] * 1e3,
            "vq_int8_ms": vq8 * 1e3, "fused_ms": timed["fused_kernel"] * 1e3, "fused_function_ms": timed["fused_function"] * 1e3,
            "topk_ms": tk * 1e3,
            "vq_form": vq_name, "vq_int8_form": vq8_name, "dense_int8_form": dense8_name, "topk_form": tk_name,
            "vq_speedup": timed["dense"] / timed[vq_name], "vq_int8_speedup": timed["dense"] / vq8,
            "topk_speedup": timed["dense"] / tk, "vq_int8_vs_dense_int8": dense8 / vq8, **lowrank_row,
            "dense_int4_nbits_ms": timed["dense_int4_nbits"] * 1e3, "dense_int8_nbits_ms": timed["dense_int8_nbits"] * 1e3,
            "two_stage": {k: v * 1e3 for k, v in timed.items() if k.startswith("two_stage_")},
        })
    return {"machine": machine(), "threads": threads, "bandwidth_gbps": bandwidth / 1e9, "rows": rows, "variants": details,
            "notes": ("medians of batch-1 single-step head calls; fused_ms: the VQLogits node run by its registered "
                      "onnxruntime-extensions kernel (a Python op), fused_function_ms: the same node with ORT inlining its body")}
