"""``bench --head``: the output layer alone, batch 1, one decode step, through onnxruntime on this CPU.

Variants per head shape (random weights, seeded): dense fp32 MatMul; dense int8 (per-row int8 weights,
the fair baseline for int8); VQ fp32 and VQ int8 in the graph form the exporter emits; exact top-k
(k=50, int8 codebook). Also the alternative forms of the V-wide selection, so the fastest portable
form is chosen by measurement. Reports medians, bytes each variant must move, and the fraction of the
machine's measured copy bandwidth that reaches.

With a rank-r correction (r = 8 by default): the logits path (codebook + bias + (h·Pᵀ)·Uᵀ, fp32, int8 QDQ and
int8 MatMulNBits), the exact top-k graph (TopK over the V logits), and the exact top-k by per-cluster bounds
(vqexport.decoding.lowrank_topk: a graph computing z and h·Pᵀ, then numpy). U is drawn with std 0.05, so the
correction's spread is about a seventh of the codebook logits' (the bound method's cost depends on that ratio).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..decoding import cluster_tables
from ..graph import prune_unused
from ..quant import quantize_rows
from .timing import copy_bandwidth, machine, time_calls

SHAPES = {
    "gpt2": (50257, 768, 1024),
    "qwen2.5-0.5b": (151936, 896, 2048),
    "llama-3.2-1b": (128256, 2048, 2048),
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
    d = next(t for t in inits if t.name in ("w_t", "c_t", "w_q", "c_q")).dims[0]
    graph = helper.make_graph(nodes, "head", [helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, 1, d])], outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _logits_out(V):
    return [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 1, V])]


def _select(form: str, z: str, V: int, K: int) -> tuple[list, list]:
    """Nodes computing ``sel = z[..., map]`` in one of the measured forms."""
    n = helper.make_node
    if form == "gather":  # what the exporter emits: Gather on the last axis
        return [n("Gather", [z, "map"], ["sel"], axis=-1)], []
    if form == "gather_t":  # [B*S, K] -> [K, B*S] -> Gather axis 0 -> [V, B*S] -> back
        return [n("Reshape", [z, "flat2"], ["z2"]), n("Transpose", ["z2"], ["zt"], perm=[1, 0]),
                n("Gather", ["zt", "map"], ["selt"], axis=0), n("Transpose", ["selt"], ["sel2"], perm=[1, 0]),
                n("Reshape", ["sel2", "shape3"], ["sel"])], [
            numpy_helper.from_array(np.array([-1, K], np.int64), "flat2"),
            numpy_helper.from_array(np.array([1, 1, V], np.int64), "shape3")]
    if form == "gather_elements":  # indices broadcast to the output shape at run time
        return [n("Shape", [z], ["zs"]), n("Slice", ["zs", "zero1", "two1"], ["lead"]),
                n("Concat", ["lead", "v1"], ["oshape"], axis=0), n("Expand", ["map3", "oshape"], ["idx"]),
                n("GatherElements", [z, "idx"], ["sel"], axis=-1)], [
            numpy_helper.from_array(np.array([0], np.int64), "zero1"), numpy_helper.from_array(np.array([2], np.int64), "two1"),
            numpy_helper.from_array(np.array([V], np.int64), "v1")]
    raise ValueError(form)


def lowrank_factors(V: int, d: int, rank: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """P_t [d, r] with unit-norm columns and U_t [r, V] with std U_STD (see the module docstring)."""
    p = rng.standard_normal((d, rank), dtype=np.float32)
    p /= np.linalg.norm(p, axis=0, keepdims=True)
    return p, (rng.standard_normal((rank, V), dtype=np.float32) * U_STD)


def _lowrank_variants(c, mapping, bias, rank, rng, base_bytes) -> list[Variant]:
    from ..passes.int8_codebook import native_codebook, quantize_codebook
    from ..passes.topk_decode import add_topk_outputs

    K, d = c.shape
    V = mapping.shape[0]
    p_t, u_t = lowrank_factors(V, d, rank, rng)
    n = helper.make_node
    nodes = [n("MatMul", ["h", "head.codebook_t"], ["z"])] + _select("gather_elements", "z", V, K)[0] + [
        n("Add", ["sel", "head.bias"], ["base"]), n("MatMul", ["h", "head.lowrank_p_t"], ["proj"]),
        n("MatMul", ["proj", "head.lowrank_u_t"], ["correction"]), n("Add", ["base", "correction"], ["logits"])]
    inits = [numpy_helper.from_array(np.ascontiguousarray(c.T), "head.codebook_t"), numpy_helper.from_array(bias, "head.bias"),
             numpy_helper.from_array(mapping.astype(np.int64).reshape(1, 1, V), "map3"),
             numpy_helper.from_array(p_t, "head.lowrank_p_t"), numpy_helper.from_array(u_t, "head.lowrank_u_t"),
             numpy_helper.from_array(np.zeros((1, d), np.float32), "embed.weight")] + _select("gather_elements", "z", V, K)[1]
    graph = helper.make_graph(nodes, "head", [helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, 1, d])], _logits_out(V), inits)
    fp32 = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    lr_fp32 = 4 * (K * d + d * rank + rank * V)
    lr_int8 = K * d + d * rank + rank * V + 4 * (K + rank + V)
    tag = f"r{rank}"
    qdq = quantize_codebook(fp32)
    out = [Variant(f"vq_{tag}_gather_elements", fp32, lr_fp32 + base_bytes, {}),
           Variant(f"vq_{tag}_int8_native", native_codebook(fp32, accuracy_level=4), lr_int8 + base_bytes, {})]
    for level in ("0", "4"):
        out.append(Variant(f"vq_{tag}_int8_acc{level}", qdq, lr_int8 + base_bytes, {"session.qdq_matmulnbits_accuracy_level": level}))
    topk = add_topk_outputs(native_codebook(fp32, accuracy_level=4), TOPK)
    out.append(Variant(f"topk_{tag}_logits_int8", topk, lr_int8 + base_bytes, {}))
    # the bound method's graph part: z and h·Pᵀ only (K + r values leave the graph)
    scores = native_codebook(fp32, accuracy_level=4)
    del scores.graph.output[:]
    scores.graph.output.extend([helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 1, K]),
                                helper.make_tensor_value_info("proj", TensorProto.FLOAT, [1, 1, rank])])
    prune_unused(scores)
    out.append(Variant(f"scores_{tag}_int8", scores, K * d + d * rank + 4 * (K + rank) + 4 * d, {},
                       {"mapping": mapping, "bias": bias, "u": u_t.T}))
    return out


def build_variants(V: int, d: int, K: int, seed: int = 0, forms=("gather", "gather_t", "gather_elements"), rank: int = RANK) -> list[Variant]:
    rng = np.random.default_rng(seed)
    n = helper.make_node
    h_bytes = 4 * d
    out_bytes = 4 * V
    variants = []

    w = rng.standard_normal((V, d), dtype=np.float32) * d**-0.5
    dense = _model([n("MatMul", ["h", "w_t"], ["logits"])], [numpy_helper.from_array(np.ascontiguousarray(w.T), "w_t")], _logits_out(V))
    variants.append(Variant("dense", dense, 4 * V * d + h_bytes + out_bytes, {}))
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
    cq, cs = quantize_rows(c)
    vq_common = [numpy_helper.from_array(mapping, "map"), numpy_helper.from_array(bias, "bias"),
                 numpy_helper.from_array(mapping.astype(np.int64).reshape(1, 1, V), "map3")]
    table_bytes = 4 * V + 4 * V  # map (int32) + bias
    for form in forms:
        sel_nodes, sel_inits = _select(form, "z", V, K)
        tail = sel_nodes + [n("Add", ["sel", "bias"], ["logits"])]
        inits = vq_common + sel_inits
        if form != "gather_elements":
            inits = [t for t in inits if t.name != "map3"]
        extra = 8 * V if form == "gather_elements" else 0
        fp32 = _model([n("MatMul", ["h", "c_t"], ["z"])] + tail, [numpy_helper.from_array(np.ascontiguousarray(c.T), "c_t")] + inits, _logits_out(V))
        variants.append(Variant(f"vq_{form}", fp32, 4 * K * d + table_bytes + extra + h_bytes + out_bytes, {}))
        q = _model([n("DequantizeLinear", ["c_q", "c_s", "c_zp"], ["c_t"], axis=1), n("MatMul", ["h", "c_t"], ["z"])] + tail,
                   [numpy_helper.from_array(np.ascontiguousarray(cq.T), "c_q"), numpy_helper.from_array(cs, "c_s"),
                    numpy_helper.from_array(np.zeros(K, np.int8), "c_zp")] + inits, _logits_out(V))
        if form == "gather_elements":  # the ORT-native encoding: MatMulNBits (bits=8) in the graph itself
            from ..passes.int8_codebook import native_codebook

            variants.append(Variant("vq_int8_native_gather_elements", native_codebook(fp32, accuracy_level=4),
                                    K * d + 4 * K + table_bytes + extra + h_bytes + out_bytes, {}))
        for level in ("0", "4"):
            variants.append(Variant(f"vq_int8_{form}_acc{level}", q, K * d + 4 * K + table_bytes + extra + h_bytes + out_bytes,
                                    {"session.qdq_matmulnbits_accuracy_level": level}))

    variants += _fused_variants(c, mapping, bias, 4 * K * d + table_bytes + h_bytes + out_bytes)
    if rank:
        variants += _lowrank_variants(c, mapping, bias, rank, rng, table_bytes + 8 * V + h_bytes + out_bytes)
    t = cluster_tables(mapping, bias, K, width=TOPK)
    topk = _topk_model(cq, cs, mapping, bias, d)
    for level in ("0", "4"):
        w_tab = t.members.shape[1]
        variants.append(Variant(f"topk_int8_acc{level}", topk, K * d + 4 * K + 3 * 4 * K + 12 * K * w_tab + h_bytes,
                                {"session.qdq_matmulnbits_accuracy_level": level}))
    return variants


def _fused_variants(c, mapping, bias, nbytes) -> list[Variant]:
    """One VQLogits node: run by the registered kernel, and by ORT inlining its function body."""
    from ..ops.vqlogits import DOMAIN, OP_TYPE, PLUGIN_NAMESPACE, PLUGIN_VERSION, function_proto

    K, d = c.shape
    V = mapping.shape[0]
    node = helper.make_node(OP_TYPE, ["h", "c_t", "map", "bias"], ["logits"], domain=DOMAIN,
                            plugin_namespace=PLUGIN_NAMESPACE, plugin_version=PLUGIN_VERSION)
    inits = [numpy_helper.from_array(np.ascontiguousarray(c.T), "c_t"), numpy_helper.from_array(mapping, "map"),
             numpy_helper.from_array(bias, "bias")]
    graph = helper.make_graph([node], "head", [helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, 1, d])], _logits_out(V), inits)
    out = []
    for kernel in ("kernel", "function"):
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)],
                                  functions=[function_proto("gather_elements")])
        out.append(Variant(f"fused_{kernel}", model, nbytes, {"vqexport.custom_ops": "onnxruntime-extensions"} if kernel == "kernel" else {}))
    return out


def _topk_model(cq, cs, mapping, bias, d) -> onnx.ModelProto:
    """The same exact top-k subgraph the topk_decode pass emits, on an int8 codebook."""
    import copy

    from ..passes.topk_decode import add_topk_outputs

    K, V = cq.shape[0], mapping.shape[0]
    n = helper.make_node
    # a minimal "decoder" whose head the pass can find: logits = Gather(MatMul(h, DQ(c_q)), head.map) + head.bias
    inits = [numpy_helper.from_array(np.ascontiguousarray(cq.T), "head.codebook_q"), numpy_helper.from_array(cs, "head.codebook_scale"),
             numpy_helper.from_array(np.zeros(K, np.int8), "head.codebook_zero_point"),
             numpy_helper.from_array(mapping, "head.map"), numpy_helper.from_array(bias, "head.bias"),
             numpy_helper.from_array(np.zeros((1, d), np.float32), "embed.weight")]
    nodes = [n("DequantizeLinear", ["head.codebook_q", "head.codebook_scale", "head.codebook_zero_point"], ["head.codebook_t"], axis=1),
             n("MatMul", ["h", "head.codebook_t"], ["z"]), n("Gather", ["z", "head.map"], ["sel"], axis=-1),
             n("Add", ["sel", "head.bias"], ["logits"])]
    graph = helper.make_graph(nodes, "head", [helper.make_tensor_value_info("h", TensorProto.FLOAT, ["batch_size", "sequence_length", d])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", V])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    out = add_topk_outputs(copy.deepcopy(model), TOPK)
    keep = [o for o in out.graph.output if o.name in ("topk_ids", "topk_logprobs")]
    del out.graph.output[:]
    out.graph.output.extend(keep)
    prune_unused(out)
    return out


def _lowrank_timing(V, d, K, rank, timed, sessions, h, min_seconds, details, name, bandwidth) -> dict:
    """Rows for the rank-r head, and the bound method's numpy part timed on the scores graph's own outputs."""
    from ..decoding import cluster_tables, lowrank_tables, lowrank_topk

    tag = f"r{rank}"
    sess, data = sessions[f"scores_{tag}_int8"]
    tables = cluster_tables(data["mapping"], data["bias"], K, width=1)
    lr = lowrank_tables(data["mapping"], data["bias"], data["u"], tables)
    z, proj = sess.run(["z", "proj"], {"h": h})
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
        })
    return {"machine": machine(), "threads": threads, "bandwidth_gbps": bandwidth / 1e9, "rows": rows, "variants": details,
            "notes": ("medians of batch-1 single-step head calls; fused_ms: the VQLogits node run by its registered "
                      "onnxruntime-extensions kernel (a Python op), fused_function_ms: the same node with ORT inlining its body")}
