"""Exact top-k decoding inside the graph, with no V-sized tensor computed at run time.

From the K codebook logits z = MatMul(h, C_T) and per-cluster tables (see vqexport.decoding):

    score      = z + head.cluster_max_bias                      [B, S, K]
    clusters   = TopK(score, min(k, K))                          [B, S, kc]
    candidates = GatherElements(z, clusters)[..., None] + head.member_bias[clusters]   [B, S, kc, w]
    top        = TopK(Reshape(candidates, [B, S, kc*w]), k)      values, positions
    topk_ids   = GatherElements(Reshape(head.members[clusters]), positions)
    lse        = ReduceLogSumExp(z + head.cluster_lse_bias)      [B, S, 1]
    topk_logprobs    = top.values - lse                          [B, S, k]
    cluster_logprobs = z + head.cluster_lse_bias - lse           [B, S, K]

Values are exact; among exactly equal logits, TopK's lowest-position rule may pick a different token id
than a by-id tie-break would.

A head with a rank-r correction has no exact cluster shortcut inside a static graph (a cluster's best token
depends on h through U[v] . (h P^T)), so its top-k is taken from the V logits, which cost O(V r) beyond the
codebook: ``topk_ids, values = TopK(logits, k)``, ``topk_logprobs = values - ReduceLogSumExp(logits)``, and no
``cluster_logprobs`` output (cluster mass is no longer enough to sample tokens). The per-cluster bound that
avoids the V-wide work for top-k ids lives in vqexport.decoding (``lowrank_topk``).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..decoding import cluster_tables
from ..errors import VQExportError
from ..graph import BATCH, SEQ, head_copy, initializer_array, prune_unused
from .int8_codebook import codebook_t

OUTPUTS = ("topk_ids", "topk_logprobs", "cluster_logprobs")


def add_topk_outputs(proto: onnx.ModelProto, k: int, keep_logits: bool = False) -> onnx.ModelProto:
    out, head = head_copy(proto, "decode = 'topk'")
    if head.lowrank is not None or (head.gather is not None and head.gather.op_type == "VQLogits" and len(head.gather.input) >= 6):
        return _topk_from_logits(out, k, keep_logits)
    g = out.graph
    mapping = initializer_array(out, head.map_name).reshape(-1)
    bias_name = next((i for i in (head.add.input if head.add is not None else []) if i == "head.bias"), None)
    bias = initializer_array(out, bias_name) if bias_name else None
    V = int(mapping.shape[0])
    K = int(codebook_t(out, head).shape[1])
    if not 1 <= k <= V:
        raise VQExportError(f"decode k must be in [1, vocab size {V}], got {k}")
    t = cluster_tables(mapping, bias, K, width=k)
    kc = min(k, K)
    neg = np.float32(np.finfo(np.float32).min)  # finite "minus infinity" keeps Add/TopK NaN-free
    inits = [
        numpy_helper.from_array(np.where(np.isfinite(t.max_bias), t.max_bias, neg).astype(np.float32), "head.cluster_max_bias"),
        numpy_helper.from_array(np.where(np.isfinite(t.lse_bias), t.lse_bias, neg).astype(np.float32), "head.cluster_lse_bias"),
        numpy_helper.from_array(np.where(t.members >= 0, t.members, 0).astype(np.int64), "head.members"),
        numpy_helper.from_array(np.where(np.isfinite(t.member_bias), t.member_bias, neg).astype(np.float32), "head.member_bias"),
        numpy_helper.from_array(np.array([kc], np.int64), "head/topk/k_clusters"),
        numpy_helper.from_array(np.array([k], np.int64), "head/topk/k"),
        numpy_helper.from_array(np.array([0, 0, -1], np.int64), "head/topk/flat_shape"),
        numpy_helper.from_array(np.array([-1], np.int64), "head/topk/last_axis"),
    ]
    z = head.matmul.output[0]
    n = helper.make_node
    nodes = [
        n("Add", [z, "head.cluster_max_bias"], ["topk/score"], name="topk/score"),
        n("TopK", ["topk/score", "head/topk/k_clusters"], ["topk/cluster_score", "topk/clusters"], name="topk/clusters", axis=-1),
        n("GatherElements", [z, "topk/clusters"], ["topk/z_sel"], name="topk/z_sel", axis=-1),
        n("Unsqueeze", ["topk/z_sel", "head/topk/last_axis"], ["topk/z_sel4"], name="topk/z_sel4"),
        n("Gather", ["head.member_bias", "topk/clusters"], ["topk/cand_bias"], name="topk/cand_bias", axis=0),
        n("Gather", ["head.members", "topk/clusters"], ["topk/cand_ids4"], name="topk/cand_ids4", axis=0),
        n("Add", ["topk/z_sel4", "topk/cand_bias"], ["topk/cand4"], name="topk/cand4"),
        n("Reshape", ["topk/cand4", "head/topk/flat_shape"], ["topk/cand"], name="topk/cand"),
        n("Reshape", ["topk/cand_ids4", "head/topk/flat_shape"], ["topk/cand_ids"], name="topk/cand_ids"),
        n("TopK", ["topk/cand", "head/topk/k"], ["topk/values", "topk/positions"], name="topk/top", axis=-1),
        n("GatherElements", ["topk/cand_ids", "topk/positions"], ["topk_ids"], name="topk/ids", axis=-1),
        n("Add", [z, "head.cluster_lse_bias"], ["topk/cluster_scores"], name="topk/cluster_scores"),
        n("ReduceLogSumExp", ["topk/cluster_scores", "head/topk/last_axis"], ["topk/lse"], name="topk/lse", keepdims=1),
        n("Sub", ["topk/values", "topk/lse"], ["topk_logprobs"], name="topk/logprobs"),
        n("Sub", ["topk/cluster_scores", "topk/lse"], ["cluster_logprobs"], name="topk/cluster_logprobs"),
    ]
    g.initializer.extend(inits)
    g.node.extend(nodes)
    return _finish(out, k, K, keep_logits)


def _topk_from_logits(out: onnx.ModelProto, k: int, keep_logits: bool) -> onnx.ModelProto:
    g = out.graph
    V = int(next(o for o in g.output if o.name == "logits").type.tensor_type.shape.dim[-1].dim_value)
    if not 1 <= k <= V:
        raise VQExportError(f"decode k must be in [1, vocab size {V}], got {k}")
    g.initializer.extend([numpy_helper.from_array(np.array([k], np.int64), "head/topk/k"),
                          numpy_helper.from_array(np.array([-1], np.int64), "head/topk/last_axis")])
    n = helper.make_node
    g.node.extend([
        n("TopK", ["logits", "head/topk/k"], ["topk/values", "topk_ids"], name="topk/top", axis=-1),
        n("ReduceLogSumExp", ["logits", "head/topk/last_axis"], ["topk/lse"], name="topk/lse", keepdims=1),
        n("Sub", ["topk/values", "topk/lse"], ["topk_logprobs"], name="topk/logprobs"),
    ])
    return _finish(out, k, None, keep_logits)


def _finish(out: onnx.ModelProto, k: int, clusters: int | None, keep_logits: bool) -> onnx.ModelProto:
    """Declare the top-k outputs (and cluster_logprobs over ``clusters`` codes), drop logits unless kept, check."""
    outs = [helper.make_tensor_value_info("topk_ids", TensorProto.INT64, [BATCH, SEQ, k]),
            helper.make_tensor_value_info("topk_logprobs", TensorProto.FLOAT, [BATCH, SEQ, k])]
    if clusters is not None:
        outs.append(helper.make_tensor_value_info("cluster_logprobs", TensorProto.FLOAT, [BATCH, SEQ, clusters]))
    out.graph.output.extend(outs)
    if not keep_logits:
        _drop_logits(out)
    onnx.checker.check_model(out, full_check=True)
    return out


def _drop_logits(proto: onnx.ModelProto) -> None:
    outs = [o for o in proto.graph.output if o.name != "logits"]
    del proto.graph.output[:]
    proto.graph.output.extend(outs)
    prune_unused(proto)
